"""What one HTTP client can make the OpenAI endpoint hold, bounded: the body's size, the time its
headers and its body may take, and the connections open at once.

uvicorn 0.54 (h11) brings some bounds and lacks others. It has: the size of a request's header
block while it arrives (h11's max incomplete event size, 16 KiB; past it a 400; a block read whole
in one read of the socket, up to 256 KiB, is not cut), the idle time between requests on a
kept-alive connection (`timeout_keep_alive`), and a 503 past a number of connections or running
requests (`limit_concurrency`), checked only once a request's headers are complete. It has no
timeout while a request's headers or body are arriving -- a client that sends a byte every few
seconds holds its connection, and what it sent, for ever -- and no bound on connections that never
finish their headers. An ASGI middleware cannot see such a connection (the application is called
only once the headers are complete), so those bounds live in `guarded_protocol`, a subclass of
uvicorn's h11 protocol; the body's size is `BodyLimit`'s, an ASGI middleware that refuses before it
reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

ErrorBody = Callable[[int, str], bytes]  # (HTTP status, message) -> the response body (JSON)


@dataclass(frozen=True)
class HTTPLimits:
    """`header_timeout`: seconds for a request's line and headers to arrive, counted from the
    connection's start or the previous response's end; `body_timeout`: seconds for its whole body,
    counted from the end of its headers (a body the server refused unread is drained, within the same
    time); `max_connections`: open at once, past it a new one is answered 503 and closed."""

    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_connections: int = 512


def _raw_response(status: int, reason: str, body: bytes) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, for a connection h11 has no request on."""
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


class BodyTooLarge(Exception):
    """Raised from the application's `receive` once a body without a Content-Length (chunked) passes
    the limit; the application answers it (status 413) as it answers its own errors."""

    status = 413

    def __init__(self, received: int, limit: int):
        super().__init__(f"request: the body is over the limit of {limit} bytes ({received} bytes were read "
                         "before it was refused)")
        self.message = str(self)


class BodyLimit:
    """ASGI middleware: a body above `max_bytes` is refused with 413. From its Content-Length, before
    any of it is read: uvicorn sends `100 Continue` only when the application first asks for the
    body, so a client that waits for it (Expect: 100-continue) never sends its body, and is told to
    close. A chunked body is counted as it is read and refused at the limit (BodyTooLarge).

    `budget` bounds the bodies of all requests at once: each holds its Content-Length (a chunked one,
    `max_bytes`) from its start to its answer's end -- its parsed values live as long -- and a
    request that would pass the budget is answered 503 at once, before it is read."""

    def __init__(self, app, max_bytes: int, error_body: ErrorBody, budget: int | None = None):
        self.app, self.max_bytes, self.error_body = app, max_bytes, error_body
        self.budget, self.held = budget, 0

    async def _refuse(self, send, headers: dict, status: int, message: str, extra=()) -> None:
        body = self.error_body(status, message)
        close = headers.get(b"expect", b"").lower() == b"100-continue"  # its body is not coming
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *extra, *([(b"connection", b"close")] if close else [])]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and int(length) > self.max_bytes:  # h11 has checked it is a number
            return await self._refuse(send, headers, 413,
                                      f"request: is {int(length)} bytes, above the limit of {self.max_bytes}")
        hold = int(length) if length is not None else self.max_bytes if b"transfer-encoding" in headers else 0
        if self.budget is not None and hold and self.held + hold > self.budget:
            return await self._refuse(send, headers, 503, f"the server holds {self.held} bytes of other requests' "
                                                          f"bodies, its budget is {self.budget}: try again shortly",
                                      [(b"retry-after", b"1")])
        self.held += hold
        try:
            return await self._call(scope, receive, send)
        finally:
            self.held -= hold

    async def _call(self, scope, receive, send):
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(received, self.max_bytes)
            return message

        return await self.app(scope, counted, send)


def guarded_protocol(limits: HTTPLimits, error_body: ErrorBody, max_header_bytes: int = 16 * 2**10):
    """uvicorn's h11 protocol with the header and body read timeouts and the connection bound of
    `limits`, and its own 400 (a malformed request, or headers above `max_header_bytes`: h11's
    bound, uvicorn's `h11_max_incomplete_event_size`) as a JSON error. Pass it as uvicorn.Config's
    `http`."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _timer = None
        _phase = None  # "headers" or "body" while one is awaited, with a deadline

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                self._close_with(503, "Service Unavailable",
                                 f"the server has {limits.max_connections} connections open, its limit: try again "
                                 "later")
                return
            self._watch()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch()

        def connection_lost(self, exc) -> None:
            self._cancel()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            body = error_body(400, f"not a valid HTTP/1.1 request, or its headers are above {max_header_bytes} "
                                   "bytes")
            self._close_with(400, "Bad Request", None, body)

        def _watch(self) -> None:
            """Arm the deadline of what the connection waits for: a request's headers or its body."""
            state = self.conn.their_state
            phase = None if self.transport.is_closing() else \
                "headers" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
            if phase == self._phase:
                return
            self._cancel()
            self._phase = phase
            if phase is not None:
                timeout = limits.header_timeout if phase == "headers" else limits.body_timeout
                self._timer = self.loop.call_later(timeout, self._expired, phase, timeout)

        def _cancel(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._phase = None, None

        def _expired(self, phase: str, timeout: float) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            cycle = self.cycle if phase == "body" else None
            if cycle is not None and cycle.response_started:  # e.g. a refused body, drained too slowly
                self.transport.close()
                return
            self._close_with(408, "Request Timeout", f"the request's {phase} did not arrive within {timeout:g} s")

        def _close_with(self, status: int, reason: str, message: str | None, body: bytes | None = None) -> None:
            """Answer `status` and close, whatever h11's state; a request the application is reading
            sees the client gone."""
            self._cancel()
            self.transport.write(_raw_response(status, reason, body or error_body(status, message)))
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.response_started = self.cycle.response_complete = True
                self.cycle.disconnected = True
                self.cycle.message_event.set()
            self.transport.close()

    return GuardedH11Protocol
