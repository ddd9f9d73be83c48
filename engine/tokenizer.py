"""Text ↔ token ids from a checkpoint's tokenizer.json with the `tokenizers` library (no
transformers at runtime), plus what tokenizer_config.json / generation_config.json say about
EOS and the chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        self._tok = _HFTokenizer.from_file(str(file))
        cfg = _read_json(path / "tokenizer_config.json")
        self.eos_token: str | None = _token_text(cfg.get("eos_token"))
        self.bos_token: str | None = _token_text(cfg.get("bos_token"))
        # transformers 5 writes the template to its own file; older checkpoints keep it inline.
        template_file = path / "chat_template.jinja"
        self.chat_template: str | None = (template_file.read_text() if template_file.is_file()
                                          else cfg.get("chat_template"))
        eos_ids = [self._tok.token_to_id(self.eos_token)] if self.eos_token else []
        gen_eos = _read_json(path / "generation_config.json").get("eos_token_id")
        eos_ids += gen_eos if isinstance(gen_eos, list) else [gen_eos]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in eos_ids if i is not None))
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._id_end = max(vocab.values(), default=-1) + 1  # ids below it may still lack a token
        # The most characters of text one token stands for (byte-level BPE spells each byte as
        # one character, so a token's string is at least as long as the text it covers).
        self.max_token_chars: int = max(map(len, vocab), default=1)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer | None:
        """The checkpoint's tokenizer, or None when it ships without one."""
        return cls(path) if (Path(path) / "tokenizer.json").is_file() else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def vocab(self) -> dict[str, int]:
        """Each token's string as tokenizer.json spells it (byte-level tokens in their byte
        alphabet), added tokens included: what a grammar library builds its token tables from."""
        return self._tok.get_vocab(with_added_tokens=True)

    def special_token_ids(self) -> frozenset[int]:
        """Ids of the added tokens marked special (<|im_start|>, <|endoftext|>, ...)."""
        return frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    def to_json(self) -> str:
        """The tokenizer.json text (its model type, pre-tokenizer and decoder say how tokens
        spell bytes)."""
        return self._tok.to_str()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """Ids with no token (a model's vocab_size may exceed its tokenizer's) decode to ""."""
        ids = [t for t in token_ids if 0 <= t < self._id_end]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


    def token_strs(self, token_ids: list[int]) -> list[str]:
        """Each id's token as the vocabulary spells it (byte-level BPE: "Ġhello"), as vLLM's
        /tokenize returns them; "" for an id without a token."""
        return [self._tok.id_to_token(t) or "" if 0 <= t < self._id_end else "" for t in token_ids]


def token_id_limit(tokenizer: Tokenizer | None, vocab_size: int) -> int:
    """Prompt token ids are valid below this: the model embeds every id below its vocab_size,
    and the tokenizer may name more (vLLM's rule: max of the two)."""
    return max(vocab_size, tokenizer.vocab_size if tokenizer is not None else 0)


def _read_json(file: Path) -> dict[str, Any]:
    return json.loads(file.read_text()) if file.is_file() else {}


def _token_text(tok: Any) -> str | None:
    """Special tokens appear as strings or, in older configs, as {"content": ...} objects."""
    return tok.get("content") if isinstance(tok, dict) else tok
