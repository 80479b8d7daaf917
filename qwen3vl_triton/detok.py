"""Incremental detokenization for streaming.

Each call returns the text that became final since the last call. A byte-level token can end
in the middle of a UTF-8 character; such a tail decodes to U+FFFD and is held back until the
next token completes it. Only a short window of recent tokens is decoded per call (the
prefix/read-offset scheme of text-generation-inference and vLLM), so a long stream costs
O(tokens), not O(tokens^2). The concatenation of all pieces equals
`tokenizer.decode(all_ids, skip_special_tokens=True)`.
"""

from __future__ import annotations

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

    def flush(self) -> str:
        """End of stream: whatever is left, an unfinished character included."""
        piece = self._decode(self.ids)[self.sent_chars:]
        self.sent_chars += len(piece)
        self.prefix_offset = self.read_offset = len(self.ids)
        return piece
