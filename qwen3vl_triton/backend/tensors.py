"""A request's input tensors and a response's output tensors, in and out of the stub.
"""

from __future__ import annotations

import json
import os

import numpy as np

from qwen3vl_triton.arrays import BFLOAT16, to_torch


def as_numpy(tensor) -> np.ndarray:
    """A pb.Tensor's data as numpy (a BF16 tensor through DLPack, without a copy). The 2.51 stub
    cannot return a tensor's dtype to Python (triton_dtype() raises), so BF16 shows itself by
    as_numpy() refusing it."""
    try:
        return tensor.as_numpy()
    except Exception as exc:
        if "BF16" not in str(exc):
            raise
    import torch

    return torch.from_dlpack(tensor.to_dlpack()).view(torch.int16).numpy().view(BFLOAT16)

# parameters that name a file or folder: a relative one is relative to the model's folder (the
# rendered repository links what a model needs there, so no configuration shows a host path)
PATH_PARAMS = ("checkpoint", "gguf")


def model_params(args: dict) -> dict[str, str]:
    """The `parameters { key: ... value: { string_value: ... } }` of a model's config, with each of
    PATH_PARAMS resolved against the model's folder (`args["model_repository"]`)."""
    config = json.loads(args["model_config"])
    params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
    for name in PATH_PARAMS:
        if params.get(name) and not os.path.isabs(params[name]):
            params[name] = os.path.join(args["model_repository"], params[name])
    return params

def read_inputs(pb, request, names) -> dict[str, np.ndarray | None]:
    """Every named input as numpy (None when an optional input is absent). Read inside `execute`."""
    out = {}
    for name in names:
        tensor = pb.get_input_tensor_by_name(request, name)
        out[name] = None if tensor is None else as_numpy(tensor)
    return out

def output_tensor(pb, name: str, value):
    """A pb.Tensor from numpy or torch: through DLPack for a tensor on a GPU (no host copy) and
    for bfloat16, which numpy cannot carry to the stub."""
    import torch

    if isinstance(value, np.ndarray) and value.dtype == BFLOAT16:
        value = to_torch(value)
    if isinstance(value, torch.Tensor):
        if value.is_cuda or value.dtype == torch.bfloat16:
            return pb.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(value.contiguous()))
        value = value.numpy()
    return pb.Tensor(name, np.ascontiguousarray(value))
