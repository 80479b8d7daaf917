"""The errors a request can fail with: a bad input (it names the input), or a server at a bound."""


class InputError(ValueError):
    """A request input is invalid. `input` names it; str(err) is the message sent to the client."""

    def __init__(self, input_name: str, message: str):
        super().__init__(f"{input_name}: {message}")
        self.input = input_name


class Unavailable(RuntimeError):
    """The server is at one of its bounds (open sequences, state memory, queued work): nothing is
    wrong with the request, which may succeed later. Sent as UNAVAILABLE; str(err) says which bound."""
