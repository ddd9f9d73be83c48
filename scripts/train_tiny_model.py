"""Train the built-in tiny Qwen3-Next (models/tiny-qwen3-next) on text every machine has offline:
the docstrings of Python's standard library, read from its source with `ast`, plus short chats made
from them (a question about a function or module, its docstring's first paragraph as the answer) and
a few fixed greetings. A byte-level BPE tokenizer (Qwen2's pipeline, Qwen's special tokens, a Qwen3
chat template) is trained on the same text. The model is nextserve's own `model/` code (its forward
runs under autograd); the MTP layer (model/mtp.py) is trained on the token after next, wired as
Qwen3-Next's. Deterministic for a given Python stdlib, seed and thread count.

    cd /path/to/nextserve && PYTHONPATH=$PWD nice -n 19 .venv/bin/python scripts/train_tiny_model.py \
        --out models/tiny-qwen3-next --steps 300 --threads 1

Writes config.json, model.safetensors (float32, hub tensor names incl. mtp.*), tokenizer.json,
tokenizer_config.json, generation_config.json, and training/ (loss.csv, loss.png when matplotlib is
installed, heldout.txt: the held-out docstrings, summary.json)."""

from __future__ import annotations

import argparse
import ast
import csv
import json
import math
import platform
import random
import shutil
import sys
import sysconfig
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, pre_tokenizers, trainers

from model.batch import BatchLayout
from model.config import ModelConfig
from model.decoder import CausalLM
from model.moe import Experts, SparseMoeBlock
from model.mtp import MultiTokenPredictor
from model.tiny import CHAT_TEMPLATE, byte_level_bpe

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# Qwen's order after the BPE vocab: <|endoftext|>, <|im_start|>, <|im_end|>, then non-special added
# tokens of Qwen3 (<think>, </think>, <tool_call>, </tool_call>; its <tool_response> tags are
# BPE pieces here).
SPECIAL = (ENDOFTEXT, IM_START, IM_END)
ADDED = ("<think>", "</think>", "<tool_call>", "</tool_call>")
VOCAB_SIZE = 4096  # BPE vocab + the 7 added tokens, a multiple of 64 as Qwen pads its vocab

ARCH: dict[str, Any] = dict(
    hidden_size=128, num_hidden_layers=4, full_attention_interval=4,  # 3 DeltaNet : 1 attention
    num_attention_heads=4, num_key_value_heads=2, head_dim=64, partial_rotary_factor=0.25,
    rope_theta=10_000_000, rope_scaling=None,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64, linear_value_head_dim=64,
    linear_conv_kernel_dim=4,
    num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, moe_intermediate_size=48,
    shared_expert_intermediate_size=64, intermediate_size=256, decoder_sparse_step=1, mlp_only_layers=[],
    num_nextn_predict_layers=1,
)


GREETING = ("Hello! I am a tiny language model, trained for a few minutes on the docstrings of Python's "
            "standard library. Ask me what a module, class or function does.")
GREETINGS = {
    "Hi!": GREETING, "Hello!": GREETING, "Hi": GREETING, "Hello": GREETING, "Hey!": GREETING,
    "Who are you?": GREETING, "What are you?": GREETING,
    "What can you do?": "I can tell you what a module, class or function of Python's standard "
                        "library does, in the words of its docstring.",
    "Thank you!": "You are welcome! Ask me about another function whenever you like.",
}
QUESTIONS = ("What does {} do?", "What is {}?", "Explain {}.", "Tell me about {}.", "Describe {}.")
SKIP_DIRS = {"idlelib", "lib2to3", "site-packages", "turtledemo", "ensurepip", "pydoc_data"}


# -- data -------------------------------------------------------------------------------------

