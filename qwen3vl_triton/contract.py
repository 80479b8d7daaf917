"""The `tensorrt_llm` contract (docs/design.md §3): the tensorrtllm backend's tensor names, the request
and response types every producer and the engine use, the stop request, the finish reasons, and
the one validation of a request's content.

Producers build an `LLMRequest` and convert it (`arrays`, `pb_tensors`, `infer_inputs`); the
engine parses one from input arrays (`LLMRequest.from_arrays`) and checks it (`validate`), as
does every process where request content enters (the language server's `start`, the vision
encoder for the token ids). No other module names a `tensorrt_llm` input.

End ids as stop words: generation stops at any end id of the checkpoint (`ModelSpec.end_ids`: the
chat template's end of turn, then `generation_config.json`'s eos ids). The contract carries one
`end_id` per request; the others travel as stop words, in the backend's format (its preprocessing
model's `_to_word_list_format`): `[batch, 2, n]` int32, row 0 the words' token ids one after the
other (padded with 0), row 1 each word's end offset (padded with -1). TensorRT-LLM stops at them on
the GPU; the CPU engine reads the same tensor (`stop_word_ids`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from qwen3vl_triton.arrays import scalar, single_sequence, to_numpy, to_torch
from qwen3vl_triton.errors import InputError

if TYPE_CHECKING:
    from qwen3vl_triton.model.checkpoint import ModelSpec

MODEL = "tensorrt_llm"

# The `tensorrt_llm` inputs (docs/design.md §3), as the tensorrtllm backend names them. `seed` is TensorRT-LLM
# 1.2's name; `random_seed` older backends'. `stop` ends the running requests of a request id.
INPUTS = (
    "input_ids", "input_lengths", "request_output_len", "end_id", "pad_id", "stop_words_list", "streaming",
    "temperature", "runtime_top_k", "runtime_top_p", "seed", "random_seed", "min_tokens",
    "prompt_embedding_table", "prompt_vocab_size", "mrope_rotary_cos_sin", "mrope_position_deltas",
    "prompt_table_extra_ids", "stop",
)
CONTRACT_INPUTS = INPUTS
OUTPUTS = ("output_ids", "sequence_length")
# What the vision encoder adds to a request (the table, the M-RoPE inputs and the rows' image ids);
# with the token ids, the `encode` ensemble's outputs (docs/design.md §5)
IMAGE_INPUTS = ("prompt_embedding_table", "prompt_vocab_size", "mrope_rotary_cos_sin", "mrope_position_deltas",
                "prompt_table_extra_ids")
ENCODE_OUTPUTS = ("input_ids", *IMAGE_INPUTS)

# postprocessing's inputs that it forwards to `tensorrt_llm` -> the tensorrt_llm input names (docs/design.md §3);
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
    "prompt_table_extra_ids": "prompt_table_extra_ids",
}


class FinishReason(str, enum.Enum):
    """Why a generation ended; the values are the strings clients see (`finish_reason`)."""

    STOP = "stop"  # an end id or a stop string
    LENGTH = "length"  # max tokens or the context
    CANCELLED = "cancelled"  # the client went away
    STOPPED = "stopped"  # a `stop` request ended it (it then ends as an ordinary request does)
    ERROR = "error"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class SamplingParams:
    """The contract's sampling inputs (`temperature`, `runtime_top_k`, `runtime_top_p`, `seed`); the
    defaults ask for greedy decoding without limits."""

    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # 1: no limit
    seed: int | None = None  # None: a fresh random seed

    def __post_init__(self):
        if not (self.temperature >= 0.0) or self.temperature > 100.0:
            raise InputError("temperature", f"must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise InputError("top_k", f"must be >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise InputError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not (0 <= self.seed < 2**64):
            raise InputError("seed", f"must be an unsigned 64-bit integer, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


# -- stop words ---------------------------------------------------------------------------------------
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


# -- the request ----------------------------------------------------------------------------------------
def _one(value, dtype) -> np.ndarray:
    return np.array([[value]], dtype)

def _seed(arrays: dict) -> int | None:
    """TensorRT-LLM 1.2's backend names the sampling seed `seed`; older backends `random_seed`."""
    seed, legacy = scalar(arrays, "seed", int), scalar(arrays, "random_seed", int)
    if seed is not None and legacy is not None and seed != legacy:
        raise InputError("seed", f"seed {seed} and random_seed {legacy} disagree; send one of them")
    return seed if seed is not None else legacy


