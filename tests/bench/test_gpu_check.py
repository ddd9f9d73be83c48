"""bench/gpu_check.py's CPU dry run end to end at tiny widths: every section writes its rows
(the fla rows say they were skipped, the timings that they are of the reference paths), so the
script the GPU session runs is known to work but for the GPU itself."""

from __future__ import annotations

import json

from bench.gpu_check import main


def test_dry_run_writes_every_section(tmp_path):
    code = main(["--small", "--device", "cpu", "--out", str(tmp_path), "--layers", "1", "--batch", "2",
                 "--prompt", "8", "--steps", "2"])
    assert code == 0
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["env"]["fla_kernels"] is False and "reference paths" in r["note"]
    checks = {c["check"]: c for c in r["checks"]}
    assert checks["delta_rule_chunk"]["ok"] is None and "fla-core" in checks["delta_rule_chunk"]["note"]
    assert checks["moe_grouped_mm"]["ok"] and checks["fp8_experts_on_the_fly"]["ok"]
    (ours,) = r["ours"]
    assert ours["layers"] == 1 and ours["batch"] == 2
    for key in ("prefill_ms_kernels", "decode_ms_kernels", "decode_ms_reference", "decode_ms_hbm_floor"):
        assert ours[key] > 0, key
    (hf,) = r["transformers"]
    assert hf["decode_ms"] > 0 and ours["vs_transformers_decode"] > 0
    assert r["copy_bandwidth_gbs"] > 0 and r["skipped"] == []
    assert {f["op"].split()[0] for f in r["fp8"]} == {"linear", "experts"}
    (att,) = r["attention"]
    assert att["sdpa_ms"] > 0 and att["einsum_ms"] > 0 and att["context"] == 8
    assert all(f["fp8_dequantize_ms"] > 0 and "fp8_scaled_mm_ms" not in f for f in r["fp8"])


def test_every_check_runs_with_stand_in_fla(monkeypatch):
    """The fla rows' own code (inputs, layouts, references) with pure-torch stand-ins for fla's
    ops: on the GPU only the kernels themselves are new."""
    import torch

    from bench.kernel_checks import SMALL, run_checks
    from model import kernels
    from tests.model.test_kernels import FAKE_FLA

    monkeypatch.setattr(kernels, "fla_ops", lambda: FAKE_FLA)
    rows = {r["check"]: r for r in run_checks(SMALL, "cpu", torch.float32)}
    for name in ("delta_rule_chunk", "delta_rule_recurrent", "deltanet_layer", "moe_grouped_mm",
                 "decode_attention_sdpa", "fp8_experts_on_the_fly"):
        assert rows[name]["ok"] is True, rows[name]
    assert rows["fp8_block_scaled_mm"]["ok"] is None  # no block-scaled FP8 GEMM on a CPU
