"""vision_encoder: the requests queued together are encoded in one forward pass; images seen
recently come from a cache of their rows instead of the tower."""

import os

# Set before torch loads OpenMP. The encoder runs while the LLM engine decodes other requests
# on the same cores, and OpenMP's default spin-waiting (about 3 ms per wait) stalls a team whose
# threads lose their core: on 2 cores a 448x448 forward took 2.5-3x its time alone next to one
# busy engine thread. Never spinning (OMP_WAIT_POLICY=PASSIVE) fixes that but costs ~10% alone,
# which is the whole encode at concurrency 1; a short spin (1000 turns, ~10 us) keeps the time
# alone and is within 5% of passive when contended (measured here, 448x448, small profile).
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import torch
import triton_python_backend_utils as pb_utils

from qwen3vl_triton.arrays import single_sequence
from qwen3vl_triton.backend.lifecycle import exit_stub
from qwen3vl_triton.backend.metrics import Gauges
from qwen3vl_triton.backend.responses import error_response
from qwen3vl_triton.backend.tensors import model_params, output_tensor, read_inputs
from qwen3vl_triton.contract import image_arrays
from qwen3vl_triton.model.checkpoint import ModelSpec
from qwen3vl_triton.model.vision import VisionEncoder, encode_request_from_arrays

INPUTS = ("input_ids", "pixel_values", "image_grid_thw")


class TritonPythonModel:
    def initialize(self, args):
        self.threads = torch.get_num_threads()
        params = model_params(args)
        self.spec = ModelSpec.load(params["checkpoint"])
        positions, stride = int(params["mrope_positions"]), int(params["table_stride"])
        self.table_stride = stride or None  # 0: each table sized to its request
        self.max_images, self.max_input_len = int(params["max_images"]), int(params["max_input_len"])
        self.max_videos = int(params["max_videos"])
        self.encoder = VisionEncoder(self.spec, device=params["device"], dtype=params["dtype"],
                                     mrope_positions=positions or None, table_stride=self.table_stride,
                                     cache_bytes=int(params["vision_cache_bytes"]))
        labels = {"model": args["model_name"], "version": args["model_version"]}
        self.families = {
            "hits": pb_utils.MetricFamily("qwen3vl_vision_cache_hits_total", "images whose rows came from the cache",
                                          pb_utils.MetricFamily.COUNTER),
            "misses": pb_utils.MetricFamily("qwen3vl_vision_cache_misses_total", "images encoded by the tower",
                                            pb_utils.MetricFamily.COUNTER),
            "bytes": pb_utils.MetricFamily("qwen3vl_vision_cache_bytes", "bytes of image rows held by the cache",
                                           pb_utils.MetricFamily.GAUGE),
        }
        self.metrics = {k: f.Metric(labels=labels) for k, f in self.families.items()}
        self.gauges = Gauges({"bytes": self.metrics["bytes"]})
        self.sent = {"hits": 0, "misses": 0}

    def _report_cache(self) -> None:
        stats = self.encoder.cache.stats if self.encoder.cache else None
        if stats is None:
            return
        for name in ("hits", "misses"):
            value = getattr(stats, name)
            if value > self.sent[name]:
                self.metrics[name].increment(value - self.sent[name])
                self.sent[name] = value
        self.gauges.set("bytes", stats.bytes)

    def execute(self, requests):
        responses = [None] * len(requests)
        batch, where = [], []
        for i, request in enumerate(requests):
            try:
                arrays = read_inputs(pb_utils, request, INPUTS)
                batch.append(encode_request_from_arrays(
                    {k: single_sequence(arrays, k) for k in INPUTS}, self.spec, self.table_stride,
                    max_images=self.max_images, max_input_len=self.max_input_len, max_videos=self.max_videos))
                where.append(i)
            except Exception as exc:
                responses[i] = error_response(pb_utils, exc, pb_utils.Logger)
        if batch:
            # A few patches (a small image) run faster on one thread than on two that must meet
            # after every op; a 448x448 image (784 patches) runs 2x faster on two.
            patches = sum(len(r.pixel_values) for r in batch)
            torch.set_num_threads(self.threads if patches >= 256 else 1)
            results = self.encoder.encode_each(batch)  # a failure reaches only its own request
            for i, r in zip(where, results):
                if isinstance(r, Exception):
                    responses[i] = error_response(pb_utils, r, pb_utils.Logger)
                    continue
                arrays = image_arrays(r.prompt_embedding_table, r.mrope_rotary_cos_sin, r.mrope_position_deltas,
                                      r.prompt_table_extra_ids)
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[output_tensor(pb_utils, name, value) for name, value in arrays.items()])
            self._report_cache()
        return responses

    def finalize(self):
        # a Metric must go before its MetricFamily (left to teardown, the stub may crash on exit)
        self.metrics.clear()
        self.families.clear()
        exit_stub()  # backend/lifecycle.py: what CPython's own shutdown would cost