@dataclass(eq=False)
class LLMRequest:
    """One `tensorrt_llm` request, in the units of the contract."""

    input_ids: np.ndarray  # (L,) prompt; ids >= vocab_size read the prompt table
    max_new_tokens: int  # request_output_len
    end_id: int | None = None  # generation also stops at every end id of the checkpoint
    stop_ids: tuple[int, ...] = ()  # stop_words_list's one-token words (the contract's stop words)
    table: Any = None  # prompt_embedding_table (rows, H): numpy (bfloat16 as ml_dtypes') or torch
    mrope_cos_sin: np.ndarray | None = None  # mrope_rotary_cos_sin, flat
    mrope_delta: int = 0  # mrope_position_deltas
    sampling: SamplingParams = field(default_factory=SamplingParams)
    pad_id: int | None = None
    streaming: bool = False
    min_tokens: int = 0  # min_tokens: no end token (end or stop id) before this many generated tokens
    # prompt_table_extra_ids (L,) uint64: per token, 0 for text, for an image token an id of its
    # image's content and its row in the image (`image_row_ids`); the KV-reuse key of image rows
    extra_ids: np.ndarray | None = None

    @property
    def prompt_vocab_size(self) -> int:
        return 0 if self.table is None else int(self.table.shape[0])

    # -- out: arrays (batch dimension 1), pb tensors, tritonclient inputs ----------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        """The request's input tensors. Inputs left at their defaults (no table, greedy sampling, not
        streaming) are left out, as the backend's defaults mean the same."""
        ids = np.asarray(self.input_ids).reshape(-1)
        out = {"input_ids": ids[None], "input_lengths": _one(ids.size, np.int32),
               "request_output_len": _one(self.max_new_tokens, np.int32)}
        if self.end_id is not None:
            out["end_id"] = _one(self.end_id, np.int32)
        if self.pad_id is not None:
            out["pad_id"] = _one(self.pad_id, np.int32)
        if self.stop_ids:
            out["stop_words_list"] = stop_words_list(self.stop_ids)
        if self.streaming:
            out["streaming"] = _one(True, bool)
        if self.min_tokens:
            out["min_tokens"] = _one(self.min_tokens, np.int32)
        s, default = self.sampling, SamplingParams()
        if s.temperature != default.temperature:
            out["temperature"] = _one(s.temperature, np.float32)
        if s.top_k != default.top_k:
            out["runtime_top_k"] = _one(s.top_k, np.int32)
        if s.top_p != default.top_p:
            out["runtime_top_p"] = _one(s.top_p, np.float32)
        if s.seed is not None:
            out["seed"] = _one(s.seed, np.uint64)
        table = None if self.table is None else to_numpy(self.table)
        out.update(image_arrays(table, self.mrope_cos_sin, self.mrope_delta, self.extra_ids))
        return out

    def pb_tensors(self, pb) -> list:
        """The inputs as Python-backend tensors (a bfloat16 table through DLPack)."""
        from qwen3vl_triton.backend.tensors import output_tensor

        return [output_tensor(pb, name, value) for name, value in self.arrays().items()]

    def infer_inputs(self) -> list:
        """The inputs as tritonclient gRPC inputs."""
        from qwen3vl_triton.clients.grpc_stream import infer_input

        return [infer_input(name, value) for name, value in self.arrays().items()]

    # -- in: the one parser -----------------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray | None], default_end_id: int | None = None, **fields):
        """The request that `tensorrt_llm` input arrays (batch dimension included: one sequence per
        request) carry; absent inputs take the contract's defaults (`end_id`: `default_end_id`).
        `fields`: fields of a subclass (the engine's bookkeeping)."""
        arrays = {k: v for k, v in arrays.items() if v is not None}
        ids = single_sequence(arrays, "input_ids").reshape(-1)
        length = scalar(arrays, "input_lengths", int, default=ids.size)
        if not 0 < length <= ids.size:
            raise InputError("input_lengths", f"must be in [1, {ids.size}] (the input_ids length), got {length}")
        table = None
        if "prompt_embedding_table" in arrays:
            table = single_sequence(arrays, "prompt_embedding_table")
            rows = scalar(arrays, "prompt_vocab_size", int, default=table.shape[0])
            if rows != table.shape[0]:
                raise InputError("prompt_vocab_size", f"is {rows} but prompt_embedding_table has {table.shape[0]} rows")
        cos_sin = single_sequence(arrays, "mrope_rotary_cos_sin") if "mrope_rotary_cos_sin" in arrays else None
        extra = None
        if "prompt_table_extra_ids" in arrays:
            extra = single_sequence(arrays, "prompt_table_extra_ids").reshape(-1)
            if extra.dtype.kind not in "iu":
                raise InputError("prompt_table_extra_ids", f"must be unsigned 64-bit ids, got {extra.dtype}")
            if extra.size < length:
                raise InputError("prompt_table_extra_ids", f"holds {extra.size} ids for {length} input tokens")
            extra = extra[:length].astype(np.uint64)
        sampling = SamplingParams(
            temperature=scalar(arrays, "temperature", float, default=0.0),
            top_k=scalar(arrays, "runtime_top_k", int, default=0),
            top_p=scalar(arrays, "runtime_top_p", float, default=1.0),
            seed=_seed(arrays),
        )
        return cls(
            input_ids=ids[:length],
            max_new_tokens=scalar(arrays, "request_output_len", int, required=True),
            end_id=scalar(arrays, "end_id", int, default=default_end_id),
            stop_ids=stop_word_ids(arrays.get("stop_words_list")),
            table=table,
            mrope_cos_sin=cos_sin,
            mrope_delta=scalar(arrays, "mrope_position_deltas", int, default=0),
            sampling=sampling,
            pad_id=scalar(arrays, "pad_id", int),
            streaming=scalar(arrays, "streaming", bool, default=False),
            min_tokens=scalar(arrays, "min_tokens", int, default=0),
            extra_ids=extra,
            **fields,
        )

    def validate(self, bounds: "Bounds") -> None:
        """Raise InputError naming the contract input that is wrong (see `validate`)."""
        validate(bounds, self.input_ids, max_new_tokens=self.max_new_tokens, table=self.table,
                 mrope_cos_sin=self.mrope_cos_sin, mrope_delta=self.mrope_delta, end_id=self.end_id)
        if self.extra_ids is not None and np.asarray(self.extra_ids).size != np.asarray(self.input_ids).size:
            raise InputError("prompt_table_extra_ids", f"holds {np.asarray(self.extra_ids).size} ids for "
                                                       f"{np.asarray(self.input_ids).size} input tokens")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise InputError("min_tokens", f"must be in [0, request_output_len = {self.max_new_tokens}], "
                                           f"got {self.min_tokens}")


