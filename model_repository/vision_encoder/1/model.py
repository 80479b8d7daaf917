"""vision_encoder: the requests queued together are encoded in one forward pass."""

import numpy as np
import triton_python_backend_utils as pb_utils

from qwen3vl_triton.backend import error_response, model_params, output_tensor, read_inputs, single_sequence
from qwen3vl_triton.checkpoint import ModelSpec
from qwen3vl_triton.vision import VisionEncoder, encode_request_from_arrays

INPUTS = ("input_ids", "pixel_values", "image_grid_thw")


class TritonPythonModel:
    def initialize(self, args):
        params = model_params(args)
        self.spec = ModelSpec.load(params["checkpoint"])
        positions, stride = int(params["mrope_positions"]), int(params["table_stride"])
        self.table_stride = stride or None  # 0: each table sized to its request
        self.encoder = VisionEncoder(self.spec, device=params["device"], dtype=params["dtype"],
                                     mrope_positions=positions or None, table_stride=self.table_stride)

    def execute(self, requests):
        responses = [None] * len(requests)
        batch, where = [], []
        for i, request in enumerate(requests):
            try:
                arrays = read_inputs(pb_utils, request, INPUTS)
                batch.append(encode_request_from_arrays(
                    {k: single_sequence(arrays, k) for k in INPUTS}, self.spec, self.table_stride))
                where.append(i)
            except Exception as exc:
                responses[i] = error_response(pb_utils, exc, pb_utils.Logger)
        if batch:
            try:
                results = self.encoder.encode(batch)
            except Exception as exc:
                results = [exc] * len(batch)
            for i, r in zip(where, results):
                if isinstance(r, Exception):
                    responses[i] = error_response(pb_utils, r, pb_utils.Logger)
                    continue
                responses[i] = pb_utils.InferenceResponse(output_tensors=[
                    output_tensor(pb_utils, "prompt_embedding_table", r.prompt_embedding_table[None]),
                    output_tensor(pb_utils, "prompt_vocab_size", np.array([[r.prompt_vocab_size]], np.int32)),
                    output_tensor(pb_utils, "mrope_rotary_cos_sin", r.mrope_rotary_cos_sin[None]),
                    output_tensor(pb_utils, "mrope_position_deltas", np.array([[r.mrope_position_deltas]], np.int64)),
                ])
        return responses
