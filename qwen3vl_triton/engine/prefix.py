"""Prefix KV reuse: finished sequences' KV stays cached, and a new sequence starts from the
longest cached prefix of its own tokens and prefills only the rest.

Keys. Each token has a record: its id, its `prompt_table_extra_ids` entry, its M-RoPE position
(t, h, w, as integers) and, for a prompt-table row (an image token), 64 bits of the SHA-256 of the
row it reads (every DeepStack level, and its dtype; 0 for text). A sequence's records are cut
into blocks of `BLOCK` tokens; block b's key is a SHA-256 chain, `key_b = sha256(key_{b-1} |
records of the block)`, so a key names the whole prefix up to the block's end. Two prefixes share
a key only when their tokens, their images' rows and their positions are the same -- the KV of a
prefix depends on nothing else -- whatever a producer puts in `prompt_table_extra_ids`. (An
image's rows are the same bits in every request through the vision encoder's cache of recent
images; an image encoded again beside others may differ in the last bits, and is then not reused.)

Fail closed. Reuse is off for a request (nothing looked up, nothing kept) when:
- an image token has no `prompt_table_extra_ids` entry (the input is absent, or its entry is 0):
  its producer did not say which image the row belongs to;
- its positions cannot be read back from `mrope_rotary_cos_sin` as integers (the recomputed table
  must match within `POSITION_TOLERANCE`), e.g. a table that is no M-RoPE table of integer positions.

Entries. A finished sequence (not one that failed) is kept whole, as one entry: the runner's cache
keeps its KV (`PrefixStore.keep`: the torch runner copies its rows, the ggml runner keeps its
llama.cpp sequence in a spare sequence id), and each of its full blocks' keys points at it. A new
sequence walks its blocks' keys; the entry of the last key found holds the whole prefix, which the
cache puts into the sequence's slot (`restore`), extended past the last full block token by token
while the entry's records and the sequence's agree. An entry whose blocks a newer entry holds too (the
turn before, in a conversation) is dropped. Entries are evicted least recently used first while
their bytes pass the budget (`kv_cache_bytes`) or the store has no room for another.

Where a prefix may end: llama.cpp cuts a sequence by position (t row), and the tokens of one image
share their t position, so a reused prefix ends only where the t position grows (never inside an
image); the same rule for both runners. At least the prompt's last token is always prefilled:
its logits choose the first token.
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from qwen3vl_triton.model import mrope
from qwen3vl_triton.model.checkpoint import ModelSpec
from qwen3vl_triton.model.table import stride_of

BLOCK = 16  # tokens per block of the key chain
POSITION_TOLERANCE = 1e-4  # how far mrope_rotary_cos_sin may be from the table of its integer positions


class PrefixStore(Protocol):
    """What a runner's KV cache does for the prefix cache."""

    def keep(self, slot: int, tokens: int) -> tuple[object, int] | None:
        """Keep the KV of the first `tokens` tokens of the (finished) sequence in `slot`; the slot is
        free afterwards. Returns (handle, bytes held) or None when nothing could be kept."""

    def restore(self, handle: object, slot: int, tokens: int, cut_position: int) -> None:
        """Put the first `tokens` tokens of a kept entry into the claimed `slot`; `cut_position`: the
        t position of the entry's token `tokens` (-1: the entry ends there)."""

    def drop(self, handle: object) -> None:
        """Free a kept entry."""

    def room(self) -> int | None:
        """How many more entries the store can hold (None: as many as the bytes allow)."""

    def cost(self, tokens: int) -> int:
        """The bytes an entry of `tokens` tokens holds."""


@dataclass
class PrefixStats:
    hit_tokens: int = 0  # prompt tokens whose KV came from the cache
    miss_tokens: int = 0  # prompt tokens prefilled (with the cache on)
    evictions: int = 0  # entries evicted for room
    bytes: int = 0  # bytes the entries hold
    entries: int = 0


