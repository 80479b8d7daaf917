"""Floor model for the overhead figure, in place of tensorrt_llm: reads every input it is given
and streams one token back with the final flag from `execute` -- the LLM hop with no engine."""

import numpy as np
import triton_python_backend_utils as pb_utils

from qwen3vl_triton.backend.tensors import read_inputs
from qwen3vl_triton.contract import CONTRACT_INPUTS


class TritonPythonModel:
    def initialize(self, args):
        pass

    def execute(self, requests):
        for request in requests:
            read_inputs(pb_utils, request, CONTRACT_INPUTS)
            ids = np.array([[[0]]], np.int32)
            request.get_response_sender().send(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("output_ids", ids),
                        pb_utils.Tensor("sequence_length", np.array([[1]], np.int32)),
                    ]
                ),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )
        return None
