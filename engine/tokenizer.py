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

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer | None:
        """The checkpoint's tokenizer, or None when it ships without one."""
        return cls(path) if (Path(path) / "tokenizer.json").is_file() else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)


def _read_json(file: Path) -> dict[str, Any]:
    return json.loads(file.read_text()) if file.is_file() else {}


def _token_text(tok: Any) -> str | None:
    """Special tokens appear as strings or, in older configs, as {"content": ...} objects."""
    return tok.get("content") if isinstance(tok, dict) else tok
