"""The one error type a request can fail with: it names the offending input."""


class InputError(ValueError):
    """A request input is invalid. `input` names it; str(err) is the message sent to the client."""

    def __init__(self, input_name: str, message: str):
        super().__init__(f"{input_name}: {message}")
        self.input = input_name
