"""Floor model for the overhead figure, in place of tensorrt_llm: reads every input it is given
and streams one token back with the final flag from `execute` -- the LLM hop with no engine."""

import triton_python_backend_utils as pb_utils

from qwen3vl_triton.backend.tensors import read_inputs
from qwen3vl_triton.contract import INPUTS, LLMResponse


class TritonPythonModel:
    def initialize(self, args):
        pass

    def execute(self, requests):
        for request in requests:
            read_inputs(pb_utils, request, INPUTS)
            request.get_response_sender().send(
                pb_utils.InferenceResponse(output_tensors=LLMResponse([0]).pb_tensors(pb_utils)),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )
        return None
