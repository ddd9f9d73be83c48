"""Each GPU kernel against its pure-torch reference at Qwen3-Next's real widths, within the README's
tolerances (bench/kernel_checks.py), and the compiled decode step under CUDA graphs against
eager on a tiny checkpoint. Marked gpu; skipped without a CUDA device (the fla rows also without
fla-core). Run on the GPU machine: `python -m pytest -q -m gpu tests/model/test_kernels_gpu.py`."""

from __future__ import annotations

import pytest
import torch

from bench.kernel_checks import CHECKS, REAL
from model import kernels

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_kernel_matches_reference(check):
    row = check(REAL, torch.device("cuda"), torch.bfloat16)
    if row["ok"] is None:
        pytest.skip(row["note"])
    assert row["ok"], row


def test_auto_picks_the_kernels_on_cuda():
    x = torch.zeros(2, 8, device="cuda", dtype=torch.bfloat16)
    assert kernels.deltanet_backend(x) == ("fla" if kernels.fla_ops() is not None else "torch")
    assert kernels.decode_attention_backend(x) == "sdpa"


def test_cuda_graph_decode_matches_eager(tmp_path):
    from model.batch import BatchLayout
    from model.compiled import CompiledDecode
    from model.decode_math import make_decode_caches
    from model.decoder import CausalLM
    from model.tiny import make_tiny_model

    model = CausalLM.from_pretrained(make_tiny_model(tmp_path / "m"), device="cuda")
    slots, blocks = 4, 16
    eager_caches = make_decode_caches(model, slots, 64, 16, blocks)
    caches = make_decode_caches(model, slots, 64, 16, blocks)
    decode = CompiledDecode(model, caches, slots, blocks, buckets=(2, 4))
    assert decode.cuda_graphs
    decode.warm_up()
    seqs = {0: [5, 9, 13], 1: [101, 7, 3, 3, 8], 2: [250]}
    with torch.inference_mode():
        layout = BatchLayout.build(list(seqs), [0] * 3, [len(s) for s in seqs.values()], device="cuda")
        ids = torch.tensor([t for s in seqs.values() for t in s], device="cuda")
        model(ids, layout, eager_caches)
        model(ids, layout, caches)
    for _ in range(5):
        layout = BatchLayout.build(list(seqs), [len(s) - 1 for s in seqs.values()], [1] * 3, device="cuda")
        ids = torch.tensor([s[-1] for s in seqs.values()], device="cuda")
        with torch.inference_mode():
            want = model.compute_logits(model(ids, layout, eager_caches))
        got = model.compute_logits(decode(ids, layout))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())
        for s, t in zip(seqs.values(), want.argmax(-1).tolist(), strict=True):
            s.append(t)
