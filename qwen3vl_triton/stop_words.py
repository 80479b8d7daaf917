"""A checkpoint's end ids as the tensorrtllm backend's `stop_words_list`.

Generation stops at any end id of the checkpoint (`ModelSpec.end_ids`: the chat template's end of
turn, then `generation_config.json`'s eos ids). The `tensorrt_llm` contract carries one `end_id`
per request; the others travel as stop words, in the backend's format (its preprocessing model's
`_to_word_list_format`): `[batch, 2, n]` int32, row 0 the words' token ids one after the other
(padded with 0), row 1 each word's end offset (padded with -1). TensorRT-LLM stops at them on the
GPU; the CPU engine reads the same tensor (`stop_word_ids`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import InputError


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
