"""Bidirectional gRPC streams to a Triton server, each shared by many requests (tritonclient).

Several streams may run over one `InferenceServerClient` (one channel): each `GrpcStream` keeps
its own tritonclient stream object instead of the client's single one.
"""

from __future__ import annotations

import queue
import threading
import uuid
from typing import Iterator

import numpy as np

from qwen3vl_triton.errors import StreamError, message_of

__all__ = ["GrpcStream", "InFlight", "StreamError", "infer_input", "message_of"]


class InFlight(ValueError):
    """A request id that is already in flight on the stream (responses are routed by id)."""


class _ResponseIds:
    """Wraps the gRPC response iterator and remembers the request id of the response being
    handled. Triton puts the request's id on an error response too, but tritonclient's stream
    drops it with the rest of the response; the callback, called on the same thread for that
    response before the next is read, takes it from here, so an error reaches its own request.
    The end of the responses (the server closed the stream) is reported to `on_end`."""

    def __init__(self, responses, on_end):
        self.responses, self.on_end = responses, on_end
        self.current: str | None = None

    def __iter__(self):
        return self

    def __next__(self):
        self.current = None
        try:
            response = next(self.responses)  # a gRPC error raised here leaves `current` None: the stream broke
        except StopIteration:
            self.on_end()
            raise
        self.current = response.infer_response.id
        return response

    def __getattr__(self, name):  # cancel(), is_active(), ... of the gRPC call
        return getattr(self.responses, name)


class GrpcStream:
    """Requests over one stream; responses, errors included, are routed to their request by id.

    `client`: a tritonclient.grpc.InferenceServerClient (kept open on close; other streams may
    share it) or a url (a client of its own). A stream that broke (`broken`) fails every request
    waiting on it; a new one must be opened for the next. `wait_for_ready`: the stream waits for
    a server that is not listening yet instead of failing at once."""

    def __init__(self, client, timeout: float, stream_timeout: float | None = None, wait_for_ready: bool = False):
        import tritonclient.grpc as grpcclient
        from tritonclient.grpc._infer_stream import _InferStream, _RequestIterator

        self.own = isinstance(client, str)
        self.client = grpcclient.InferenceServerClient(client) if self.own else client
        self.timeout = timeout
        self.queues: dict[str, queue.Queue] = {}
        self.broken = False
        self._closed = threading.Event()
        # tritonclient 2.73's start_stream, with the stream object ours and the response iterator wrapped
        self._infer = _InferStream(self._callback, False)
        self.ids = _ResponseIds(self.client._client_stub.ModelStreamInfer(
            _RequestIterator(self._infer), metadata=self.client._get_metadata(None), timeout=stream_timeout,
            wait_for_ready=wait_for_ready), self._ended)
        self._infer._init_handler(self.ids)

    def _ended(self) -> None:
        if not self._closed.is_set():
            from tritonclient.utils import InferenceServerException

            self._callback(error=InferenceServerException("the server closed the stream",
                                                          status="StatusCode.UNAVAILABLE"))

    def _callback(self, result=None, error=None):
        rid = result.get_response().id if result is not None else self.ids.current
        if not rid:  # no id: the stream itself failed; tell every waiter
            self.broken = True
            for target in list(self.queues.values()):
                target.put((result, error))
            return
        q = self.queues.get(rid)
        if q is not None:  # else: a response to a request its caller has given up on
            q.put((result, error))

    def submit(self, model: str, inputs, request_id: str | None = None, outputs=None, sequence_id: int = 0,
               sequence_start: bool = False, sequence_end: bool = False) -> str:
        """Send one request without waiting; its results come from `results(id)`. Requests sent
        on the stream reach the server in the order they were submitted."""
        from tritonclient.grpc._utils import _get_inference_request

        if self.broken:
            raise StreamError(f"the stream to {model} broke; open a new one", broken=True)
        rid = request_id or uuid.uuid4().hex
        if rid in self.queues:
            raise InFlight(f"request id {rid} is already in flight on this stream")
        request = _get_inference_request(model_name=model, inputs=inputs, model_version="", request_id=rid,
                                         outputs=outputs, sequence_id=sequence_id, sequence_start=sequence_start,
                                         sequence_end=sequence_end, priority=0, timeout=None, parameters=None)
        request.parameters["triton_enable_empty_final_response"].bool_param = True
        self.queues[rid] = queue.Queue()
        try:
            self._infer._enqueue_request(request)
        except BaseException as exc:
            self.queues.pop(rid, None)
            self.broken = True
            raise StreamError(f"the stream to {model} broke: {message_of(exc)}", broken=True) from None
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
                    raise StreamError.of(error)
                yield result
                if is_final(result):
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
        self._closed.set()
        try:
            self._infer.close(cancel_requests=bool(self.queues) if cancel is None else cancel)
        finally:
            if self.own:
                self.client.close()


def is_final(result) -> bool:
    """Whether a streamed result is its request's final response."""
    final = result.get_response().parameters.get("triton_final_response")
    return final is not None and final.bool_param


def infer_input(name: str, array: np.ndarray):
    """A tritonclient gRPC input holding `array` (bfloat16 as ml_dtypes' type, as tritonclient wants)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    array = np.ascontiguousarray(array)
    t = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    t.set_data_from_numpy(array)
    return t
