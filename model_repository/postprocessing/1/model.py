"""postprocessing: token ids -> text, incrementally per stream (keyed by the request id)."""

import numpy as np
import triton_python_backend_utils as pb_utils

from qwen3vl_triton.backend import error_response, model_params, read_inputs
from qwen3vl_triton.checkpoint import ModelSpec
from qwen3vl_triton.detok import StreamDetokenizers


class TritonPythonModel:
    def initialize(self, args):
        from transformers import AutoTokenizer

        params = model_params(args)
        spec = ModelSpec.load(params["checkpoint"])
        tokenizer = AutoTokenizer.from_pretrained(params["checkpoint"])
        self.streams = StreamDetokenizers(tokenizer, end_ids=spec.end_ids,
                                          idle_seconds=float(params["stream_idle_seconds"]))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                ids = read_inputs(pb_utils, request, ("output_ids",))["output_ids"]
                text = self.streams.add(request.request_id() or None, ids.reshape(-1).tolist())
                out = np.array([[text.encode("utf-8")]], dtype=np.object_)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("text_output", out)]))
            except Exception as exc:
                responses.append(error_response(pb_utils, exc, pb_utils.Logger))
        return responses
