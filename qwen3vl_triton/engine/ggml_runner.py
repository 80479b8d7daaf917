"""The engine's ggml runner: each step on llama.cpp's kernels, behind the project's own Scheduler.

The engine's `Scheduler` (admission, slots, cancellation, stop words, statistics) and its
sampling (`sampling.sample`, so seeded sampling picks the same tokens as the torch runner for
the same logits) stay as they are; `GgmlRunner.run(plan)` replaces `Runner.run`: every
sequence's new tokens go through llama.cpp's Qwen3-VL-MoE text model (`src/models/qwen3vlmoe.cpp`)
through llama-cpp-python's low-level C API, and the logits come back with `llama_get_logits_ith`.

How the `tensorrt_llm` contract reaches llama.cpp:

- **Prompt-table rows** (ids >= vocab_size) are embedding rows. llama.cpp's embedding input for
  a DeepStack model is `n_embd * (1 + n_deepstack_layers)` floats per token,
  `[main | level 0 | level 1 | level 2]`, and it adds level k after decoder layer k: the
  row-stacked table `[E; D0; D1; D2]` (docs/design.md §3) read at fake id `vocab + j` is rows
  `j, S + j, 2S + j, 3S + j` side by side. Text tokens (and decoded tokens) are token ids.
- **A batch holds token ids or embedding rows, never both** (llama_batch_allocr refuses a mix),
  so a step is one `llama_decode` of token runs (every decoding sequence and every text run of
  a prompt chunk) and, when a chunk holds image rows, alternating calls in each sequence's
  order: tokens, rows, tokens, ... Steps without image rows -- all decode steps, text prompts --
  are one call.
- **M-RoPE positions**: llama.cpp takes positions, not rotary tables: four per embedding row,
  laid out section-major `[t...][h...][w...][0...]`, one per token-id row (used for t, h and w,
  which are equal for text). The contract carries `mrope_rotary_cos_sin` (per prompt position
  and rotary frequency, the cosine and sine of the angle) and `mrope_position_deltas`; decoded
  tokens are at `index + delta` on all rows. The prompt's integer positions are recovered from
  the angles (`positions_from_cos_sin`): for each of t, h, w the lowest frequency it drives
  gives the position without wrap-around, higher ones refine it, and the recovered positions
  are checked by recomputing the table (a table that is not M-RoPE of integer positions fails
  its request, naming the input). So the ggml runner needs no input beyond the contract; the
  CPU `tensorrt_llm` may still take explicit position ids (docs/design.md §3) where a producer has them.
- **KV cache**: llama.cpp's memory, one llama sequence id per engine slot. The cache is unified
  (one pool of cells for all sequences: any mix of sequences fits one ubatch, and a slot move
  is a metadata copy, `llama_memory_seq_cp` + `seq_rm`); a claimed, moved-into or released
  slot is emptied with `llama_memory_seq_rm`. Flash attention is on: masked cells are skipped,
  so a NaN left in a free cell never reaches another sequence. float32 serving keeps f32 cells
  (needed for fp32 parity), the other dtypes f16.

llama.cpp assumes every decoder layer is MoE and interleaved M-RoPE without attention biases:
`unsupported_reason` says why a checkpoint cannot be served, and `GgmlRunner` refuses it with
that reason (the engine then runs the torch runner when asked for `auto`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qwen3vl_triton.engine.ggml_weights import GGUF_TYPES, ensure_text_gguf
from qwen3vl_triton.model.checkpoint import ModelSpec
from qwen3vl_triton.model.mrope import position_rows, positions_from_cos_sin, recoverable  # noqa: F401
from qwen3vl_triton.model.sampling import NonFiniteLogits, sample
from qwen3vl_triton.model.table import stride_of

log = logging.getLogger(__name__)


# Table values the runner takes: the model squares hidden states in its RMS norms, and a row of
# such values still squares and sums to a finite float32. Anything larger (the engine's checks
# let any finite value through) could overflow to inf/NaN inside the model, and a non-finite
# value in a KV cell reaches every query that attends over it, masked or not (0 * NaN) -- other
# sequences' too, once the cell is reused -- so such a request fails alone, before it runs.
TABLE_BOUND = 1e15

LLAMA_MAX_SEQ = 256  # llama.cpp's bound on a context's sequences (src/llama-cparams.h)


class Unsupported(RuntimeError):
    """llama.cpp cannot serve this checkpoint (or is not installed); the message says why."""


def unsupported_reason(spec: ModelSpec) -> str | None:
    """Why llama.cpp's Qwen3-VL-MoE text model cannot serve `spec`, or None."""
    dense = [i for i in range(spec.num_layers) if not spec.is_moe_layer(i)]
    if dense:
        return (f"llama.cpp's Qwen3-VL-MoE model makes every decoder layer MoE, and this checkpoint has dense "
                f"layers {dense} (mlp_only_layers {list(spec.mlp_only_layers)}, decoder_sparse_step "
                f"{spec.decoder_sparse_step}, num_experts {spec.num_experts})")
    if not spec.mrope_interleaved:
        return "llama.cpp's Qwen3-VL-MoE model applies interleaved M-RoPE; this checkpoint's mrope_interleaved is false"
    text = getattr(spec.config, "text_config", None)
    if getattr(text, "attention_bias", False):
        return "llama.cpp's Qwen3-VL-MoE model has no attention biases; this checkpoint's attention_bias is true"
    rope = getattr(text, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        return (f"llama.cpp's Qwen3-VL-MoE path here takes default RoPE; this checkpoint's rope_type is "
                f"{rope['rope_type']!r}")
    if not recoverable(spec):
        return (f"positions up to {spec.max_position_embeddings} cannot be recovered from mrope_rotary_cos_sin "
                f"(rope_theta {spec.rope_theta}, head_dim {spec.head_dim}): the runner needs position ids")
    return None


# -- llama.cpp through llama-cpp-python -----------------------------------------------------------------------------

_llama = None
_init_lock = threading.Lock()
_log_callback = None


def llama_cpp():
    """The `llama_cpp` bindings, loaded and initialised once (backends, logging). Unsupported when
    llama-cpp-python is not installed."""
    global _llama, _log_callback
    with _init_lock:
        if _llama is not None:
            return _llama
        try:
            import llama_cpp as lib
        except Exception as exc:  # not built/installed, or its library does not load
            raise Unsupported(f"llama-cpp-python is not usable here ({type(exc).__name__}: {exc}); `make venv` "
                              f"builds it") from None

        # llama.cpp logs every load and context detail on stderr: keep warnings and errors
        # (levels: 1 debug, 2 info, 3 warn, 4 error, 5 continuation of the previous message)
        last = [0]

        @lib.llama_log_callback
        def _forward(level, text, _user):
            if level != 5:
                last[0] = level
            if last[0] in (3, 4) and text and text.strip():
                log.warning("llama.cpp: %s", text.decode(errors="replace").rstrip())

        _log_callback = _forward  # referenced for the process's lifetime
        lib.llama_log_set(_log_callback, ctypes.c_void_p())
        _load_backend_variants(lib)
        lib.llama_backend_init()
        _llama = lib
        return lib


def _load_backend_variants(lib) -> None:
    """A portable build (GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS) ships its CPU kernels as
    libggml-cpu-<variant>.so beside libllama, loaded at run time; ggml looks for them beside the
    executable (python's bin/), so point it at the package's lib/ folder."""
    libdir = Path(lib.__file__).parent / "lib"
    if not any(libdir.glob("libggml-cpu-*.so")):
        return  # a native build: the CPU backend is linked in
    ggml = ctypes.CDLL(str(libdir / "libggml.so"), mode=ctypes.RTLD_GLOBAL)
    ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_load_all_from_path(str(libdir).encode())


class DecodeError(RuntimeError):
    def __init__(self, rc: int):
        # 1: no KV cells, -1: invalid batch -- the memory is as before the call;
        # 2: aborted, < -1: fatal -- the ubatches already computed stay in the memory
        self.rc, self.restored = rc, rc in (1, -1)
        super().__init__(f"llama_decode returned {rc}")


@dataclass
class Segment:
    """Tokens of one kind for one call: token ids, or embedding rows. One sequence's run of a
    prompt chunk, or many sequences' decoded tokens at once (`seq` per token)."""

    seq: np.ndarray  # (n,) int32 llama sequence id of each token
    pos: np.ndarray  # (n,) int32 for ids; (4, n) section rows t, h, w, 0 for rows
    ids: np.ndarray | None = None  # (n,) int32
    rows: np.ndarray | None = None  # (n, n_embd_inp) float32
    out: np.ndarray | None = None  # (n,) bool: logits for these tokens (None: none)

    @classmethod
    def of(cls, seq_id: int, pos, ids=None, rows=None, outputs: str = "none") -> "Segment":
        """One sequence's run; `outputs`: "none", "last" or "all" tokens' logits."""
        n = len(ids) if ids is not None else len(rows)
        out = None if outputs == "none" else np.ones(n, bool) if outputs == "all" else np.arange(n) == n - 1
        return cls(np.full(n, seq_id, np.int32), np.asarray(pos, np.int32), ids, rows, out)

    @property
    def embd(self) -> bool:
        return self.rows is not None

    def __len__(self) -> int:
        return len(self.seq)

    def outputs(self) -> int:
        return 0 if self.out is None else int(self.out.sum())


def kv_cells_attention(kv_type: str) -> bool:
    """Whether the ggml runner's attention is flash attention over KV cells of `kv_type`: not over
    f32 cells (llama.cpp's flash attention casts them to f16 each step, llama-graph.cpp
    build_attn_mha, which float32 parity with the oracle cannot take)."""
    return kv_type != "f32"


def kv_cells(dtype: str) -> tuple[str, bool]:
    """The ggml runner's KV cells for weights in `dtype`, and whether it attends with flash
    attention: f32 cells and plain attention for float32 serving (parity with the float32 oracle),
    f16 cells with flash attention for bfloat16 and the quantized types. The bench gives
    llama-server the same, so both sides keep the same caches."""
    kv_type = "f32" if dtype == "float32" else "f16"
    return kv_type, kv_cells_attention(kv_type)


class LlamaText:
    """A llama.cpp model and context over a text GGUF: `decode` runs segments of one kind in one
    `llama_decode` and returns the logits asked for."""

    def __init__(self, gguf: Path, seqs: int, max_len: int, n_batch: int, threads: int, kv_type: str,
                 unified: bool = False, flash_attn: bool = False, n_ubatch: int = 512):
        lib = self.lib = llama_cpp()
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(str(gguf).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        cparams = lib.llama_context_default_params()
        cparams.n_seq_max = seqs
        cparams.n_ctx = seqs * -(-max_len // 256) * 256  # llama.cpp pads each sequence's cells to 256
        cparams.n_batch = n_batch
        cparams.n_ubatch = min(n_batch, n_ubatch)
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.type_k = cparams.type_v = {"f32": lib.GGML_TYPE_F32, "f16": lib.GGML_TYPE_F16}[kv_type]
        # flash attention casts f32 cells to f16 (llama-graph.cpp build_attn_mha): off for f32 cells
        cparams.flash_attn_type = (lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                   else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        cparams.kv_unified = unified
        cparams.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context for {gguf} ({seqs} sequences of {max_len})")
        self.mem = lib.llama_get_memory(self.ctx)
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.n_embd = lib.llama_model_n_embd(self.model)
        self.n_embd_inp = lib.llama_model_n_embd_inp(self.model)
        self.n_batch, self.seqs, self.unified = n_batch, seqs, unified
        self.threads = (threads, threads)
        # one set of batch buffers, reused by every call (llama_decode copies what it reads)
        self._ids = np.zeros(n_batch, np.int32)
        self._pos = np.zeros(4 * n_batch, np.int32)
        self._nseq = np.ones(n_batch, np.int32)
        self._seq = np.zeros(n_batch, np.int32)
        self._seq_ptrs = (self._seq.ctypes.data + 4 * np.arange(n_batch, dtype=np.uint64)).astype(np.uint64)
        self._out = np.zeros(n_batch, np.int8)
        self._rows: np.ndarray | None = None  # (n_batch, n_embd_inp), at the first embedding call
        self._batches: dict = {}

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self.lib.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def set_threads(self, threads: int) -> None:
        if self.threads != (threads, threads):
            self.lib.llama_set_n_threads(self.ctx, threads, threads)
            self.threads = (threads, threads)

    # -- memory -----------------------------------------------------------------------------------
    def clear(self, seq_id: int) -> None:
        self.lib.llama_memory_seq_rm(self.mem, seq_id, -1, -1)

    def move(self, src: int, dst: int) -> None:
        self.clear(dst)
        self.lib.llama_memory_seq_cp(self.mem, src, dst, -1, -1)
        self.clear(src)

    def copy_seq(self, src: int, dst: int, cut_position: int = -1) -> int:
        """Sequence `dst` := the cells of sequence `src` (their K and V rows, positions included),
        then without those from t position `cut_position` on (-1: all kept); returns the bytes
        copied. Through llama.cpp's sequence state (`llama_state_seq_get_data_ext`, then
        `_set_data_ext` into `dst`): only the cells `src` holds are copied. `llama_memory_seq_cp`
        between two streams copies both streams' whole buffers (every cell of max_len, used or
        not: 64 MiB on `small` in float32 for a prefix of a few hundred tokens). `dst` gets the
        cells in `src`'s order from the start of its emptied stream, the layout a prefill there
        would give them."""
        lib = self.lib
        size = lib.llama_state_seq_get_size_ext(self.ctx, src, 0)
        state = np.empty(size, np.uint8)  # for this copy only (a kept buffer would hold the largest one)
        buf = state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        written = lib.llama_state_seq_get_data_ext(self.ctx, buf, size, src, 0) if size else 0
        if not written or lib.llama_state_seq_set_data_ext(self.ctx, buf, written, dst, 0) != written:
            self.clear(dst)
            raise RuntimeError(f"llama.cpp could not copy sequence {src} into {dst} ({size} bytes of state)")
        if cut_position >= 0:
            lib.llama_memory_seq_rm(self.mem, dst, cut_position, -1)
        return written

    # -- one call -------------------------------------------------------------------------------
    def _batch(self, embd: bool):
        """The llama_batch over this context's buffers (built once per kind; n_tokens per call)."""
        batch = self._batches.get(embd)
        if batch is None:
            lib = self.lib
            if embd and self._rows is None:
                self._rows = np.zeros((self.n_batch, self.n_embd_inp), np.float32)
            batch = self._batches[embd] = lib.llama_batch(
                n_tokens=0,
                token=None if embd else self._ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
                embd=self._rows.ctypes.data_as(ctypes.POINTER(ctypes.c_float)) if embd else None,
                pos=self._pos.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
                n_seq_id=self._nseq.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
                seq_id=ctypes.cast(self._seq_ptrs.ctypes.data, ctypes.POINTER(ctypes.POINTER(ctypes.c_int32))),
                logits=self._out.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
            )
        return batch

    def decode(self, segments: list[Segment]) -> list:
        """One `llama_decode` of `segments` (all token ids or all embedding rows, at most n_batch
        tokens); per segment the logits `[k, vocab]` (float32) of its k tokens marked `out`, or None.

        The tokens go in ascending sequence id (stable): without a unified cache llama.cpp puts
        sequences in one ubatch only in that order."""
        n = sum(len(s) for s in segments)
        if n == 0:
            return [None] * len(segments)
        if n > self.n_batch:
            raise ValueError(f"{n} tokens in one call; the context takes {self.n_batch}")
        embd = segments[0].embd
        if any(s.embd != embd for s in segments):
            raise ValueError("a llama.cpp batch holds token ids or embedding rows, not both")
        seq = np.concatenate([s.seq for s in segments])
        out = np.concatenate([s.out if s.out is not None else np.zeros(len(s), bool) for s in segments])
        order = np.argsort(seq, kind="stable")
        batch = self._batch(embd)  # allocates the rows buffer at the first embedding call
        self._seq[:n] = seq[order]
        self._out[:n] = out[order]
        if embd:
            self._rows[:n] = np.concatenate([s.rows for s in segments])[order]
            pos = np.concatenate([s.pos for s in segments], axis=1)[:, order]
            self._pos[:4 * n] = pos.reshape(-1)  # section-major: pos[j * n + i]
        else:
            self._ids[:n] = np.concatenate([s.ids for s in segments])[order]
            self._pos[:n] = np.concatenate([s.pos for s in segments])[order]
        batch.n_tokens = n
        rc = self.lib.llama_decode(self.ctx, batch)
        if rc != 0:
            raise DecodeError(rc)
        n_out = int(out.sum())
        if not n_out:
            return [None] * len(segments)
        # the outputs' logits, contiguous in batch order; back to the segments' order
        logits = np.ctypeslib.as_array(self.lib.llama_get_logits(self.ctx), shape=(n_out, self.n_vocab))
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(n)  # batch index of each segment token
        out_index = np.cumsum(self._out[:n]) - 1  # output row of each batch index
        rows = torch.from_numpy(logits[out_index[rank[out]]])  # fancy indexing copies out of llama.cpp's buffer
        results, at = [], 0
        for s in segments:
            k = s.outputs()
            results.append(rows[at:at + k] if k else None)
            at += k
        return results


class SlotCache:
    """The engine's KV-cache interface over llama.cpp's memory: `claim` (a new sequence takes a
    slot), `move` (the scheduler compacts slots) and `release` (a sequence ended; engine.Scheduler
    calls it when the cache has it), and the prefix cache's store (`keep`, `restore`, `drop`).

    Engine slots map to llama sequence ids: a claimed slot gets the lowest free id, emptied; a
    move only remaps (no KV data moves: with one stream per sequence a copy between streams
    would copy a whole stream); a release empties the id and frees it. Without a unified cache,
    llama.cpp puts several sequences in one ubatch only when their ids are consecutive, so the
    lowest free id keeps the running ids dense; a gap left by a finished sequence lasts until the
    next one is admitted (a step meanwhile runs as two ubatches).

    Prefix entries live in `spares` sequence ids beyond the engine's slots: a finished sequence
    is kept by keeping its id (no copy; the slot takes a free id next time), and a new sequence
    starts from an entry with `LlamaText.copy_seq`: the entry's cells only (llama.cpp's sequence
    state, out and in; `llama_memory_seq_cp` would copy the whole stream, every cell of max_len),
    then `llama_memory_seq_rm` from the cut position on. Each entry holds a whole stream
    (`stream_bytes`) whatever its length."""

    def __init__(self, llama: LlamaText, spares: int = 0, stream_bytes: int = 0):
        self.llama = llama
        self.ids: dict[int, int] = {}  # engine slot -> llama sequence id
        self.kept: set[int] = set()  # llama sequence ids that hold prefix entries
        self.spares, self.stream_bytes = spares, stream_bytes

    def seq_id(self, slot: int) -> int:
        return self.ids[slot]

    def claim(self, slot: int) -> None:
        self.ids.pop(slot, None)  # a finished sequence's slot that was never released
        used = set(self.ids.values()) | self.kept
        free = next(i for i in range(self.llama.seqs) if i not in used)
        self.llama.clear(free)
        self.ids[slot] = free

    def move(self, src: int, dst: int) -> None:
        self.ids[dst] = self.ids.pop(src)

    def release(self, slot: int) -> None:
        seq_id = self.ids.pop(slot, None)
        if seq_id is not None:
            self.llama.clear(seq_id)

    # -- prefix store (engine.prefix.PrefixStore) ----------------------------------------------------
    def keep(self, slot: int, tokens: int):
        if len(self.kept) >= self.spares or slot not in self.ids:
            return None
        seq_id = self.ids.pop(slot)
        self.kept.add(seq_id)
        return seq_id, self.stream_bytes

    def restore(self, handle: int, slot: int, tokens: int, cut_position: int) -> None:
        dst = self.ids[slot]
        self.llama.clear(dst)
        self.llama.copy_seq(handle, dst, cut_position)

    def drop(self, handle: int) -> None:
        self.kept.discard(handle)
        self.llama.clear(handle)

    def room(self) -> int:
        return self.spares - len(self.kept)

    def cost(self, tokens: int) -> int:
        return self.stream_bytes


# -- the runner ------------------------------------------------------------------------------------------------------

class GgmlRunner:
    """`Runner`'s contract (see engine.Runner) on llama.cpp. Threads: as the torch runner, a step
    that prefills one prompt of at least `parallel_min_tokens` tokens alone runs on `threads`,
    every other step on `shared_threads`."""

    name = "ggml"

    def __init__(self, spec: ModelSpec, dtype: str = "float32", slots: int = 16, max_len: int = 4096,
                 max_num_tokens: int = 1024, threads: int | None = None, shared_threads: int = 1,
                 parallel_min_tokens: int = 64, gguf: str | Path | None = None, build_dir: str | Path | None = None,
                 kv_type: str | None = None, unified: bool = False, flash_attn: bool | None = None, log=print,
                 prefix_bytes: int = 0):
        """`prefix_bytes`: the prefix cache's budget; it buys whole llama.cpp sequences
        (`SlotCache`), allocated with the context. `prefix_note` says why it bought none."""
        reason = unsupported_reason(spec)
        if reason is not None:
            raise Unsupported(reason)
        if dtype not in GGUF_TYPES:
            raise Unsupported(f"the ggml runner serves dtype {', '.join(GGUF_TYPES)}; got {dtype!r}")
        llama_cpp()  # Unsupported when llama-cpp-python is missing, before any conversion
        self.spec, self.dtype = spec, dtype
        self.gguf = Path(gguf) if gguf is not None else ensure_text_gguf(spec.path, dtype, build_dir, log)
        self.threads = threads or os.cpu_count() or 1
        self.shared_threads, self.parallel_min_tokens = min(shared_threads, self.threads), parallel_min_tokens
        self.kv_type = kv_type or kv_cells(dtype)[0]
        cells = -(-max_len // 256) * 256  # llama.cpp pads each sequence's cells to 256
        stream_bytes = cells * 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * (4 if self.kv_type == "f32"
                                                                                           else 2)
        spares = min(prefix_bytes // stream_bytes, LLAMA_MAX_SEQ - slots) if prefix_bytes else 0
        self.prefix_note = None if spares or not prefix_bytes else (
            f"prefix KV reuse is off: kv_cache_bytes {prefix_bytes} holds no llama.cpp sequence of {cells} cells "
            f"({stream_bytes} bytes)")
        self.llama = LlamaText(self.gguf, seqs=slots + spares, max_len=max_len, n_batch=max_num_tokens + slots,
                               threads=self.shared_threads, kv_type=self.kv_type, unified=unified,
                               flash_attn=kv_cells_attention(self.kv_type) if flash_attn is None else flash_attn)
        if self.llama.n_vocab != spec.vocab_size or self.llama.n_embd != spec.hidden_size:
            raise RuntimeError(f"{self.gguf}: vocab {self.llama.n_vocab}, hidden {self.llama.n_embd}; the checkpoint "
                               f"has {spec.vocab_size}, {spec.hidden_size}")
        if self.llama.n_embd_inp != spec.hidden_size * (1 + spec.deepstack_levels):
            raise RuntimeError(f"{self.gguf}: embedding rows of {self.llama.n_embd_inp} floats; the checkpoint's "
                               f"table needs {spec.hidden_size} x (1 + {spec.deepstack_levels} DeepStack levels)")
        self.cache = SlotCache(self.llama, spares, stream_bytes)
        self._positions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # _Seq -> (3, prompt_len)

    def close(self) -> None:
        self.llama.close()

    # -- a plan --------------------------------------------------------------------------------
    def run(self, plan) -> list:
        """Per sequence of the plan: its next token, None (its prompt goes on), or the exception
        that failed it."""
        alone = len(plan) == 1 and plan[0][1] >= self.parallel_min_tokens
        self.llama.set_threads(self.threads if alone else self.shared_threads)
        results: list = [None] * len(plan)
        # decoding sequences (one new token each): one segment for all of them
        decodes = [i for i, (seq, n) in enumerate(plan) if n == 1 and seq.cached >= seq.prompt_len]
        pending: dict[tuple, list[Segment]] = {}
        if decodes:
            try:
                pending[tuple(decodes)] = [self.decode_segment([plan[i][0] for i in decodes])]
            except Exception:  # a sequence whose inputs cannot run: each alone, below
                decodes = []
        for i, (seq, n) in enumerate(plan):
            if i in decodes:
                continue
            try:
                pending[(i,)] = self.segments(seq, n)
            except Exception as exc:  # this request's inputs cannot run: it alone fails
                results[i] = exc
        logits: dict[int, torch.Tensor] = {}
        embd = False  # token ids first: every decode and the text before a prompt's first image
        while pending:
            call = [(key, segs.pop(0)) for key, segs in pending.items() if segs[0].embd == embd]
            for key, _ in call:
                if not pending[key]:
                    del pending[key]
            if call:
                for i, out in self._decode(call).items():
                    if isinstance(out, Exception):
                        results[i] = RuntimeError(f"engine step failed: {type(out).__name__}: {out}")
                        pending.pop((i,), None)
                    elif out is not None:
                        logits[i] = out
            embd = not embd
        chosen = [i for i, (seq, n) in enumerate(plan) if results[i] is None and seq.cached + n >= seq.prompt_len]
        for i, token in zip(chosen, self._sample([plan[i][0] for i in chosen], [logits[i] for i in chosen])):
            results[i] = token
        return results

    @staticmethod
    def _sample(seqs: list, logits: list) -> list:
        """`sampling.sample` for each sequence; greedy ones at once (its rule: non-finite logits
        fail the sequence, else the argmax), sampled ones by `sample` itself."""
        out: list = [None] * len(seqs)
        # as TensorRT-LLM's min_tokens: no end token before that many tokens (Runner._choose's rule)
        banned = [seq.end_ids if seq.generated < seq.req.min_tokens else () for seq in seqs]
        greedy = [k for k, seq in enumerate(seqs) if seq.req.sampling.greedy and not banned[k]]
        if greedy:
            rows = torch.stack([logits[k] for k in greedy])
            finite, best = torch.isfinite(rows).all(dim=1).tolist(), rows.argmax(dim=1).tolist()
            for k, ok, token in zip(greedy, finite, best):
                out[k] = token if ok else NonFiniteLogits(
                    "the model's logits for this request are not finite (NaN or Inf)")
        for k, seq in enumerate(seqs):
            if k not in greedy:
                try:
                    out[k] = sample(logits[k], seq.req.sampling, seq.gen, banned[k], seq.prompt_len + seq.generated)
                except Exception as exc:
                    out[k] = exc
        return out

    def _decode(self, call: list[tuple[tuple, Segment]]) -> dict:
        """One call; per plan index its logits row `[vocab]` (None without one) or the exception.
        When the call fails with the memory as before, each sequence's share runs again alone,
        so only the sequence at fault fails. A failure that left computed ubatches behind fails
        every sequence of the call (each is then released, and its slot emptied)."""
        try:
            return self._spread(call, self.llama.decode([s for _, s in call]))
        except Exception as exc:
            if sum(len(key) for key, _ in call) == 1 or (isinstance(exc, DecodeError) and not exc.restored):
                return {i: exc for key, _ in call for i in key}
        out = {}
        for key, seg in call:
            for j, i in enumerate(key):  # a decode segment: one token per plan index
                one = seg if len(key) == 1 else Segment(seg.seq[j:j + 1], seg.pos[j:j + 1], seg.ids[j:j + 1],
                                                        out=seg.out[j:j + 1])
                try:
                    out.update(self._spread([((i,), one)], self.llama.decode([one])))
                except Exception as exc:
                    out[i] = exc
        return out

    @staticmethod
    def _spread(call, results) -> dict:
        """Per plan index, the last logits row of its share of the call."""
        out = {}
        for (key, _), rows in zip(call, results):
            if len(key) == 1:
                out[key[0]] = None if rows is None else rows[-1]
            else:
                out.update(zip(key, rows))
        return out

    # -- a sequence's share of a step ---------------------------------------------------------------
    def decode_segment(self, seqs: list) -> Segment:
        """One token each of decoding sequences, at `index + delta` on all M-RoPE rows."""
        n = len(seqs)
        ids = np.fromiter((seq.tokens[seq.cached] for seq in seqs), np.int32, n)
        pos = np.fromiter((seq.cached + seq.req.mrope_delta for seq in seqs), np.int32, n)
        seq_ids = np.fromiter((self.cache.seq_id(seq.slot) for seq in seqs), np.int32, n)
        return Segment(seq_ids, pos, ids, out=np.ones(n, bool))

    def prompt_positions(self, seq) -> np.ndarray:
        """`[3, prompt_len]` M-RoPE positions of a sequence's prompt, recovered once."""
        pos = self._positions.get(seq)
        if pos is None:
            pos = self._positions[seq] = positions_from_cos_sin(seq.cos, seq.sin, self.spec)
        return pos

    def segments(self, seq, n: int, seq_id: int | None = None, outputs: str | None = None) -> list[Segment]:
        """The runs (token ids / embedding rows) of a sequence's next `n` tokens, in order; the
        last one asks for logits when the step chooses a token (`outputs` "all": every token's)."""
        start, spec = seq.cached, self.spec
        seq_id = self.cache.seq_id(seq.slot) if seq_id is None else seq_id
        ids = np.asarray(seq.tokens[start:start + n], dtype=np.int64)
        idx = np.arange(start, start + n)
        pos = np.empty((3, n), dtype=np.int64)
        prompt = idx < seq.prompt_len
        if prompt.any():
            pos[:, prompt] = self.prompt_positions(seq)[:, idx[prompt]]
        pos[:, ~prompt] = idx[~prompt] + seq.req.mrope_delta
        fake = ids >= spec.vocab_size
        text_moves = (pos[0] != pos[1]) | (pos[0] != pos[2])
        if (text_moves & ~fake).any():
            at = int(np.flatnonzero(text_moves & ~fake)[0])
            raise ValueError(f"mrope_rotary_cos_sin: text token {at + start} has positions {pos[:, at].tolist()}; "
                             f"text tokens take one position on all three rows")
        rows = None
        if fake.any():
            table = seq.req.table
            if table is None:
                raise ValueError("input_ids: prompt-table ids without a prompt_embedding_table")
            levels, hidden = spec.deepstack_levels, spec.hidden_size
            stride = stride_of(table.shape[0], levels)
            j = torch.from_numpy(ids[fake] - spec.vocab_size)
            # [E; D0; D1; D2] at row j, side by side: llama.cpp's [main | level 0 | level 1 | level 2]
            rows = table.view(levels + 1, stride, hidden)[:, j].permute(1, 0, 2).reshape(len(j), -1)
            rows = rows.to(torch.float32).numpy()
            if not np.abs(rows).max() <= TABLE_BOUND:
                raise ValueError(f"prompt_embedding_table: values beyond +-{TABLE_BOUND:g} would overflow inside the "
                                 f"model and leave non-finite numbers in its KV cells")
        segs, row_at = [], 0
        cuts = np.flatnonzero(np.diff(fake.astype(np.int8))) + 1
        for lo, hi in zip([0, *cuts], [*cuts, n]):
            if fake[lo]:
                p = np.zeros((4, hi - lo), dtype=np.int32)
                p[:3] = pos[:, lo:hi]
                segs.append(Segment.of(seq_id, p, rows=rows[row_at:row_at + hi - lo], outputs=outputs or "none"))
                row_at += hi - lo
            else:
                segs.append(Segment.of(seq_id, pos[0, lo:hi], ids=ids[lo:hi].astype(np.int32),
                                       outputs=outputs or "none"))
        if outputs is None and start + n >= seq.prompt_len:
            segs[-1].out = np.arange(len(segs[-1])) == len(segs[-1]) - 1
        return segs

    # -- for checks ---------------------------------------------------------------------------
    def check_sequence(self, ids, table: torch.Tensor | None, positions: np.ndarray):
        """A stand-in for a scheduler sequence (no engine): prompt `ids` reading `table`, at M-RoPE
        `positions` `[3, L]`, nothing cached; what `segments` needs."""

        class _Req:
            pass

        class _Seq:
            pass

        req, seq = _Req(), _Seq()
        req.table, req.mrope_delta = table, 0
        seq.req, seq.tokens, seq.cached = req, [int(x) for x in np.asarray(ids).reshape(-1)], 0
        seq.prompt_len = len(seq.tokens)
        self._positions[seq] = np.asarray(positions, dtype=np.int64)
        return seq

    def all_logits(self, ids, table: torch.Tensor | None, positions: np.ndarray, seq_id: int = 0) -> torch.Tensor:
        """Logits `[L, vocab]` of every token of one sequence (prompt ids, with fake ids reading
        `table`, and any continuation), at M-RoPE `positions` `[3, L]`, in as few calls as the
        kinds allow. Uses llama sequence `seq_id` and empties it before and after: only while no
        engine runs on this runner."""

        seq = self.check_sequence(ids, table, positions)
        self.llama.clear(seq_id)
        try:
            out = []
            for seg in self.segments(seq, seq.prompt_len, seq_id, outputs="all"):
                for lo in range(0, len(seg), self.llama.n_batch):  # at most n_batch tokens a call
                    hi = lo + self.llama.n_batch
                    part = Segment(seg.seq[lo:hi], seg.pos[..., lo:hi], None if seg.ids is None else seg.ids[lo:hi],
                                   None if seg.rows is None else seg.rows[lo:hi], seg.out[lo:hi])
                    out.append(self.llama.decode([part])[0])
            return torch.cat(out)
        finally:
            self.llama.clear(seq_id)
