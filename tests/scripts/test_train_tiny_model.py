"""scripts/train_tiny_model.py's pieces on a small config: what it saves is a checkpoint in the hub's
names and shapes that loads back into the same model (MTP included), and its training forward is
the inference forward with the MTP shifted by one token."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from model.batch import BatchLayout
from model.config import ModelConfig
from model.decoder import CausalLM
from model.moe import Experts
from model.mtp import MTPProposer, MultiTokenPredictor
from model.tiny import make_tiny_model, tensor_shapes
from model.weights import CheckpointReader
from scripts.train_tiny_model import forward_losses, init_weights, is_heldout, save


def test_saved_checkpoint_loads_back_and_training_forward_is_inference_forward(tmp_path):
    tiny = make_tiny_model(tmp_path / "tiny")
    config_dict = json.loads((tiny / "config.json").read_text())
    config = ModelConfig.from_hf(config_dict)
    lm, mtp = CausalLM(config), MultiTokenPredictor(config)
    init_weights(lm, mtp, seed=0)
    for m in [*lm.modules(), *mtp.modules()]:
        if isinstance(m, Experts):
            m.kernels = "reference"  # as the script trains
    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    out = tmp_path / "trained"
    save(out, lm, mtp, tok, config_dict, [{"step": 1, "train_main": 1.0}], [("a.b", "Doc.")], {"steps": 1})

    with CheckpointReader(out) as reader:
        names = reader.names()
        expected = tensor_shapes(config_dict)
        assert names == set(expected)
        for n in ("mtp.fc.weight", "mtp.layers.0.mlp.experts.3.up_proj.weight",
                  "model.layers.0.linear_attn.in_proj_qkvz.weight"):
            assert tuple(reader.get(n).shape) == expected[n]
    assert (out / "training" / "loss.csv").read_text().startswith("step,train_main")

    loaded = CausalLM.from_pretrained(out, dtype="float32")
    proposer = MTPProposer.from_pretrained(loaded, out)
    batch = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    main, mtp_loss, chained = forward_losses(lm, mtp, batch, chained=True)
    T = 10
    with torch.no_grad():
        ref_main, ref_mtp = [], []
        for row in batch:
            layout = BatchLayout.build([0], [0], [T])
            hidden = loaded(row[:T], layout, loaded.make_caches(1, T + 1))
            ref_main.append(F.cross_entropy(loaded.compute_logits(hidden), row[1:T + 1]))
            out = proposer.step(row[1:T + 1], hidden, layout, proposer.make_cache(1, T + 1))
            draft = loaded.compute_logits(out)
            ref_mtp.append(F.cross_entropy(draft, row[2:T + 2]))
    torch.testing.assert_close(main.detach(), torch.stack(ref_main).mean(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mtp_loss.detach(), torch.stack(ref_mtp).mean(), rtol=1e-4, atol=1e-4)
    assert chained is not None and torch.isfinite(chained)
    main.backward()  # the training forward runs under autograd
    assert lm.model.layers[0].linear_attn.A_log.grad is not None


def test_heldout_split_is_by_name():
    names = [f"mod.func{i}" for i in range(2000)]
    held = [n for n in names if is_heldout(n)]
    assert 20 < len(held) < 80 and held == [n for n in names if is_heldout(n)]
