"""Incremental detokenization: the pieces add up to the full decode, half characters are held
back, and stop strings end the text before them without ever leaking a piece of one."""

import random

import pytest

from engine.detokenizer import IncrementalDetokenizer
from engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from model.tiny import make_tiny_model

    return Tokenizer(make_tiny_model(tmp_path_factory.mktemp("detok"), arch="qwen3_moe"))


def stream(tokenizer, ids, stop=()):
    d = IncrementalDetokenizer(tokenizer, tuple(stop))
    pieces = []
    for i, t in enumerate(ids):
        stopped = d.add(t)
        pieces.append(d.take(final=stopped or i == len(ids) - 1))
        if stopped:
            break
    return pieces, d.stopped


@pytest.mark.parametrize("text", ["The delta rule, step by step.", "héllo 🙂 wörld — ünïcode ✓",
                                  "line one\nline two\n\n  indented"])
def test_pieces_add_up_to_the_full_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    pieces, _ = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces)  # no half characters handed out


def test_random_tokens_add_up(tokenizer):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(30)]
        pieces, _ = stream(tokenizer, ids)
        assert "".join(pieces) == tokenizer.decode(ids)


@pytest.mark.parametrize("stop", ["rule", "e, s", "step.", "The", "nowhere"])
def test_stop_strings(tokenizer, stop):
    text = "The delta rule, step by step."
    ids = tokenizer.encode(text)
    pieces, stopped = stream(tokenizer, ids, [stop, "zzz"])
    full = tokenizer.decode(ids)
    assert "".join(pieces) == (full[:full.index(stop)] if stop in full else full)
    assert stopped == (stop in full)
    for i in range(1, len(pieces)):  # nothing of the stop string went out early
        assert stop not in "".join(pieces[:i]) or stop not in full


def test_long_stop_strings_with_many_partial_matches(tokenizer):
    """Stop strings up to the API's 256 characters, and a text full of their prefixes: the same
    cut as a search of the whole text, with the search looking only at the new tail each time."""
    text = "ab" * 300 + "abc" + "ab" * 50
    ids = tokenizer.encode(text)
    full = tokenizer.decode(ids)
    for stop in ["ab" * 128, "ab" * 127 + "c", "b" * 256, "ab" * 30 + "abc", "abcab"]:
        pieces, stopped = stream(tokenizer, ids, [stop, "zzz" * 80])
        assert "".join(pieces) == (full[:full.index(stop)] if stop in full else full), stop
        assert stopped == (stop in full) and stop not in "".join(pieces)


def test_text_is_kept_in_pieces(tokenizer):
    ids = tokenizer.encode("The delta rule, step by step.") * 40
    d = IncrementalDetokenizer(tokenizer, ("zz",))
    for t in ids:
        d.add(t)
        d.take(final=False)
    d.take(final=True)
    assert d.text == tokenizer.decode(ids)


def test_stop_strings_wait_for_min_tokens(tokenizer):
    """As vLLM: no stop-string check until more than min_tokens tokens are out; then a match
    must end in the new text (it may begin before)."""
    ids = tokenizer.encode("ab ab ab ab ab ab ab ab")
    d = IncrementalDetokenizer(tokenizer, ("ab",), min_tokens=len(ids) - 1)
    stopped = [d.add(t) for t in ids]
    assert stopped == [False] * (len(ids) - 1) + [True]
    assert d.text + "ab" == tokenizer.decode(ids)
