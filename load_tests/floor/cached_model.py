"""Floor model for the overhead figure: the real model (real_model.py beside this file) answers
the first request; every later request gets those same output tensors back without any work.

The bench swaps this in for preprocessing and vision_encoder, so the `qwen3vl`
ensemble moves the same tensors through the same configs while its models compute nothing:
what is left of its latency is Triton's (gRPC, ensemble scheduling, Python-backend IPC)."""

import importlib.util
import os

import triton_python_backend_utils as pb_utils

_spec = importlib.util.spec_from_file_location("real_model", os.path.join(os.path.dirname(__file__), "real_model.py"))
_real = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_real)


class TritonPythonModel(_real.TritonPythonModel):
    cached = None

    def execute(self, requests):
        if self.cached is None:
            first = super().execute(requests[:1])[0]
            if first.has_error():
                return [first] * len(requests)
            self.cached = [(t.name(), t.as_numpy().copy()) for t in first.output_tensors()]
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, a) for n, a in self.cached])
                for _ in requests]
