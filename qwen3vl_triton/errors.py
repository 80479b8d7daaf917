"""Errors a request can fail with: a bad input (named), or a server that cannot take it now."""


class InputError(ValueError):
    """A request input is invalid. `input` names it; str(err) is the message sent to the client."""

    def __init__(self, input_name: str, message: str):
        super().__init__(f"{input_name}: {message}")
        self.input = input_name


class Unavailable(RuntimeError):
    """The server cannot take the request now (a full queue); the client may retry later."""
