"""Errors as Triton errors, and responses sent safely from any thread.
"""

from __future__ import annotations

import traceback

import numpy as np

from qwen3vl_triton.errors import Code, unexpected, wire


def error(pb, exc: BaseException, logger=None):
    """A TritonError for `exc`, in the wire format (errors.wire): INVALID_ARG with the message for bad
    input, UNAVAILABLE for a server at a bound, CANCELLED, INTERNAL otherwise (logged with its
    traceback when it is an unexpected exception)."""
    message, code = wire(exc)
    if code is Code.INTERNAL:
        if logger is not None and unexpected(exc):
            logger.log_error(f"internal error: {''.join(traceback.format_exception(exc))}")
        return pb.TritonError(message)  # INTERNAL is the default code
    return pb.TritonError(message, getattr(pb.TritonError, code.name))

def error_response(pb, exc: BaseException, logger=None):
    return pb.InferenceResponse(error=error(pb, exc, logger))

def send_response(pb, sender, tensors: list, flags: int = 0) -> None:
    """`sender.send` of a response with `tensors`, which stay referenced here until it returns.

    Triton 2.51's Python backend drops the outputs a request did not ask for inside `send`,
    after releasing the GIL, and so freed the numpy arrays of those tensors without the GIL
    (python_backend #390, fixed in 24.12). With another Python thread running, that corrupts
    the interpreter's memory: the `tensorrt_llm` stub crashed in torch ops on the engine thread
    while `language`, which asks it for `output_ids` only, was being answered. Held here, the
    arrays are freed after `send`, with the GIL."""
    sender.send(pb.InferenceResponse(output_tensors=tensors), flags=flags)


def qwen3vl_outputs(pb, text: str, ids, prompt_tokens: int, finish, generation_id: str) -> list:
    """The tensors of one `qwen3vl` response (`qwen3vl_disagg` answers the same): the new text, its
    token ids, the prompt's length, the finish reason (empty before the last response) and the
    generation's id."""
    return [
        pb.Tensor("text_output", np.array([[text.encode("utf-8")]], np.object_)),
        pb.Tensor("output_ids", np.asarray(ids, np.int32).reshape(1, -1)),
        pb.Tensor("prompt_tokens", np.array([[prompt_tokens]], np.int32)),
        pb.Tensor("finish_reason", np.array([[(finish or "").encode()]], np.object_)),
        pb.Tensor("generation_id", np.array([[generation_id.encode()]], np.object_)),
    ]