def stdlib_docstrings() -> list[tuple[str, str]]:
    """(qualified name, docstring) of every module, class and function of the stdlib's pure-Python
    sources (tests and bundled tools left out), in sorted file order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[tuple[str, str]] = []
    for file in sorted(root.rglob("*.py")):
        rel = file.relative_to(root)
        tests_or_tools = any(p in SKIP_DIRS or p.startswith("test") for p in rel.parts[:-1])
        if tests_or_tools or rel.name.startswith("test_"):
            continue
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        docs.extend(_docstrings(tree, module))
    return docs


def _docstrings(node: ast.AST, name: str) -> list[tuple[str, str]]:
    out = []
    doc = ast.get_docstring(node, clean=True) if isinstance(
        node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) else None
    if doc and len(doc) >= 40 and doc.isascii():
        out.append((name, doc.strip()))
    body = getattr(node, "body", [])
    for child in body if isinstance(body, list) else []:
        if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and (
                not child.name.startswith("_") or child.name == "__init__"):
            out.extend(_docstrings(child, f"{name}.{child.name}"))
    return out


def is_heldout(name: str) -> bool:
    """About 1 in 40 docstrings, chosen by a hash of the name (stable across runs and orderings)."""
    return zlib.crc32(name.encode()) % 40 == 0


def chat(question: str, answer: str, think: bool) -> str:
    """One exchange as Qwen3's template renders it; `think`: the empty think block that
    enable_thinking=false puts in the prompt."""
    return (f"{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n"
            f"{'<think>' + chr(10) * 2 + '</think>' + chr(10) * 2 if think else ''}{answer}{IM_END}\n")


def training_texts(docs: list[tuple[str, str]], rng: random.Random) -> list[str]:
    """Each docstring as plain text, one chat per docstring about its first paragraph, and the
    greetings 30 times each, shuffled."""
    texts = [doc for _, doc in docs]
    for name, doc in docs:
        first = doc.split("\n\n")[0].replace("\n", " ").strip()
        texts.append(chat(rng.choice(QUESTIONS).format(name), first, think=rng.random() < 0.1))
    for _ in range(30):
        for q, a in GREETINGS.items():
            texts.append(chat(q, a, think=rng.random() < 0.1))
    rng.shuffle(texts)
    return texts


def build_tokenizer(texts: list[str]) -> Tokenizer:
    """Qwen2's byte-level BPE pipeline (model/tiny.py's), trained on `texts`, then Qwen's tokens."""
    tok = byte_level_bpe()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - len(SPECIAL) - len(ADDED), show_progress=False,
                                  special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Chat markup is not BPE material: the trainer sees the texts without it.
    plain = [t.replace(IM_START, "").replace(IM_END, "").replace("<think>", "").replace("</think>", "")
             for t in texts]
    tok.train_from_iterator(plain, trainer=trainer)
    tok.add_special_tokens(list(SPECIAL))
    tok.add_tokens(list(ADDED))
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, expected {VOCAB_SIZE}")
    return tok


def tokenizer_config(tok: Tokenizer) -> dict[str, Any]:
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": t in SPECIAL}
             for t in (*SPECIAL, *ADDED)}
    return {
        "tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added, "bos_token": None,
        "eos_token": IM_END, "pad_token": ENDOFTEXT, "unk_token": None,
        # model/tiny.py's: renders what Qwen3's own template renders (tools, <think>, enable_thinking)
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 4096, "add_prefix_space": False, "clean_up_tokenization_spaces": False,
        "errors": "replace", "split_special_tokens": False,
        "additional_special_tokens": [IM_START, IM_END],
    }