@dataclass(eq=False)
class Keys:
    """A sequence's key material: per-token records and the keys of its full blocks."""

    records: np.ndarray  # (n, 6) int64: id, extra id, t, h, w, row digest
    delta: int  # mrope_position_deltas: decoded tokens are at index + delta
    blocks: list[bytes] = field(default_factory=list)


@dataclass(eq=False)
class Entry:
    handle: object
    blocks: list[bytes]
    records: np.ndarray  # of every token the entry holds
    nbytes: int


class PrefixCache:
    """The scheduler's prefix cache over a runner's `PrefixStore` (engine thread only)."""

    def __init__(self, spec: ModelSpec, store: PrefixStore, max_bytes: int, block: int = BLOCK):
        self.spec, self.store, self.max_bytes, self.block = spec, store, max_bytes, block
        self.stats = PrefixStats()
        self._entries: collections.OrderedDict[Entry, None] = collections.OrderedDict()  # LRU first
        self._index: dict[bytes, list[Entry]] = {}  # block key -> entries holding it, newest last
        self._recoverable = mrope.recoverable(spec)

    # -- keys ------------------------------------------------------------------------------------
    def keys(self, ids: list[int], cos: torch.Tensor, sin: torch.Tensor, req) -> Keys | None:
        """The prompt's key material, or None when reuse is off for the request (module docstring)."""
        spec, n = self.spec, len(ids)
        arr = np.asarray(ids, dtype=np.int64)
        fake = arr >= spec.vocab_size
        extra = req.extra_ids
        if extra is None:
            if fake.any():
                return None
            extra = np.zeros(n, np.uint64)
        extra = np.asarray(extra).reshape(-1)
        if extra.size != n or (fake.any() and not extra[fake].all()):
            return None
        if req.mrope_cos_sin is None:
            pos = np.broadcast_to(np.arange(n, dtype=np.int64), (3, n))
        else:
            if not self._recoverable:
                return None
            try:
                pos = mrope.positions_from_cos_sin(cos, sin, spec, tolerance=POSITION_TOLERANCE)
            except ValueError:
                return None
        records = np.zeros((n, 6), np.int64)
        records[:, 0] = arr
        records[:, 1] = extra.astype(np.uint64).view(np.int64)
        records[:, 2:5] = pos.T
        if (np.diff(pos[0]) < 0).any():
            return None  # a prefix is cut by t position (module docstring): t must not go back
        if fake.any():
            records[fake, 5] = self._row_digests(req.table, arr[fake] - spec.vocab_size)
        return Keys(records, req.mrope_delta)

    def _row_digests(self, table, j: np.ndarray) -> np.ndarray:
        """64 bits of the SHA-256 of each prompt-table row `j`, its DeepStack levels and dtype included."""
        levels = self.spec.deepstack_levels
        rows = table.view(levels + 1, stride_of(table.shape[0], levels), table.shape[1])[:, torch.from_numpy(j)]
        rows = rows.permute(1, 0, 2).contiguous()
        tag = str(rows.dtype).encode()
        data = (rows.view(torch.int16) if rows.dtype == torch.bfloat16 else rows).numpy()
        return np.array([int.from_bytes(hashlib.sha256(tag + r.tobytes()).digest()[:8], "little", signed=True)
                         for r in data], np.int64)

    def _extend(self, keys: Keys, tokens: list[int], upto: int) -> None:
        """Records of decoded tokens (text at `index + delta` on every row) up to `upto`, and the keys
        of every full block up to there."""
        have = len(keys.records)
        if upto > have:
            idx = np.arange(have, upto)
            rec = np.zeros((idx.size, 6), np.int64)
            rec[:, 0] = np.asarray(tokens[have:upto], dtype=np.int64)
            rec[:, 2:5] = (idx + keys.delta)[:, None]
            keys.records = np.concatenate([keys.records, rec])
        b = self.block
        for k in range(len(keys.blocks), min(upto, len(keys.records)) // b):
            h = hashlib.sha256(keys.blocks[-1] if keys.blocks else b"qwen3vl-prefix")
            h.update(np.ascontiguousarray(keys.records[k * b:(k + 1) * b]).tobytes())
            keys.blocks.append(h.digest())

    # -- admission and finish -----------------------------------------------------------------------
    def admit(self, keys: Keys | None, prompt_len: int, tokens: list[int], slot: int) -> int:
        """Put the longest cached prefix of a new sequence into its `slot`; returns its length."""
        if keys is None:
            self.stats.miss_tokens += prompt_len
            return 0
        self._extend(keys, tokens, prompt_len)
        entry, found = None, 0
        for b, key in enumerate(keys.blocks):
            holders = self._index.get(key)
            if not holders:
                break
            entry, found = holders[-1], (b + 1) * self.block
        if entry is not None:  # on past the last full block while the records agree
            mine, theirs = keys.records[found:prompt_len], entry.records[found:]
            m = min(len(mine), len(theirs))
            differ = np.flatnonzero((mine[:m] != theirs[:m]).any(axis=1))
            found += int(differ[0]) if differ.size else m
        reuse = min(found, prompt_len - 1)
        if entry is not None:
            t = entry.records[:, 2]
            while reuse > 0 and reuse < len(t) and t[reuse] <= t[reuse - 1]:
                reuse -= 1  # inside an image: back to where its t position starts
        if reuse > 0:
            t = entry.records[:, 2]
            self.store.restore(entry.handle, slot, reuse, int(t[reuse]) if reuse < len(t) else -1)
            self._entries.move_to_end(entry)
        self.stats.hit_tokens += reuse
        self.stats.miss_tokens += prompt_len - reuse
        return reuse

    def keep(self, keys: Keys | None, tokens: list[int], cached: int, slot: int) -> bool:
        """Keep a finished sequence's KV (its first `cached` tokens) as an entry; False when the
        slot's KV is not kept (the caller releases it)."""
        if keys is None or cached < self.block:
            return False
        self._extend(keys, tokens, cached)
        blocks = keys.blocks[:cached // self.block]
        if blocks[-1] in self._index and any(len(e.records) >= cached for e in self._index[blocks[-1]]):
            # an entry holds every block already (the same conversation again): refresh it
            self._entries.move_to_end(self._index[blocks[-1]][-1])
            return False
        if not self._make_room(self.store.cost(cached)):
            return False
        kept = self.store.keep(slot, cached)
        if kept is None:
            return False
        handle, nbytes = kept
        entry = Entry(handle, blocks, keys.records[:cached], nbytes)
        self._entries[entry] = None
        for key in blocks:
            self._index.setdefault(key, []).append(entry)
        self.stats.bytes += nbytes
        self.stats.entries += 1
        # entries whose blocks this one holds too (the same conversation's earlier turns)
        held = set(blocks)
        for old in [e for e in self._entries if e is not entry and e.blocks[-1] in held]:
            self._drop(old)
        return True

    # -- room --------------------------------------------------------------------------------------
    def _make_room(self, nbytes: int) -> bool:
        """Evict least recently used entries until one of `nbytes` fits; False if it never can."""
        if nbytes > self.max_bytes:
            return False
        while self._entries and (self.stats.bytes + nbytes > self.max_bytes or self.store.room() == 0):
            self._drop(next(iter(self._entries)))
            self.stats.evictions += 1
        return self.store.room() != 0

    def _drop(self, entry: Entry) -> None:
        del self._entries[entry]
        for key in entry.blocks:
            holders = self._index.get(key)
            if holders is not None:
                holders.remove(entry)
                if not holders:
                    del self._index[key]
        self.store.drop(entry.handle)
        self.stats.bytes -= entry.nbytes
        self.stats.entries -= 1

    def clear(self) -> None:
        while self._entries:
            self._drop(next(iter(self._entries)))
