"""One `tensorrt_llm` request's engine tokens as its responses.
"""

from __future__ import annotations

from qwen3vl_triton.backend.responses import error_response, send_response
from qwen3vl_triton.backend.workers import CancelPoll
from qwen3vl_triton.contract import FinishReason, LLMResponse
from qwen3vl_triton.errors import Cancelled, Failed


class TokenStream:
    """Sends one request's engine tokens as `tensorrt_llm` responses (output_ids, sequence_length).

    Streaming: one response per new token, the last one carrying the FINAL flag; otherwise one
    response with all tokens. A cancelled request (seen within `cancel_check_seconds`) stops
    its generation and is closed with FINAL.
    """

    def __init__(self, pb, sender, engine, streaming: bool, logger, cancel_check_seconds: float):
        self.pb, self.sender, self.engine = pb, sender, engine
        self.streaming = streaming
        self.client_cancelled = CancelPoll(sender.is_cancelled, cancel_check_seconds)
        self.logger = logger
        self.tokens: list[int] = []
        self.request_id = ""
        self.cancelled = False

    def _send_tokens(self, tokens: list[int], flags: int) -> None:
        send_response(self.pb, self.sender, LLMResponse(tokens).pb_tensors(self.pb), flags)

    def _send_cancelled(self) -> None:
        self.sender.send(error_response(self.pb, Cancelled()), flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def on_tokens(self, tokens: list[int], finish: FinishReason | None, err: str | None) -> None:
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if not self.cancelled and self.client_cancelled():
            self.cancelled = True
            self.engine.cancel(self.request_id)
        if self.cancelled or finish == FinishReason.CANCELLED:
            if finish is not None:
                self._send_cancelled()
            return
        if finish == FinishReason.ERROR:
            # The error, then the end on its own: Triton 2.51 never hands a decoupled BLS caller an
            # error response that follows earlier responses, and one that also carried the FINAL flag
            # would leave that caller waiting for ever; the empty final one reaches it.
            self.sender.send(error_response(self.pb, Failed(err or "generation failed")))
            self.sender.send(flags=final)
            return
        if self.streaming:
            if tokens:
                self._send_tokens(tokens, final if finish else 0)
            elif finish:
                self.sender.send(flags=final)
            return
        self.tokens.extend(tokens)
        if finish:
            self._send_tokens(self.tokens, final)
