"""Incremental detokenization for streaming.

Each call returns the text that became final since the last call. A byte-level token can end
in the middle of a UTF-8 character; the tokenizer renders such an unfinished tail as U+FFFD,
and that one character is held back until the next token completes it (or shows it can never
be completed). Bytes that are invalid UTF-8 stay U+FFFD and are sent at once. Byte-level text
is concatenative at character boundaries, so decoding restarts from the first token not yet
fully sent: a long stream costs O(tokens), not O(tokens^2).

The concatenation of all pieces plus `flush()` equals
`tokenizer.decode(all_ids, skip_special_tokens=True)`.
"""

from __future__ import annotations

import codecs
import collections
import time

from qwen3vl_triton.contract import FinishReason

_REPLACEMENT = "\ufffd"

def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # the GPT-2 byte-level alphabet

    return {c: b for b, c in bytes_to_unicode().items()}

class IncrementalDetokenizer:
    _bytes_of_char: dict[str, int] | None = None

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.start = 0  # first token whose text is not completely sent
        self.sent = 0  # characters of decode(ids[start:]) already sent
        if IncrementalDetokenizer._bytes_of_char is None:
            IncrementalDetokenizer._bytes_of_char = _byte_decoder()
        # ids decode leaves out: added tokens marked special (not only the named special tokens)
        self._skipped = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special} if self.skip else set()

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def _unfinished_character(self, ids: list[int]) -> bool:
        """Do these tokens end inside a UTF-8 character that more bytes could still complete?"""
        table = self._bytes_of_char
        raw = bytearray()
        # a character spans <= 4 bytes; special tokens that decode skips do not cut one (decode
        # joins the bytes around them)
        ids = [i for i in ids if i not in self._skipped][-8:]
        for token in self.tokenizer.convert_ids_to_tokens(ids):
            if token is None:
                continue
            if any(ch not in table for ch in token):  # not a byte-level token: assume it may complete
                return True
            raw.extend(table[ch] for ch in token)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        decoder.decode(bytes(raw), final=False)
        return bool(decoder.getstate()[0])

    @property
    def pending(self) -> bool:
        """Tokens whose text has not been completely sent (an unfinished character)."""
        return self.start < len(self.ids)

    def add(self, new_ids) -> str:
        """Append tokens; return the newly final text (maybe empty)."""
        self.ids.extend(int(i) for i in new_ids)
        window = self.ids[self.start:]
        new = self._decode(window)[self.sent:]
        if new.endswith(_REPLACEMENT) and self._unfinished_character(window):
            new = new[:-1]
            self.sent += len(new)
        else:
            self.start, self.sent = len(self.ids), 0
        return new

    def flush(self) -> str:
        """End of stream: whatever is left, an unfinished character included (as U+FFFD)."""
        piece = self._decode(self.ids[self.start:])[self.sent:]
        self.start, self.sent = len(self.ids), 0
        return piece

class StreamDetokenizers:
    """Detokenizers of many concurrent streams whose token chunks arrive one by one, by key.

    A stream needs state only while a character is unfinished: that state is kept under the
    stream's key until the character completes, an end id arrives (the tail is flushed), or
    it idles for `idle_seconds` (a stream cut by max_tokens or cancelled mid-character); at most
    `max_streams` are kept, least recently used dropped first. A chunk without a key is decoded
    on its own.
    """

    def __init__(self, tokenizer, end_ids: tuple[int, ...], idle_seconds: float = 300.0, max_streams: int = 65536,
                 clock=time.monotonic):
        self.tokenizer = tokenizer
        self.end_ids = frozenset(end_ids)
        self.idle_seconds = idle_seconds
        self.max_streams = max_streams
        self.clock = clock
        self._streams: collections.OrderedDict[str, tuple[IncrementalDetokenizer, float]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._streams)

    def add(self, key: str | None, ids: list[int]) -> str:
        now = self.clock()
        while self._streams and (now - next(iter(self._streams.values()))[1] > self.idle_seconds
                                 or len(self._streams) >= self.max_streams):
            self._streams.popitem(last=False)
        entry = self._streams.pop(key, None) if key is not None else None
        detok = entry[0] if entry else IncrementalDetokenizer(self.tokenizer)
        text = detok.add(ids)
        if key is None or not self.end_ids.isdisjoint(ids):
            return text + detok.flush()
        if detok.pending:
            self._streams[key] = (detok, now)
        return text

class StopMatcher:
    """Stop strings matched in generated text across piece (token) boundaries.

    `feed` returns the text that can be sent now and whether a stop string was found: the text
    ends just before the earliest stop string; a tail that could still begin a stop string is held
    back until the next piece shows whether it does (or `final` says there is no next piece)."""

    def __init__(self, stops=()):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        buf = self.held + text
        self.held = ""
        found = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if found:
            return buf[:min(found)], True
        if final or not self.stops:
            return buf, False
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False

class TextStream:
    """One generation's token ids -> text pieces, with its end: an end id or a stop string (STOP), or
    `max_tokens` (LENGTH). Per request, so no state is shared between streams.

    `add(ids)` returns (text, finish) where finish is None while the generation goes on; the text
    of all pieces equals `tokenizer.decode(ids, skip_special_tokens=True)` cut before the first stop
    string."""

    def __init__(self, tokenizer, end_ids, max_tokens: int, stops=()):
        self.detok = IncrementalDetokenizer(tokenizer)
        self.end_ids = set(int(i) for i in end_ids)
        self.max_tokens = max_tokens
        self.stop = StopMatcher(stops)
        self.ids: list[int] = []
        self.finish: FinishReason | None = None
        self.stopped_by_string = False  # the end was a stop string (the engine would go on)
        self.prompt_tokens = 0

    def add(self, ids) -> tuple[str, FinishReason | None]:
        if self.finish is not None:
            return "", self.finish
        ids = [int(i) for i in ids]
        ended = next((k for k, i in enumerate(ids) if i in self.end_ids), None)
        if ended is not None:
            ids = ids[:ended + 1]
        self.ids.extend(ids)
        text = self.detok.add(ids)
        finish = (FinishReason.STOP if ended is not None else
                  FinishReason.LENGTH if len(self.ids) >= self.max_tokens else None)
        if finish is not None:
            text += self.detok.flush()
        text, hit = self.stop.feed(text, final=finish is not None)
        self.stopped_by_string = hit
        self.finish = FinishReason.STOP if hit else finish
        return text, self.finish

    def close(self, reason: FinishReason = FinishReason.LENGTH) -> str:
        """The generation ended without a finish seen here (e.g. the engine's context limit)."""
        if self.finish is not None:
            return ""
        text, hit = self.stop.feed(self.detok.flush(), final=True)
        self.finish = FinishReason.STOP if hit else reason
        return text
