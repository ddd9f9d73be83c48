"""Structured outputs' cost: (1) xgrammar against llguidance, the two maintained grammar
libraries vLLM uses, on grammar compile time and per-step token-mask time at batch 16; (2) the
time grammar masking adds to a decode step of the engine at batch 16 (engine/structured_output.py:
masks filled per row, applied in the sampler). Both with the tiny model's vocabulary (483 tokens)
and a real-size one: a synthetic byte-level BPE vocabulary of 151,643 tokens plus Qwen's special
tokens (word-like pieces with and without a leading space, numbers, punctuation runs, CJK), the
size of Qwen3's. The engine part runs the tiny Qwen3-Next with that tokenizer and a
151,936-row head, so the step includes a real-size sampler.

    python -m bench.grammar_mask [--part backends engine] [--steps 32] [--repeats 3] [--threads 1]

Backends: compile = schema text to a grammar ready to mask (xgrammar precomputes token masks
then; llguidance works lazily, so its figure includes the 16 matchers and the first mask), mask =
filling the 16 rows' bitmasks once per token of a 150-token JSON answer (serial, and with each
library's batch-parallel call on 2 threads), apply = setting the disallowed logits to -inf
(xgrammar's CPU kernel, llguidance's, and nextserve's byte-table lookup).
Engine: median seconds of a decode step with 16 running requests at temperature 1, none or all
with a JSON schema that takes hundreds of tokens (runs alternate so shared-machine load falls on
both alike), and the grammar's own time inside the masked steps: masks filled, applied in the
sampler, tokens accepted."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch

BATCH = 16
QWEN_BPE_SIZE = 151_643  # Qwen2/3's BPE tokens; its special tokens follow; 151,936 logits rows
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"},
    "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"street": {"type": "string"}, "zip": {"type": "integer"}},
                "required": ["street", "zip"]},
    "score": {"type": "number"}, "active": {"type": "boolean"}},
    "required": ["name", "age", "email", "tags", "address", "score", "active"]}
ANSWER = json.dumps({"name": "Ada Lovelace", "age": 36, "email": "ada@example.com",
                     "tags": ["math", "poetry", "engines"],
                     "address": {"street": "St James Square", "zip": 12345}, "score": 9.5, "active": True})
# Long enough that no request of the engine part ends within the timed steps.
LONG_SCHEMA = {"type": "array", "minItems": 64, "items": {
    "type": "object", "properties": {"name": {"type": "string"}, "id": {"type": "integer"},
                                     "ok": {"type": "boolean"}}, "required": ["name", "id", "ok"]}}


def synthetic_tokenizer(size: int = QWEN_BPE_SIZE, seed: int = 0):
    """A byte-level BPE tokenizer (tokenizers' file format, GPT-2's byte alphabet) with `size`
    tokens: the 256 bytes, then random word-like and symbol pieces; ChatML specials after."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    rng = random.Random(seed)
    # GPT-2's byte → character map: printable bytes stand for themselves, the rest from U+0100 on
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    byte_char = {b: chr(c) for b, c in zip(bs, cs, strict=True)}
    vocab = {byte_char[b]: i for i, b in enumerate(range(256))}
    letters = "abcdefghijklmnopqrstuvwxyz"
    while len(vocab) < size:
        r = rng.random()
        if r < 0.55:
            s = (" " if rng.random() < 0.6 else "") + "".join(rng.choices(letters, k=rng.randint(2, 9)))
        elif r < 0.65:
            s = " " + "".join(rng.choices(letters, k=rng.randint(2, 8))).capitalize()
        elif r < 0.72:
            s = "".join(rng.choices("0123456789", k=rng.randint(1, 3)))
        elif r < 0.85:
            s = "".join(rng.choices(" \n\t{}[]():;,.\"'=+-*/<>!_#@$%&|\\", k=rng.randint(1, 4)))
        else:
            s = "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(1, 2)))
        vocab.setdefault("".join(byte_char[b] for b in s.encode()), len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


def backends(tok, label: str, threads: int) -> None:
    import llguidance
    import llguidance.torch as lgt
    import xgrammar as xgr

    from engine.structured_output import TokenMask, apply_token_mask

    text = tok.to_str()
    V = tok.get_vocab_size()
    eos = tok.token_to_id("<|im_end|>")
    ids = tok.encode(ANSWER, add_special_tokens=False).ids
    steps = len(ids)
    logits = torch.randn(BATCH, V)
    # xgrammar
    t = time.perf_counter()
    encoded = [""] * V
    for k, i in tok.get_vocab(with_added_tokens=True).items():
        encoded[i] = "" if k in SPECIALS else k
    meta = xgr.TokenizerInfo._detect_metadata_from_hf(text)
    info = xgr.TokenizerInfo(encoded, meta["vocab_type"], vocab_size=V, stop_token_ids=[eos],
                             add_prefix_space=meta["add_prefix_space"])
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    xt_info = time.perf_counter() - t
    t = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    xt_compile = time.perf_counter() - t
    bitmask = xgr.allocate_token_bitmask(BATCH, V)
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(BATCH)]
    x_fill = x_apply = o_apply = 0.0
    for tid in ids:
        t = time.perf_counter()
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)
        x_fill += time.perf_counter() - t
        t = time.perf_counter()
        xgr.apply_token_bitmask_inplace(logits.clone(), bitmask)
        x_apply += time.perf_counter() - t
        t = time.perf_counter()
        apply_token_mask(logits.clone(), TokenMask(rows=tuple(range(BATCH)), bitmask=bitmask))
        o_apply += time.perf_counter() - t
        for m in matchers:
            assert m.accept_token(tid)
    clone = min(_timed(lambda: logits.clone()) for _ in range(5))  # both apply timings include one
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(BATCH)]
    batch = xgr.BatchGrammarMatcher(threads)
    x_par = 0.0
    for tid in ids:
        t = time.perf_counter()
        batch.batch_fill_next_token_bitmask(matchers, bitmask)
        x_par += time.perf_counter() - t
        for m in matchers:
            m.accept_token(tid)
    # llguidance
    t = time.perf_counter()
    ltok = llguidance.LLTokenizer(text, n_vocab=V, eos_token=eos)
    lt_info = time.perf_counter() - t
    t = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    lmatchers = [llguidance.LLMatcher(ltok, grammar) for _ in range(BATCH)]
    lbitmask = lgt.allocate_token_bitmask(BATCH, V)
    lgt.fill_next_token_bitmask(lmatchers[0], lbitmask, 0)
    lt_compile = time.perf_counter() - t
    lgt.apply_token_bitmask_inplace(logits.clone(), lbitmask)  # its first call compiles a kernel
    l_fill = l_apply = 0.0
    for tid in ids:
        t = time.perf_counter()
        for i, m in enumerate(lmatchers):
            lgt.fill_next_token_bitmask(m, lbitmask, i)
        l_fill += time.perf_counter() - t
        t = time.perf_counter()
        lgt.apply_token_bitmask_inplace(logits.clone(), lbitmask)
        l_apply += time.perf_counter() - t
        for m in lmatchers:
            assert m.consume_token(tid), m.get_error()
    lmatchers = [llguidance.LLMatcher(ltok, grammar) for _ in range(BATCH)]
    executor = llguidance.LLExecutor(threads)
    l_par = 0.0
    for tid in ids:
        t = time.perf_counter()
        lgt.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(lmatchers)], lbitmask)
        l_par += time.perf_counter() - t
        for m in lmatchers:
            m.consume_token(tid)
    ms = 1e3 / steps
    print(f"| {label} | xgrammar {version('xgrammar')} | {xt_info * 1e3:.0f} | {xt_compile * 1e3:.1f} | "
          f"{x_fill * ms:.3f} | {x_par * ms:.3f} | {x_apply * ms - clone * 1e3:.2f} (nextserve's "
          f"{o_apply * ms - clone * 1e3:.2f}) |")
    print(f"| {label} | llguidance {version('llguidance')} | {lt_info * 1e3:.0f} | "
          f"{lt_compile * 1e3:.1f} | {l_fill * ms:.3f} | {l_par * ms:.3f} | "
          f"{l_apply * ms - clone * 1e3:.2f} |", flush=True)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def engine_steps(model_dir: Path, label: str, steps: int, repeats: int) -> None:
    """Decode steps of 16 requests, none or all with LONG_SCHEMA, alternating; in the masked
    runs, the grammar's own work (masks filled, applied in the sampler, tokens accepted) is timed
    inside each step too, which a loaded machine's noise does not blur as it blurs a difference
    of two step medians."""
    import engine.sampling as sampling_module
    from engine import structured_output as so
    from engine.llm_engine import LLMEngine
    from engine.local_executor import LocalExecutor
    from engine.sampling import SamplingParams
    from engine.tokenizer import Tokenizer

    spent = [0.0]

    def timed(fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - t
        return wrapper

    sampling_module.apply_token_mask = timed(so.apply_token_mask)
    so.StructuredOutputManager.masks = timed(so.StructuredOutputManager.masks)
    so.GrammarState.accept = timed(so.GrammarState.accept)
    tok = Tokenizer(model_dir)
    engine = LLMEngine(LocalExecutor(model_dir, num_slots=BATCH, max_model_len=1024), tokenizer=tok,
                       max_num_batched_tokens=1024)
    prompt = tok.encode("<|im_start|>user\nA list, in JSON.<|im_end|>\n<|im_start|>assistant\n")
    spec = so.StructuredOutputsParams(json=LONG_SCHEMA)

    def run(structured: bool) -> tuple[list[float], list[float]]:
        for i in range(BATCH):
            engine.add_request(f"r{i}", prompt, SamplingParams(
                temperature=1.0, seed=i, max_tokens=steps + 8, ignore_eos=True,
                structured_outputs=spec if structured else None))
        times, grammar = [], []
        while engine.has_unfinished():
            spent[0] = 0.0
            t = time.perf_counter()
            engine.step()
            seconds = time.perf_counter() - t
            s = engine.stats
            if s.last_step_num_seqs == BATCH and s.last_step_num_tokens == BATCH:  # a decode step of 16
                times.append(seconds)
                grammar.append(spent[0])
            if len(times) >= steps:
                for i in range(BATCH):
                    engine.abort_request(f"r{i}")
        return times, grammar

    run(True)  # warm-up: compiles and caches the grammar, builds the tokenizer tables
    run(False)
    plain, masked, grammar = [], [], []
    for _ in range(repeats):
        plain += run(False)[0]
        m, g = run(True)
        masked += m
        grammar += g
    p, m, g = statistics.median(plain), statistics.median(masked), statistics.median(grammar)
    print(f"| {label} | {p * 1e3:.2f} | {m * 1e3:.2f} | {g * 1e3:.2f} | {g / p * 100:.1f} % |", flush=True)


def with_vocab(model_dir: Path, rows: int) -> Path:
    """The checkpoint with `rows` embedding and head rows (random, as the rest)."""
    from safetensors.torch import load_file, save_file

    file = model_dir / "model.safetensors"
    tensors = load_file(str(file))
    g = torch.Generator().manual_seed(0)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        t = tensors[name]
        tensors[name] = torch.randn(rows, t.shape[1], generator=g, dtype=t.dtype) * float(t.std())
    save_file(tensors, str(file))
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "vocab_size": rows}))
    return model_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", nargs="+", default=["backends", "engine"], choices=["backends", "engine"])
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=QWEN_BPE_SIZE, help="the synthetic vocabulary's BPE tokens")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; the libraries' parallel fill uses 2")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from model.tiny import build_tokenizer, make_tiny_model

    big = synthetic_tokenizer(args.vocab)
    if "backends" in args.part:
        print(f"Grammar backends, batch {BATCH}, JSON schema of 7 properties, {args.threads} torch thread(s)")
        print("| vocab | library | tokenizer tables ms | compile ms | mask ms/step | mask ms/step, "
              "parallel | apply ms/step |")
        print("|---|---|---|---|---|---|---|")
        backends(build_tokenizer(), "tiny (483)", 2)
        backends(big, f"synthetic ({big.get_vocab_size():,})", 2)
    if "engine" in args.part:
        print(f"\nEngine decode step, batch {BATCH}, temperature 1: no grammar vs every row masked "
              f"(medians of {args.repeats} x {args.steps} steps)")
        print("| model | step ms, plain | step ms, masked | grammar ms in a masked step "
              "| grammar / plain step |")
        print("|---|---|---|---|---|")
        with tempfile.TemporaryDirectory() as tmp:
            tiny = make_tiny_model(Path(tmp) / "tiny")
            engine_steps(tiny, "tiny Qwen3-Next, vocab 512", args.steps, args.repeats)
            rows = 64 * -(-big.get_vocab_size() // 64)  # padded as Qwen's 151,936 rows
            wide = with_vocab(make_tiny_model(Path(tmp) / "wide"), rows)
            big.save(str(wide / "tokenizer.json"))
            ids = {t: big.token_to_id(t) for t in SPECIALS}  # the checkpoint's EOS/BOS ids follow it
            for name in ("config.json", "generation_config.json"):
                cfg = json.loads((wide / name).read_text())
                cfg.update(bos_token_id=ids["<|endoftext|>"],
                           eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]])
                cfg.update({"pad_token_id": ids["<|endoftext|>"]} if "pad_token_id" in cfg else {})
                (wide / name).write_text(json.dumps(cfg))
            engine_steps(wide, f"tiny Qwen3-Next, synthetic vocab ({rows:,} rows)", args.steps, args.repeats)


if __name__ == "__main__":
    main()
