"""Incremental detokenization for streaming, with stop strings.

Decoding token by token is wrong for byte-level and sentencepiece tokenizers: one character may span several
tokens (UTF-8 bytes), and a token's leading space depends on its neighbours. So each step decodes a short window
``ids[prefix_offset:]`` and emits only what it adds to ``ids[prefix_offset:read_offset]``, holding back while the
text ends in an incomplete character (U+FFFD). Cost per token is O(window), not O(output).

Stop strings: the text is cut right before the first occurrence of any stop string (which is not returned), and
the tail that could still become a stop string is not streamed until it is known not to be one.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Protocol

_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT = 5  # prompt tokens decoded along with the output so the first token's spacing is right


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Per-request decoding state: ``add_token`` per generated token, ``take_delta`` for the text to stream."""

    def __init__(self, tokenizer: Decoder, prompt_token_ids: Seq[int], stop: Seq[str] = (),
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in stop if s]
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""  # output text so far, cut before a stop string once one is found
        self._sent = 0  # characters of ``text`` already handed out by take_delta
        self.stopped = False
        self.num_output_tokens = 0  # tokens given to add_token

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int, final: bool = False) -> bool:
        """Decode one more token; returns True when a stop string appeared (``text`` is then cut before it).

        ``final``: no more tokens will follow, so an incomplete character is emitted as is.
        """
        self.num_output_tokens += 1
        if self.stopped:
            return True
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) > len(prefix) and (final or not full.endswith(_REPLACEMENT)):
            delta = full[len(prefix):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return self._append(delta)
        return False

    def _append(self, delta: str) -> bool:
        start = max(len(self.text) - self._max_stop + 1, 0)
        self.text += delta
        if not self.stop:
            return False
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
        return self.stopped

    def _held_back(self) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out; while unfinished, a possible stop-string prefix at the end is held back."""
        end = len(self.text) if finished or self.stopped else len(self.text) - self._held_back()
        if end <= self._sent:
            return ""
        delta = self.text[self._sent:end]
        self._sent = end
        return delta
