"""Arrays as requests carry them: dtypes (bfloat16 included) and per-request values.

Shared by the Triton glue, the engine and the clients; nothing here depends on Triton.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from qwen3vl_triton.errors import InputError

# numpy has no bfloat16; ml_dtypes' (the dtype tritonclient uses for BF16) holds bf16 tables as
# numpy arrays. They cross the Python backend through DLPack: the stub refuses as_numpy() and
# pb.Tensor(name, array) for BF16.
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a serving dtype name ("float32", "float16", "bfloat16")."""
    return BFLOAT16 if name == "bfloat16" else np.dtype(name)

def config_type(name: str) -> str:
    """The model-config data type (`TYPE_FP32`, ...) of a serving dtype name, through tritonclient's map."""
    from tritonclient.utils import np_to_triton_dtype

    return "TYPE_" + np_to_triton_dtype(numpy_dtype(name))

def to_torch(array):
    """A torch tensor over a numpy array (bfloat16 included), without a copy."""
    import torch

    if isinstance(array, torch.Tensor):
        return array
    array = np.ascontiguousarray(array)
    if array.dtype == BFLOAT16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)

def scalar(arrays: dict, name: str, kind, default=None, required: bool = False):
    """The single value of a `[1]`-shaped input (batch dimension included), converted by `kind`."""
    value = arrays.get(name)
    if value is None:
        if required:
            raise InputError(name, "is required")
        return default
    if value.size != 1:
        raise InputError(name, f"expected one value, got shape {list(value.shape)}")
    return kind(value.reshape(-1)[0])

def single_sequence(arrays: dict, name: str) -> np.ndarray:
    """A per-request tensor with the batch dimension removed; a batch of more than one is refused."""
    value = arrays.get(name)
    if value is None:
        raise InputError(name, "is required")
    if value.ndim == 0 or value.shape[0] != 1:
        raise InputError(name, f"send one sequence per request (batch size 1), got shape {list(value.shape)}")
    return value[0]

def to_numpy(array) -> np.ndarray:
    """A numpy array over a (CPU) torch tensor or numpy array, bfloat16 as ml_dtypes' type."""
    if not type(array).__module__.startswith("torch"):
        return np.asarray(array)
    import torch

    if array.dtype == torch.bfloat16:
        return array.detach().cpu().contiguous().view(torch.int16).numpy().view(BFLOAT16)
    return array.detach().cpu().numpy()
