"""The `tensorrt_llm` contract: the tensorrtllm backend's input names, stop words, and the
engine request parsed from the tensors.

End ids as stop words: generation stops at any end id of the checkpoint (`ModelSpec.end_ids`: the
chat template's end of turn, then `generation_config.json`'s eos ids). The contract carries one
`end_id` per request; the others travel as stop words, in the backend's format (its preprocessing
model's `_to_word_list_format`): `[batch, 2, n]` int32, row 0 the words' token ids one after the
other (padded with 0), row 1 each word's end offset (padded with -1). TensorRT-LLM stops at them on
the GPU; the CPU engine reads the same tensor (`stop_word_ids`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qwen3vl_triton.arrays import scalar, single_sequence, to_torch
from qwen3vl_triton.engine.scheduler import Request
from qwen3vl_triton.errors import InputError
from qwen3vl_triton.model.checkpoint import ModelSpec
from qwen3vl_triton.model.sampling import SamplingParams


def stop_words_list(ids: Sequence[int]) -> np.ndarray:
    """`[1, 2, n]`: every id in `ids` a one-token stop word."""
    ids = [int(i) for i in ids]
    return np.array([[ids, list(range(1, len(ids) + 1))]], dtype=np.int32).reshape(1, 2, len(ids))

def stop_word_ids(words: np.ndarray | None) -> tuple[int, ...]:
    """The one-token stop words of one request's `stop_words_list` (`[1, 2, n]` or `[2, n]`)."""
    if words is None:
        return ()
    words = np.asarray(words)
    if words.ndim == 3 and words.shape[0] == 1:
        words = words[0]
    if words.ndim != 2 or words.shape[0] != 2:
        raise InputError("stop_words_list", f"must be [2, n] per request (token ids, end offsets), got "
                                            f"{list(words.shape)}")
    flat, offsets = words[0].tolist(), [int(o) for o in words[1] if o >= 0]
    out, start = [], 0
    for end in offsets:
        if not start < end <= len(flat):
            raise InputError("stop_words_list", f"offsets {offsets} must increase within the {len(flat)} ids")
        if end - start != 1:
            raise InputError("stop_words_list", "the CPU engine stops at one-token words only (end ids); "
                                                f"got a word of {end - start} tokens")
        out.append(int(flat[start]))
        start = end
    return tuple(out)



# The `tensorrt_llm` inputs (DESIGN §3), as the tensorrtllm backend names them.
CONTRACT_INPUTS = (
    "input_ids", "input_lengths", "request_output_len", "end_id", "pad_id", "stop_words_list", "streaming",
    "temperature", "runtime_top_k", "runtime_top_p", "seed", "random_seed", "min_tokens",
    "prompt_embedding_table", "prompt_vocab_size", "mrope_rotary_cos_sin", "mrope_position_deltas",
)

def _seed(arrays: dict) -> int | None:
    """TensorRT-LLM 1.2's backend names the sampling seed `seed`; older backends `random_seed`."""
    seed, legacy = scalar(arrays, "seed", int), scalar(arrays, "random_seed", int)
    if seed is not None and legacy is not None and seed != legacy:
        raise InputError("seed", f"seed {seed} and random_seed {legacy} disagree; send one of them")
    return seed if seed is not None else legacy

def request_from_contract(arrays: dict, spec: ModelSpec) -> tuple[Request, bool]:
    """An engine Request (and the `streaming` flag) from `tensorrt_llm` input tensors.

    Each tensor carries the batch dimension (one sequence per request)."""
    ids = single_sequence(arrays, "input_ids").reshape(-1)
    length = scalar(arrays, "input_lengths", int, default=ids.size)
    if not 0 < length <= ids.size:
        raise InputError("input_lengths", f"must be in [1, {ids.size}] (the input_ids length), got {length}")
    table = None
    if arrays.get("prompt_embedding_table") is not None:
        table = to_torch(single_sequence(arrays, "prompt_embedding_table"))
        rows = scalar(arrays, "prompt_vocab_size", int, default=table.shape[0])
        if rows != table.shape[0]:
            raise InputError("prompt_vocab_size", f"is {rows} but prompt_embedding_table has {table.shape[0]} rows")
    cos_sin = arrays.get("mrope_rotary_cos_sin")
    if cos_sin is not None:
        cos_sin = single_sequence(arrays, "mrope_rotary_cos_sin")
    sampling = SamplingParams(
        temperature=scalar(arrays, "temperature", float, default=0.0),
        top_k=scalar(arrays, "runtime_top_k", int, default=0),
        top_p=scalar(arrays, "runtime_top_p", float, default=1.0),
        seed=_seed(arrays),
    )
    req = Request(
        input_ids=ids[:length],
        max_new_tokens=scalar(arrays, "request_output_len", int, required=True),
        end_id=scalar(arrays, "end_id", int, default=spec.end_id),
        stop_ids=stop_word_ids(arrays.get("stop_words_list")),
        table=table,
        mrope_cos_sin=cos_sin,
        mrope_delta=scalar(arrays, "mrope_position_deltas", int, default=0),
        sampling=sampling,
        min_tokens=scalar(arrays, "min_tokens", int, default=0),
    )
    return req, scalar(arrays, "streaming", bool, default=False)



# postprocessing's inputs that it forwards to `tensorrt_llm` -> the tensorrt_llm input names (DESIGN §3);
# it adds `streaming`, and `stop` to end a request
LLM_INPUT_NAMES = {
    "input_ids": "input_ids",
    "input_lengths": "input_lengths",
    "request_output_len": "request_output_len",
    "end_id": "end_id",
    "pad_id": "pad_id",
    "stop_words_list": "stop_words_list",
    "temperature": "temperature",
    "top_k": "runtime_top_k",
    "top_p": "runtime_top_p",
    "seed": "seed",
    "min_length": "min_tokens",  # the TensorRT-LLM ensemble's older name of min_tokens
    "min_tokens": "min_tokens",
    "prompt_embedding_table": "prompt_embedding_table",
    "prompt_vocab_size": "prompt_vocab_size",
    "mrope_rotary_cos_sin": "mrope_rotary_cos_sin",
    "mrope_position_deltas": "mrope_position_deltas",
}
