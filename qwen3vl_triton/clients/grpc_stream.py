"""One gRPC bidirectional stream to a Triton server, shared by many requests (tritonclient)."""

from __future__ import annotations

import queue
import uuid
from typing import Iterator

import numpy as np

# gRPC statuses that mean the stream itself broke, not that the server refused the request
BROKEN = ("StatusCode.CANCELLED", "StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")


class StreamError(RuntimeError):
    """An error response, or the stream broke (`broken`)."""

    def __init__(self, message: str, broken: bool = False):
        super().__init__(message)
        self.broken = broken


def message_of(error) -> str:
    msg = getattr(error, "message", None)
    msg = msg() if callable(msg) else (msg or str(error))
    return msg.strip() if msg else type(error).__name__


class _ResponseIds:
    """Wraps the gRPC response iterator and remembers the request id of the response being
    handled. Triton puts the request's id on an error response too, but tritonclient's stream
    drops it with the rest of the response; the callback, called on the same thread for that
    response before the next is read, takes it from here, so an error reaches its own request."""

    def __init__(self, responses):
        self.responses = responses
        self.current: str | None = None

    def __iter__(self):
        return self

    def __next__(self):
        self.current = None
        response = next(self.responses)  # a gRPC error raised here leaves `current` None: the stream broke
        self.current = response.infer_response.id
        return response

    def __getattr__(self, name):  # cancel(), is_active(), ... of the gRPC call
        return getattr(self.responses, name)


def _start_stream(client, callback, stream_timeout, headers=None) -> _ResponseIds:
    """`client.start_stream(callback)`, keeping the ids of error responses (tritonclient 2.73's
    own steps, with the response iterator wrapped)."""
    from tritonclient.grpc._infer_stream import _InferStream, _RequestIterator

    if client._stream is not None:
        raise RuntimeError("this InferenceServerClient already runs a stream")
    client._stream = _InferStream(callback, False)
    ids = _ResponseIds(client._client_stub.ModelStreamInfer(_RequestIterator(client._stream),
                                                            metadata=client._get_metadata(headers),
                                                            timeout=stream_timeout))
    client._stream._init_handler(ids)
    return ids


class GrpcStream:
    """Requests over one stream; responses, errors included, are routed to their request by id.

    `client`: a tritonclient.grpc.InferenceServerClient (kept open on close) or a url."""

    def __init__(self, client, timeout: float, stream_timeout: float | None = None):
        import tritonclient.grpc as grpcclient

        self.own = isinstance(client, str)
        self.client = grpcclient.InferenceServerClient(client) if self.own else client
        self.timeout = timeout
        self.queues: dict[str, queue.Queue] = {}
        self.ids = _start_stream(self.client, self._callback, stream_timeout)

    def _callback(self, result=None, error=None):
        rid = result.get_response().id if result is not None else self.ids.current
        if not rid:  # no id: the stream itself failed; tell every waiter
            for target in list(self.queues.values()):
                target.put((result, error))
            return
        q = self.queues.get(rid)
        if q is not None:  # else: a response to a request its caller has given up on
            q.put((result, error))

    def submit(self, model: str, inputs, request_id: str | None = None, **kw) -> str:
        """Send one request without waiting; its results come from `results(id)`. Requests sent
        on the stream reach the server in the order they were submitted."""
        rid = request_id or uuid.uuid4().hex
        self.queues[rid] = queue.Queue()
        try:
            self.client.async_stream_infer(model, inputs, request_id=rid, enable_empty_final_response=True, **kw)
        except BaseException:
            self.queues.pop(rid, None)
            raise
        return rid

    def results(self, rid: str, model: str = "the model") -> Iterator:
        """Yield the results of a submitted request until its final response; StreamError on an error."""
        q = self.queues[rid]
        try:
            while True:
                try:
                    result, error = q.get(timeout=self.timeout)
                except queue.Empty:
                    raise StreamError(f"no response from {model} within {self.timeout:.0f}s", broken=True) from None
                if error is not None:
                    status = getattr(error, "status", lambda: None)()
                    raise StreamError(message_of(error), broken=status in BROKEN)
                yield result
                final = result.get_response().parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    return
        finally:
            self.queues.pop(rid, None)

    def forget(self, rid: str) -> None:
        """Drop a submitted request's answers, if any still come."""
        self.queues.pop(rid, None)

    def request(self, model: str, inputs, request_id: str | None = None, **kw) -> Iterator:
        """Yield the results of one request until its final response; StreamError on an error."""
        yield from self.results(self.submit(model, inputs, request_id, **kw), model)

    def close(self, cancel: bool | None = None) -> None:
        """Stop the stream. cancel None: cancel only if a request is unfinished -- cancelling one
        that already sent its final response is not a no-op on Triton 2.51 (with concurrent
        streams the decoupled qwen3vl ensemble can then not unload at shutdown)."""
        try:
            self.client.stop_stream(cancel_requests=bool(self.queues) if cancel is None else cancel)
        finally:
            if self.own:
                self.client.close()


def infer_input(name: str, array: np.ndarray):
    """A tritonclient gRPC input holding `array` (bfloat16 as ml_dtypes' type, as tritonclient wants)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    array = np.ascontiguousarray(array)
    t = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    t.set_data_from_numpy(array)
    return t