def image_arrays(table, mrope_cos_sin=None, mrope_delta: int = 0, extra_ids=None) -> dict:
    """The image inputs (IMAGE_INPUTS, batch dimension 1) of a prompt table `(rows, H)` (numpy or
    torch, left as it is: the vision encoder's output may live on a GPU), M-RoPE inputs and the
    tokens' `prompt_table_extra_ids`; those without a value are left out."""
    out = {}
    if extra_ids is not None:
        out["prompt_table_extra_ids"] = np.asarray(extra_ids, dtype=np.uint64).reshape(1, -1)
    if table is not None:
        out["prompt_embedding_table"] = table[None]
        out["prompt_vocab_size"] = _one(int(table.shape[0]), np.int32)
    if mrope_cos_sin is not None:
        out["mrope_rotary_cos_sin"] = np.asarray(mrope_cos_sin).reshape(-1)[None]
    if mrope_cos_sin is not None or mrope_delta:
        out["mrope_position_deltas"] = _one(mrope_delta, np.int64)
    return out


def image_row_ids(image_hash: bytes, rows: int) -> np.ndarray:
    """`prompt_table_extra_ids` of one image's `rows` tokens: for row r, the first 8 bytes of
    SHA-256(image hash | r), never 0 (0 is a text token's). `image_hash`: the image's full content
    hash (the vision encoder's cache key: SHA-256 of its patch grid and pixel values)."""
    import hashlib

    out = np.empty(rows, np.uint64)
    for r in range(rows):
        digest = hashlib.sha256(image_hash + r.to_bytes(8, "little")).digest()
        out[r] = int.from_bytes(digest[:8], "little") or 1
    return out


