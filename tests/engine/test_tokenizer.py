import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from engine.tokenizer import Tokenizer


@pytest.fixture
def tok_dir(tmp_path):
    vocab = {"<unk>": 0, "<|endoftext|>": 1, "<|im_end|>": 2, "hello": 3, "world": 4}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>", "<|im_end|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|im_end|>"}, "chat_template": "{{ messages }}"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
    return tmp_path


def test_encode_decode_and_special_tokens(tok_dir):
    tok = Tokenizer(tok_dir)
    assert tok.encode("hello world") == [3, 4]
    assert tok.decode([3, 2, 4]) == "hello world"
    assert tok.decode([3, 2], skip_special_tokens=False) == "hello <|im_end|>"
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_ids == (2, 1)
    assert tok.chat_template == "{{ messages }}" and tok.vocab_size == 5


def test_template_file_wins_and_missing_tokenizer(tok_dir, tmp_path_factory):
    (tok_dir / "chat_template.jinja").write_text("T")
    assert Tokenizer(tok_dir).chat_template == "T"
    empty = tmp_path_factory.mktemp("empty")
    assert Tokenizer.from_dir(empty) is None
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        Tokenizer(empty)