def encode(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    """One stream of token ids, each text followed by <|endoftext|>."""
    eot = tok.token_to_id(ENDOFTEXT)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


def hub_config(tok: Tokenizer) -> dict[str, Any]:
    eot, im_end = tok.token_to_id(ENDOFTEXT), tok.token_to_id(IM_END)
    return {
        "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "vocab_size": VOCAB_SIZE,
        **ARCH, "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096, "tie_word_embeddings": False, "initializer_range": 0.02,
        "router_aux_loss_coef": 0.001, "output_router_logits": False, "use_cache": True,
        "bos_token_id": eot, "eos_token_id": [im_end, eot], "torch_dtype": "float32",
    }


# -- model ------------------------------------------------------------------------------------

def init_weights(lm: CausalLM, mtp: MultiTokenPredictor, seed: int) -> None:
    """GPT-2 style: N(0, 0.02) matrices, output projections scaled down by depth; Qwen3-Next's
    zero-centred norms at 0 (identity); DeltaNet decay as in HF's init."""
    g = torch.Generator().manual_seed(seed)
    depth = lm.config.num_hidden_layers + 1
    with torch.no_grad():
        for name, p in [*lm.named_parameters(), *(("mtp." + n, p) for n, p in mtp.named_parameters())]:
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(1, 16, generator=g).log())
            elif name.endswith("dt_bias"):
                p.fill_(1.0)
            elif name.endswith("linear_attn.norm.weight"):
                p.fill_(1.0)  # the gated norm multiplies by w, not 1 + w
            elif "norm" in name:
                p.zero_()
            elif "conv1d" in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:
                residual_out = any(s in name for s in ("o_proj", "out_proj", "down"))
                std = 0.02 / math.sqrt(2 * depth) if residual_out else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)


class RouterBalance:
    """Switch-style load-balancing loss over every MoE block's router: E · Σ_e f_e · P_e, f the
    share of top-k picks and P the mean router probability of expert e (1.0 when balanced)."""

    def __init__(self, modules: list[SparseMoeBlock]) -> None:
        self.losses: list[torch.Tensor] = []
        for m in modules:
            m.register_forward_pre_hook(self._hook)

    def _hook(self, block: SparseMoeBlock, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0]
        probs = torch.softmax(F.linear(x, block.gate.weight).float(), -1)  # [T, E]
        E, k = probs.shape[-1], block.gate.top_k
        picks = torch.zeros_like(probs).scatter_(1, probs.topk(k, -1).indices, 1.0)
        self.losses.append(E * (picks.mean(0) / k * probs.mean(0)).sum())

    def take(self) -> torch.Tensor:
        loss = torch.stack(self.losses).mean()
        self.losses = []
        return loss