def request_from_contract(arrays: dict, spec: "ModelSpec") -> tuple[LLMRequest, bool]:
    """An LLMRequest (and its `streaming` flag) from `tensorrt_llm` input tensors; `end_id`
    defaults to the checkpoint's."""
    req = LLMRequest.from_arrays(arrays, default_end_id=spec.end_id)
    return req, req.streaming


@dataclass(frozen=True)
class StopRequest:
    """Ends the running `tensorrt_llm` requests that carry `request_id` (the tensorrtllm backend's
    `stop` input): they finish as ordinary requests do, with the tokens they have. The request
    itself carries the contract's required inputs, with one token each."""

    request_id: str

    def arrays(self) -> dict[str, np.ndarray]:
        one = np.ones((1, 1), np.int32)
        return {"input_ids": one, "input_lengths": one, "request_output_len": one, "stop": np.ones((1, 1), np.bool_)}

    def infer_inputs(self) -> list:
        from qwen3vl_triton.clients.grpc_stream import infer_input

        return [infer_input(name, value) for name, value in self.arrays().items()]

    def json_body(self) -> dict:
        """The body of the HTTP generate_stream request."""
        return {"id": self.request_id, **{name: value.reshape(-1).tolist() for name, value in self.arrays().items()}}

    @staticmethod
    def asked(arrays: Mapping[str, np.ndarray | None]) -> bool:
        """Do these input arrays ask to stop (rather than generate)?"""
        stop = arrays.get("stop")
        return stop is not None and bool(np.asarray(stop).any())

    @staticmethod
    def missing_id() -> InputError:
        return InputError("stop", "needs the request id of the requests to stop")


@dataclass
class LLMResponse:
    """One `tensorrt_llm` response: new token ids (streaming) or all of them."""

    output_ids: np.ndarray  # (n,) int32

    def arrays(self) -> dict[str, np.ndarray]:
        ids = np.asarray(self.output_ids, dtype=np.int32).reshape(1, 1, -1)
        return {"output_ids": ids, "sequence_length": np.asarray([[ids.shape[-1]]], dtype=np.int32)}

    def pb_tensors(self, pb) -> list:
        return [pb.Tensor(name, value) for name, value in self.arrays().items()]

    @classmethod
    def from_result(cls, result) -> "LLMResponse":
        """A tritonclient result's response (no `output_ids`: a response without tokens)."""
        ids = result.as_numpy("output_ids")
        return cls(np.zeros(0, np.int32) if ids is None else ids.reshape(-1))

    @staticmethod
    def requested_outputs() -> list:
        """What a caller asks for: the token ids only."""
        import tritonclient.grpc as grpcclient

        return [grpcclient.InferRequestedOutput("output_ids")]


# -- the one validation of request content -----------------------------------------------------------------
@dataclass(frozen=True)
class Bounds:
    """What request content is checked against: the model's sizes and the serving limits."""

    vocab_size: int  # prompt-table ids start here
    hidden_size: int
    levels: int  # DeepStack levels stacked under the embeddings
    max_positions: int  # the model's max_position_embeddings
    rotary_dim: int | None = None  # values per position of mrope_rotary_cos_sin
    max_seq_len: int | None = None  # prompt + generated tokens: a prompt must be shorter
    max_output_len: int | None = None  # the most new tokens one request may ask for

    @classmethod
    def of(cls, spec: "ModelSpec", max_seq_len: int | None = None, max_output_len: int | None = None) -> "Bounds":
        return cls(spec.vocab_size, spec.hidden_size, spec.deepstack_levels, spec.max_position_embeddings,
                   spec.rotary_dim, max_seq_len, max_output_len)


