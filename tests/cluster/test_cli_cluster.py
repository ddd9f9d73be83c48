"""`nextserve generate --executor cluster --config FILE` end to end: the CLI starts a local Ray
cluster (none is running), places the actors by FILE, gives the local executor's greedy tokens,
and stops what it started. Run inside a loopback-only network namespace (see test_cluster_executor)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deployments.cli import main

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["5,17,99,3", "250,7", "1"]


def generate_args(model_dir, executor: str) -> list[str]:
    args = ["generate", "--model", str(model_dir), "--executor", executor, "--temperature", "0",
            "--max-tokens", "5", "--ignore-eos", "--json", "--dtype", "float32", "--max-model-len", "64"]
    for p in PROMPTS:
        args += ["--prompt-token-ids", p]
    return args


def test_generate_with_cluster_executor_matches_local(hf_next_dir, tmp_path, capsys):
    assert main(generate_args(hf_next_dir, "local")) == 0
    want = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    config = tmp_path / "ray_config.yaml"
    config.write_text(yaml.safe_dump({"applications": [{
        "name": "nextserve", "import_path": "deployments.app:build_app",
        "args": {"executor": "cluster", "cluster": {"micro_batch_tokens": 4},
                 "pools": {"experts": {"actors": 2, "experts": [[0, 1, 2, 3, 4], [4, 5, 6, 7]]}}}}]}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, "-m", "deployments.cli", *generate_args(hf_next_dir, "cluster"),
                           "--config", str(config)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [g["token_ids"] for g in got] == [w["token_ids"] for w in want]
    for g, w in zip(got, want, strict=True):
        assert g["logprobs"] == pytest.approx(w["logprobs"], abs=1e-4)


def test_bad_config_is_a_usage_error(hf_next_dir, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"applications": [{"args": {"pools": {"experts": {"actors": 0}}}}]}))
    assert main([*generate_args(hf_next_dir, "cluster"), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "--config:" in err and "pools.experts.actors" in err and "(got 0)" in err
