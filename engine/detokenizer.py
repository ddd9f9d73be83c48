"""Output text as tokens arrive, with stop strings. Text is handed out only once it is final: not
while the last tokens end in half a UTF-8 character, and not while its tail could still grow into
a stop string (which must never reach the client)."""

from __future__ import annotations

from engine.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what a decoder makes of an incomplete UTF-8 sequence
MAX_PENDING_TOKENS = 6  # a character spans at most 4 byte tokens; past that, � is real output


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = (),
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        # Decoding ids[prefix:] and cutting decode(ids[prefix:read]) off keeps the spacing a
        # tokenizer derives from the previous token (vLLM's scheme); ids[read:] are not yet text.
        self._prefix = 0
        self._read = 0
        self.text = ""  # all final output text; ends before a matched stop string
        self._emitted = 0  # chars of self.text handed out by take()
        self.stopped = False

    def add(self, token_id: int) -> bool:
        """Take one output token; True when the text now contains a stop string."""
        self.token_ids.append(token_id)
        return self._advance(force=False)

    def _advance(self, force: bool) -> bool:
        if self.stopped or self._read == len(self.token_ids):
            return self.stopped
        ids = self.token_ids
        prefix_text = self._decode(ids[self._prefix:self._read])
        full = self._decode(ids[self._prefix:])
        if not force and full.endswith(REPLACEMENT) and len(ids) - self._read < MAX_PENDING_TOKENS:
            return False
        new = full[len(prefix_text):]
        self._prefix, self._read = self._read, len(ids)
        old_len = len(self.text)
        self.text += new
        return self._match_stop(old_len)

    def take(self, final: bool) -> str:
        """Text not handed out before; when not `final`, less a tail a stop string may begin with.
        When final, tokens still waiting for the rest of a character are decoded as they are."""
        if final:
            self._advance(force=True)
        end = len(self.text) if final or self.stopped else len(self.text) - self._stop_prefix_len()
        end = max(end, self._emitted)
        out, self._emitted = self.text[self._emitted:end], end
        return out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def _match_stop(self, old_len: int) -> bool:
        if not self.stop:
            return False
        longest = max(map(len, self.stop))
        # A match must end in the new text, so it starts at most longest-1 chars before it.
        lo = max(0, old_len - longest + 1)
        hits = [i for i in (self.text.find(s, lo) for s in self.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[:min(hits)]
        self.stopped = True
        return True

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best