def check_input_ids(bounds: Bounds, input_ids, name: str = "input_ids") -> np.ndarray:
    """The token ids, flat: integers, not empty, not negative, shorter than the context."""
    ids = np.asarray(input_ids).reshape(-1)
    if ids.dtype.kind not in "iu":
        raise InputError(name, f"must be integer token ids, got {ids.dtype}")
    if ids.size == 0:
        raise InputError(name, "is empty")
    if bounds.max_seq_len is not None and ids.size >= bounds.max_seq_len:
        raise InputError(name, f"{ids.size} tokens, the context limit is {bounds.max_seq_len}")
    if ids.min() < 0:
        raise InputError(name, f"negative token id {int(ids.min())}")
    return ids


def validate(bounds: Bounds, input_ids, max_new_tokens: int | None = None, table=None, table_rows: int | None = None,
             mrope_cos_sin=None, mrope_delta: int = 0, end_id: int | None = None,
             names: Mapping[str, str] | None = None) -> None:
    """Check a request's content where it enters a process; raise InputError naming the input.

    Token ids against the vocabulary and the table's stride, the table's shape, dtype and values
    (or, before its rows arrive, its row count `table_rows`), the M-RoPE angles' size and values,
    the position delta against the model's positions, the end id. `names` renames contract inputs
    to the names the caller's own inputs have (the language server's `max_tokens`, `table_rows`)."""
    names = names or {}
    name = lambda n: names.get(n, n)  # noqa: E731
    ids = check_input_ids(bounds, input_ids, name("input_ids"))
    n = ids.size
    if max_new_tokens is not None:
        if bounds.max_output_len is not None and not 1 <= max_new_tokens <= bounds.max_output_len:
            raise InputError(name("request_output_len"),
                             f"must be in [1, {bounds.max_output_len}], got {max_new_tokens}")
        if max_new_tokens < 1:
            raise InputError(name("request_output_len"), f"must be >= 1, got {max_new_tokens}")
    if table is not None:
        table = to_torch(table)
        if not table.is_floating_point():
            raise InputError(name("prompt_embedding_table"), f"must be a floating-point tensor, got {table.dtype}")
        if table.ndim != 2 or table.shape[1] != bounds.hidden_size:
            raise InputError(name("prompt_embedding_table"),
                             f"must be [rows, {bounds.hidden_size}], got {list(table.shape)}")
        table_rows = table.shape[0]
    stride = 0
    if table_rows is not None:
        from qwen3vl_triton.model.table import stride_of

        try:
            stride = stride_of(table_rows, bounds.levels)
        except ValueError as exc:
            raise InputError(name("prompt_embedding_table"), str(exc)) from None
    if table is not None:
        import torch

        if not bool(torch.isfinite(table).all()):
            raise InputError(name("prompt_embedding_table"), "holds NaN or infinite values")
    if int(ids.max()) >= bounds.vocab_size + stride:
        raise InputError(name("input_ids"),
                         f"id {int(ids.max())} is neither a vocabulary id (< {bounds.vocab_size}) nor one of the "
                         f"{stride} image rows of the table (< {bounds.vocab_size + stride})")
    if mrope_cos_sin is not None:
        flat = np.asarray(mrope_cos_sin).reshape(-1)
        rotary = bounds.rotary_dim
        if rotary and (flat.size % rotary or flat.size // rotary < n):
            raise InputError(name("mrope_rotary_cos_sin"),
                             f"must hold at least {n} positions of {rotary} values, got {flat.size} values")
        if not np.isfinite(flat).all():
            raise InputError(name("mrope_rotary_cos_sin"),
                             "must hold cosines and sines: finite values in [-1, 1]; it holds NaN or Inf")
        if np.abs(flat).max(initial=0) > 1:
            raise InputError(name("mrope_rotary_cos_sin"), "must hold cosines and sines: finite values in [-1, 1]")
    # decode positions run from L + delta to (the sequence's last token) + delta, all within the model's
    longest = n + (max_new_tokens or 1)
    if bounds.max_seq_len is not None:
        longest = min(longest, bounds.max_seq_len)
    low, high = -n, bounds.max_positions - longest
    if not low <= mrope_delta <= high:
        raise InputError(name("mrope_position_deltas"),
                         f"must be in [{low}, {high}] for a prompt of {n} tokens and {name('request_output_len')} "
                         f"{max_new_tokens}, got {mrope_delta}")
    if end_id is not None and not 0 <= end_id < bounds.vocab_size:
        raise InputError(name("end_id"), f"must be a vocabulary id, got {end_id}")
