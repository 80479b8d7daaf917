"""Incremental detokenization for streaming.

Each call returns the text that became final since the last call. A byte-level token can end
in the middle of a UTF-8 character; such a tail decodes to U+FFFD and is held back until the
next token completes it. Only a short window of recent tokens is decoded per call (the
prefix/read-offset scheme of text-generation-inference and vLLM), so a long stream costs
O(tokens), not O(tokens^2). The concatenation of all pieces equals
`tokenizer.decode(all_ids, skip_special_tokens=True)`.
"""

from __future__ import annotations

import collections
import time

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the decode window
        self.read_offset = 0  # tokens whose text has been returned
        self.sent_chars = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def add(self, new_ids) -> str:
        """Append tokens; return the newly final text (maybe empty)."""
        self.ids.extend(int(i) for i in new_ids)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) <= len(prefix) or text.endswith(_REPLACEMENT):
            return ""  # nothing new, or an unfinished UTF-8 character: wait for more bytes
        piece = text[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.sent_chars += len(piece)
        return piece

    @property
    def pending(self) -> bool:
        """Tokens whose text has not been returned yet (a split character)."""
        return self.read_offset < len(self.ids)

    def flush(self) -> str:
        """End of stream: whatever is left, an unfinished character included."""
        piece = self._decode(self.ids)[self.sent_chars:]
        self.sent_chars += len(piece)
        self.prefix_offset = self.read_offset = len(self.ids)
        return piece


class StreamDetokenizers:
    """Detokenizers of many concurrent streams whose token chunks arrive one by one, by key.

    Byte-level text is concatenative at character boundaries, so a stream needs state only
    while the bytes of a split character are pending: that state is kept under the stream's key
    until the character completes, the end token arrives (the tail is flushed), or it idles for
    `idle_seconds` (a stream cut by max_tokens or cancelled mid-character); at most
    `max_streams` are kept, least recently used dropped first. A chunk without a key is decoded
    on its own.
    """

    def __init__(self, tokenizer, end_id: int, idle_seconds: float = 300.0, max_streams: int = 65536,
                 clock=time.monotonic):
        self.tokenizer = tokenizer
        self.end_id = end_id
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
        if key is None or self.end_id in ids:
            return text + detok.flush()
        if detok.pending:
            self._streams[key] = (detok, now)
        return text
