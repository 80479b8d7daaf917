"""preprocessing: a prompt + encoded images and videos, or chat messages -> input ids with prompt-table ids,
pixel values."""

import triton_python_backend_utils as pb_utils

from qwen3vl_triton.backend.lifecycle import exit_stub
from qwen3vl_triton.backend.responses import error_response
from qwen3vl_triton.backend.tensors import model_params, output_tensor, read_inputs
from qwen3vl_triton.contract import LLMRequest
from qwen3vl_triton.model.checkpoint import ModelSpec
from qwen3vl_triton.text.preprocess import TRTLLM_OPTIONAL_INPUTS, Limits, Preprocessor, parse_request
from qwen3vl_triton.text.video import VideoLimits

INPUTS = ("text_input", "messages", "image", "video", "max_tokens", *TRTLLM_OPTIONAL_INPUTS)


class TritonPythonModel:
    def initialize(self, args):
        import torch

        # The image processor gains nothing from a second thread (a 448x448 image takes ~9 ms
        # either way), and this stub shares the host's cores with the vision encoder and the LLM.
        torch.set_num_threads(1)
        params = model_params(args)
        self.spec = ModelSpec.load(params["checkpoint"])
        self.max_output_len = int(params["max_output_len"])
        self.max_seq_len = int(params["max_input_len"]) + 1
        self.limits = Limits(text_bytes=int(params["max_text_bytes"]), image_bytes=int(params["max_image_bytes"]),
                             request_bytes=int(params["max_request_bytes"]),
                             video=VideoLimits(count=int(params["max_videos"]), bytes=int(params["max_video_bytes"]),
                                               frames=int(params["max_video_frames"]),
                                               seconds=float(params["max_video_seconds"]),
                                               frame_pixels=int(params["max_video_frame_pixels"]),
                                               pixels=int(params["max_video_pixels"])))
        self.pre = Preprocessor(self.spec, max_images=int(params["max_images"]),
                                max_input_len=int(params["max_input_len"]),
                                max_image_pixels=int(params["max_image_pixels"]), limits=self.limits,
                                pixel_cache_bytes=int(params["pixel_cache_bytes"]))

    def execute(self, requests):
        responses = []
        for request in requests:  # each request alone: a bad one gets its own error, the others are served
            try:
                req = parse_request(read_inputs(pb_utils, request, INPUTS), self.max_output_len, self.limits,
                                    self.spec.end_ids)
                p = self.pre.request(req)
                # the context ends the generation at max_seq_len: say so up front, so that max_tokens is
                # where it ends ("length"); generation ends at any end id (the stop words)
                llm = LLMRequest(p.input_ids, min(req.max_tokens, self.max_seq_len - p.input_ids.size),
                                 end_id=self.spec.end_id, pad_id=self.spec.pad_id, stop_ids=self.spec.end_ids)
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    *llm.pb_tensors(pb_utils), output_tensor(pb_utils, "pixel_values", p.pixel_values[None]),
                    output_tensor(pb_utils, "image_grid_thw", p.image_grid_thw[None])]))
            except Exception as exc:
                responses.append(error_response(pb_utils, exc, pb_utils.Logger))
        return responses

    def finalize(self):
        exit_stub()  # backend/lifecycle.py: what CPython's own shutdown would cost
