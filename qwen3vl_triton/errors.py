"""The errors a request can fail with, and their wire format.

A request fails with one of four codes (`Code`): a bad input (INVALID_ARG, naming the input), a
server at one of its bounds (UNAVAILABLE: retry later), a cancelled request (CANCELLED), or a
failure inside the server (INTERNAL). The server sends the code as Triton's error code, but
Triton's gRPC stream carries only the message, so the message itself is the wire format; `wire`
writes it and `parse` is the one reader (the OpenAI endpoint, the client library and the
transfer use it; nothing else looks at error text):

    <input>: <text>                 INVALID_ARG; <input> names it (`max_tokens`, `messages[0].role`)
    internal error: <type>: <text>  INTERNAL: an unexpected exception in a model
    generation failed: <text>       INTERNAL: the LLM failed while generating (also any other text)
    request cancelled               CANCELLED
    <one of UNAVAILABLE_LEADS>...   UNAVAILABLE: one of this project's bounds
    Triton's own refusals           UNAVAILABLE: "Exceeds maximum queue size", "... is not ready",
                                    "Request for unknown model ...", "... is not found"

Prefixes Triton and tritonclient put in front are read and removed: "in ensemble '<name>', "
(an ensemble step's error), "[request id: <id>] ", and tritonclient's "[StatusCode.<code>] ",
whose gRPC status (on a unary call, which keeps it) decides the code.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


class Code(str, enum.Enum):
    INVALID_ARG = "invalid_arg"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


class InputError(ValueError):
    """A request input is invalid. `input` names it; str(err) is the message sent to the client."""

    def __init__(self, input_name: str, message: str):
        super().__init__(f"{input_name}: {message}")
        self.input = input_name


class Unavailable(RuntimeError):
    """The server is at one of its bounds (open sequences, state memory, queued work): nothing is
    wrong with the request, which may succeed later. Sent as UNAVAILABLE; str(err) says which bound
    and begins with one of UNAVAILABLE_LEADS, so a reader of the text alone knows the code."""


class Cancelled(RuntimeError):
    """The request was cancelled (its client went away)."""

    def __init__(self, message: str = "request cancelled"):
        super().__init__(message)


class Failed(RuntimeError):
    """A request failed inside the server; str(err) is already the message for the client
    (e.g. "generation failed: ..."). Sent as INTERNAL."""


# How this project's UNAVAILABLE messages begin (the text is all a stream reader gets)
ENGINE_QUEUE_FULL = "engine queue full"
LANGUAGE_STATE_FULL = "start refused: the language server holds"
LANGUAGE_DRAINING = "start refused: the language server is draining"
QUEUE_SIZE = "Exceeds maximum queue size"  # Triton's own phrase, which qwen3vl_disagg's bound reuses
UNAVAILABLE_LEADS = (ENGINE_QUEUE_FULL, LANGUAGE_STATE_FULL, LANGUAGE_DRAINING, QUEUE_SIZE)
# Triton's own refusals of a request it cannot serve now, and a stream that ended under its requests
_TRITON_UNAVAILABLE = ("maximum queue size", "is not ready", "unknown model", "is not found",
                       "the server closed the stream")
_CANCELLED = ("request cancelled", "locally cancelled", "cancelled")
_INTERNAL = "internal error"

# gRPC statuses (tritonclient's "StatusCode.X") and what they say of a request
_GRPC = {"INVALID_ARGUMENT": Code.INVALID_ARG, "UNAVAILABLE": Code.UNAVAILABLE,
         "RESOURCE_EXHAUSTED": Code.UNAVAILABLE, "NOT_FOUND": Code.UNAVAILABLE, "DEADLINE_EXCEEDED": Code.UNAVAILABLE,
         "CANCELLED": Code.CANCELLED, "INTERNAL": Code.INTERNAL}
# statuses that mean the stream itself broke, not that the server refused one request
BROKEN = ("StatusCode.CANCELLED", "StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")

_STATUS = re.compile(r"^\[StatusCode\.(\w+)\] ")
_PREFIXES = re.compile(r"^(?:in ensemble '[^']*', |\[request id: [^\]]*\] )")
_INPUT = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


def wire(exc: BaseException) -> tuple[str, Code]:
    """The message and code a backend sends for `exc`."""
    if isinstance(exc, InputError):
        return str(exc), Code.INVALID_ARG
    if isinstance(exc, Unavailable):
        return str(exc), Code.UNAVAILABLE
    if isinstance(exc, Cancelled):
        return str(exc), Code.CANCELLED
    if isinstance(exc, Failed):
        return str(exc), Code.INTERNAL
    remote = getattr(exc, "error", None)
    if isinstance(remote, WireError):  # another server's error, passed on as it came
        return remote.message, remote.code
    return f"{_INTERNAL}: {type(exc).__name__}: {exc}", Code.INTERNAL


def unexpected(exc: BaseException) -> bool:
    """An exception none of the request error types covers: a bug, worth its traceback in the log."""
    return not isinstance(exc, (InputError, Unavailable, Cancelled, Failed)) and \
        not isinstance(getattr(exc, "error", None), WireError)


@dataclass(frozen=True)
class WireError:
    """An error message as read back: its code, the input it names (INVALID_ARG), the text for
    people (Triton's prefixes removed) and the message as it came."""

    code: Code
    input: str | None
    text: str
    message: str


def parse(message: str, status: str | None = None) -> WireError:
    """Read an error message (and the gRPC status, where the call kept one: "StatusCode.X" or "X")."""
    message = message.strip()
    text = message
    m = _STATUS.match(text)
    if m:
        status, text = status or m.group(1), text[m.end():]
    while (m := _PREFIXES.match(text)) is not None:
        text = text[m.end():]
    grpc_code = _GRPC.get(str(status).rpartition(".")[2]) if status else None
    m = _INPUT.match(text)
    name = m.group(1) if m else None
    lower = text.lower()
    if text.startswith(UNAVAILABLE_LEADS):
        code = Code.UNAVAILABLE
    elif lower.startswith(_CANCELLED):
        code = Code.CANCELLED
    elif name is not None and not lower.startswith(_INTERNAL):
        code = Code.INVALID_ARG
    elif any(p in lower for p in _TRITON_UNAVAILABLE):
        code = Code.UNAVAILABLE
    else:
        code = Code.INTERNAL
    code = grpc_code or code
    return WireError(code, name if code is Code.INVALID_ARG else None, text, message)


def message_of(error) -> str:
    """The message of an exception (tritonclient's, gRPC's or any other)."""
    msg = getattr(error, "message", None)
    msg = msg() if callable(msg) else (msg or str(error))
    return msg.strip() if msg else type(error).__name__


class RemoteError(RuntimeError):
    """An error another server or model sent: str(err) is its message as it came, `error` the
    message as parsed (code, input, text). A model passes it on as it came (`wire`)."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.error = parse(message, status)


class StreamError(RemoteError):
    """An error response read from a stream, or the stream broke (`broken`)."""

    def __init__(self, message: str, broken: bool = False, status: str | None = None):
        super().__init__(message, status)
        self.broken = broken

    @classmethod
    def of(cls, error) -> "StreamError":
        """From a tritonclient error (its status says whether the stream broke)."""
        status = getattr(error, "status", lambda: None)()
        return cls(message_of(error), broken=status in BROKEN, status=status)
