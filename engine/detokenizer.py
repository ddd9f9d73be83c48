"""Output text as tokens arrive, with stop strings. Text is handed out only once it is final: not
while the last tokens end in half a UTF-8 character, and not while its tail could still grow into
a stop string (which must never reach the client)."""

from __future__ import annotations

from engine.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what a decoder makes of an incomplete UTF-8 sequence
MAX_PENDING_TOKENS = 6  # a character spans at most 4 byte tokens; past that, � is real output


class IncrementalDetokenizer:
    """Work per token is bounded by the stop strings' lengths, never by the text so far: the
    stop search looks at the new text and the few characters before it, and the text is kept
    as pieces, not as one string grown by copying."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = (),
                 skip_special_tokens: bool = True, min_tokens: int = 0) -> None:
        """`min_tokens`: stop strings are looked for only once more tokens than this are out,
        as vLLM does (a match must then end in the new text)."""
        self.tokenizer = tokenizer
        self.stop = stop
        self.min_tokens = min_tokens
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        # Decoding ids[prefix:] and cutting decode(ids[prefix:read]) off keeps the spacing a
        # tokenizer derives from the previous token (vLLM's scheme); ids[read:] are not yet text.
        self._prefix = 0
        self._read = 0
        self._keep = max(map(len, stop), default=1) - 1  # chars a stop string may reach back
        self._tail = ""  # the last `_keep` chars of the final text
        self._taken: list[str] = []  # what take() handed out
        self._pending = ""  # final text not yet handed out; ends before a matched stop string
        self.stopped = False

    @property
    def text(self) -> str:
        """All final output text so far."""
        return "".join(self._taken) + self._pending

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
        window = self._tail + new  # a match must end in the new text
        self._pending += new
        searching = len(ids) > self.min_tokens
        hits = [i for i in (window.find(s) for s in self.stop) if i >= 0] if searching else []
        if hits:
            self._pending = self._pending[:max(0, len(self._pending) - (len(window) - min(hits)))]
            self.stopped = True
        self._tail = window[max(0, len(window) - self._keep):]
        return self.stopped

    def take(self, final: bool) -> str:
        """Text not handed out before; when not `final`, less a tail a stop string may begin with.
        When final, tokens still waiting for the rest of a character are decoded as they are."""
        if final:
            self._advance(force=True)
        held = 0 if final or self.stopped else min(self._stop_prefix_len(), len(self._pending))
        out = self._pending[:len(self._pending) - held]
        self._pending = self._pending[len(out):]
        if out:
            self._taken.append(out)
        return out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string. Only
        tails that start with a stop string's first character are tried."""
        best, tail = 0, self._tail
        for s in self.stop:
            i = tail.find(s[0], max(0, len(tail) - len(s) + 1))
            while i >= 0 and len(tail) - i > best:
                if s.startswith(tail[i:]):
                    best = len(tail) - i
                    break
                i = tail.find(s[0], i + 1)
        return best