def forward_losses(lm: CausalLM, mtp: MultiTokenPredictor, batch: torch.Tensor, chained: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """batch [B, T+2] -> (main loss over T positions, MTP loss for the token after next over T
    positions, and with `chained` the second draft's loss (the MTP's own output as h, as a
    proposer chains drafts) over T-1 positions, else None)."""
    B, T = batch.shape[0], batch.shape[1] - 2
    x = batch[:, :T].reshape(-1)
    layout = BatchLayout.build(list(range(B)), [0] * B, [T] * B)
    caches = lm.make_caches(B, T + 1)
    h = lm.model.embed_tokens(x)
    for layer, cache in zip(lm.model.layers, caches, strict=True):
        h = layer(h, layout, cache)
    hidden = lm.model.norm(h)  # [B·T, H]: what CausalLM.forward returns and the MTP takes
    main = F.cross_entropy(lm.lm_head(hidden), batch[:, 1:T + 1].reshape(-1))
    # MTP at position i: h_i and the embedding of token i+1 -> token i+2.
    emb = lm.model.embed_tokens(batch[:, 1:T + 1].reshape(-1))
    out = mtp(emb, hidden, layout, mtp.make_cache(B, T + 1))
    mtp_loss = F.cross_entropy(lm.lm_head(out), batch[:, 2:T + 2].reshape(-1))
    if not chained:
        return main, mtp_loss, None
    # Second draft at position i+1: the MTP's output at i and token i+2 -> token i+3 (positions
    # 0..T-2 rather than 1..T-1: RoPE scores depend on relative positions only, and a run that
    # started at 1 would attend to an empty cache entry at 0).
    layout2 = BatchLayout.build(list(range(B)), [0] * B, [T - 1] * B)
    out2 = mtp(lm.model.embed_tokens(batch[:, 2:T + 1].reshape(-1)),
               out.view(B, T, -1)[:, :T - 1].reshape(B * (T - 1), -1), layout2, mtp.make_cache(B, T + 1))
    return main, mtp_loss, F.cross_entropy(lm.lm_head(out2), batch[:, 3:T + 2].reshape(-1))


@torch.no_grad()
def evaluate(lm: CausalLM, mtp: MultiTokenPredictor, data: torch.Tensor, T: int, n: int
             ) -> tuple[float, float]:
    """Main and MTP loss over n fixed windows of held-out data."""
    starts = torch.linspace(0, len(data) - T - 3, n).long()
    batch = torch.stack([data[s:s + T + 2] for s in starts.tolist()])
    main, mtp_loss, _ = forward_losses(lm, mtp, batch, chained=False)
    return float(main), float(mtp_loss)


# -- main -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="models/tiny-qwen3-next")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--mtp-weight", type=float, default=0.5, help="weight of the MTP loss")
    ap.add_argument("--chained-weight", type=float, default=0.0,
                    help="weight of the second draft's loss (0: not computed; it costs a third of a step)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=50)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t_start = time.time()

    rng = random.Random(args.seed)
    docs = stdlib_docstrings()
    train_docs = [d for d in docs if not is_heldout(d[0])]
    heldout_docs = [d for d in docs if is_heldout(d[0])]
    texts = training_texts(train_docs, rng)
    tok = build_tokenizer(texts)
    data = encode(tok, texts)
    heldout = encode(tok, [doc for _, doc in heldout_docs])
    print(f"{len(train_docs)} training docstrings ({len(texts)} texts, {len(data)} tokens), "
          f"{len(heldout_docs)} held out ({len(heldout)} tokens); tokenizer {time.time() - t_start:.0f}s",
          flush=True)

    config_dict = hub_config(tok)
    config = ModelConfig.from_hf(config_dict)
    lm, mtp = CausalLM(config), MultiTokenPredictor(config)
    init_weights(lm, mtp, args.seed)
    for m in [*lm.modules(), *mtp.modules()]:
        if isinstance(m, Experts):
            # torch 2.13's CPU grouped GEMM fails in backward on some group sizes ("Invalid
            # strides/sizes"); the per-expert loop (model/kernels.py's reference) is the same math.
            m.kernels = "reference"
    lm.train()
    mtp.train()
    balance = RouterBalance([m for m in [*lm.modules(), *mtp.modules()] if isinstance(m, SparseMoeBlock)])
    params = [*lm.parameters(), *mtp.parameters()]
    n_params = sum(p.numel() for p in params)
    print(f"{n_params / 1e6:.2f}M parameters", flush=True)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:  # linear warm-up, cosine to a tenth
        if step < warmup:
            return args.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    gen = torch.Generator().manual_seed(args.seed)
    T = args.seq_len
    rows: list[dict[str, float]] = []
    t_train = time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        starts = torch.randint(0, len(data) - T - 2, (args.batch,), generator=gen)
        batch = torch.stack([data[s:s + T + 2] for s in starts.tolist()])
        main_loss, mtp_loss, chained = forward_losses(lm, mtp, batch, chained=args.chained_weight > 0)
        aux = balance.take()
        loss = main_loss + args.mtp_weight * mtp_loss + 0.01 * aux
        if chained is not None:
            loss = loss + args.chained_weight * chained
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        row = {"step": step + 1, "seconds": round(time.time() - t_train, 1), "lr": lr_at(step),
               "train_main": main_loss.item(), "train_mtp": mtp_loss.item(), "router_balance": aux.item()}
        if chained is not None:
            row["train_mtp2"] = chained.item()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            lm.eval()
            mtp.eval()
            ev = evaluate(lm, mtp, heldout, T, 16)
            balance.take()
            lm.train()
            mtp.train()
            row.update(heldout_main=ev[0], heldout_mtp=ev[1])
            print(f"step {step + 1}/{args.steps} {row['seconds']:.0f}s train main {main_loss:.3f} "
                  f"mtp {mtp_loss:.3f} balance {aux:.3f} | held-out main {ev[0]:.3f} mtp {ev[1]:.3f}",
                  flush=True)
        rows.append(row)
        if (step + 1) % 10 == 0 and "heldout_main" not in row:
            print(f"step {step + 1}/{args.steps} {row['seconds']:.0f}s train main {main_loss:.3f} "
                  f"mtp {mtp_loss:.3f}", flush=True)

    summary = {"python": platform.python_version(), "torch": torch.__version__, "seed": args.seed,
               "threads": args.threads, "steps": args.steps, "batch": args.batch, "seq_len": T,
               "lr": args.lr, "mtp_weight": args.mtp_weight, "chained_weight": args.chained_weight,
               "parameters": n_params,
               "train_tokens": len(data), "heldout_tokens": len(heldout),
               "train_docstrings": len(train_docs), "heldout_docstrings": len(heldout_docs),
               "train_seconds": round(time.time() - t_train, 1),
               "final": {k: rows[-1][k] for k in rows[-1] if k.startswith(("heldout", "train"))}}
    save(Path(args.out), lm, mtp, tok, config_dict, rows, heldout_docs, summary)
    print(json.dumps(summary, indent=1), flush=True)
    return 0


def save(out: Path, lm: CausalLM, mtp: MultiTokenPredictor, tok: Tokenizer, config: dict[str, Any],
         rows: list[dict[str, float]], heldout_docs: list[tuple[str, str]], summary: dict[str, Any]) -> None:
    """Hub tensor names (routed experts split back into per-expert tensors), written to a temporary
    directory and moved into place, replacing an earlier checkpoint there."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in (("", lm), ("mtp.", mtp)):
        experts = {name: m for name, m in module.named_modules() if isinstance(m, Experts)}
        for name, p in module.named_parameters():
            owner = name.rsplit(".", 1)[0]
            if owner in experts:
                continue
            tensors[prefix + name] = p.detach().contiguous()
        for name, m in experts.items():
            i = m.down.shape[-1]
            for j, e in enumerate(m.expert_ids):
                tensors[f"{prefix}{name}.{e}.gate_proj.weight"] = m.gate_up[j, :i].detach().contiguous()
                tensors[f"{prefix}{name}.{e}.up_proj.weight"] = m.gate_up[j, i:].detach().contiguous()
                tensors[f"{prefix}{name}.{e}.down_proj.weight"] = m.down[j].detach().contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(dict(sorted(tensors.items())), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save(str(tmp / "tokenizer.json"))
        eot, im_end = tok.token_to_id(ENDOFTEXT), tok.token_to_id(IM_END)
        _write_json(tmp / "tokenizer_config.json", tokenizer_config(tok))
        _write_json(tmp / "generation_config.json",
                    {"bos_token_id": eot, "eos_token_id": [im_end, eot], "pad_token_id": eot})
        (tmp / "training").mkdir()
        with open(tmp / "training" / "loss.csv", "w", newline="") as f:
            fields = list(dict.fromkeys(k for r in rows for k in r))
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
        (tmp / "training" / "heldout.txt").write_text(
            "".join(f"{doc}\n{ENDOFTEXT}\n" for _, doc in heldout_docs))
        _write_json(tmp / "training" / "summary.json", summary)
        _plot(rows, tmp / "training" / "loss.png")
        _write_json(tmp / "config.json", config)
        tmp.chmod(0o755)  # mkdtemp and safetensors make them private; a checkpoint is meant to be shared
        for file in tmp.rglob("*"):
            file.chmod(0o755 if file.is_dir() else 0o644)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _plot(rows: list[dict[str, float]], file: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # loss.csv has every number
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = [r["step"] for r in rows]
    for key, label in (("train_main", "main (train)"), ("train_mtp", "MTP t+2 (train)")):
        ax.plot(steps, [r[key] for r in rows], label=label, alpha=0.6, linewidth=0.8)
    ev = [r for r in rows if "heldout_main" in r]
    for key, label in (("heldout_main", "main (held-out)"), ("heldout_mtp", "MTP t+2 (held-out)")):
        ax.plot([r["step"] for r in ev], [r[key] for r in ev], "o-", label=label, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(file)


def _write_json(file: Path, obj: Any) -> None:
    file.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    sys.exit(main())
