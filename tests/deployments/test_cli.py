"""`nextserve` argument errors: exit code 2, one line on stderr naming the flag and the value."""

import json

import pytest

from deployments.cli import main


@pytest.fixture
def config_only_dir(tmp_path):
    """A checkpoint directory with just config.json: enough for every check made before loading."""
    (tmp_path / "config.json").write_text(json.dumps(dict(
        architectures=["Qwen3MoeForCausalLM"], vocab_size=384, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        num_experts=2, num_experts_per_tok=1,
        moe_intermediate_size=8, eos_token_id=1, dtype="float32")))
    return tmp_path


def run_cli(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors exit from inside parse_args
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args, expected", [
    (["--prompt-token-ids", "1,x"], ["--prompt-token-ids", "'1,x'"]),
    (["--prompt-token-ids", "1,-2"], ["--prompt-token-ids", "'1,-2'"]),
    (["--prompt-token-ids", "1,384"], ["--prompt-token-ids", "384", "vocab_size 384"]),
    (["--prompt-token-ids", "1", "--temperature", "-1"], ["--temperature", "-1"]),
    (["--prompt-token-ids", "1", "--max-tokens", "0"], ["--max-tokens", "0"]),
    (["--prompt-token-ids", "1", "--top-p", "2"], ["--top-p", "2"]),
    (["--prompt-token-ids", "1", "--repetition-penalty", "0"], ["--repetition-penalty", "got 0.0"]),
    (["--prompt-token-ids", "1", "--min-tokens", "20"], ["--min-tokens", "max_tokens (16)"]),
    (["--prompt-token-ids", "1", "--presence-penalty", "3"], ["--presence-penalty", "[-2, 2]"]),
    (["--prompt-token-ids", "1", "--max-tokens", "many"], ["--max-tokens", "'many'"]),
    (["--prompt-token-ids", "1", "--max-model-len", "0"], ["--max-model-len", "0"]),
    (["--prompt-token-ids", "1", "--num-kv-blocks", "0"], ["--num-kv-blocks", "0"]),
    (["--prompt-token-ids", "1", "--block-size", "0"], ["--block-size", "0"]),
    (["--prompt-token-ids", "1", "--prefix-cache-states", "-1"], ["--prefix-cache-states", "-1"]),
    (["--prompt-token-ids", "1", "--prefix-cache-state-interval", "0"],
     ["--prefix-cache-state-interval", "0"]),
    (["--prompt-token-ids", "1", "--prompt", "hi"], ["--prompt", "--prompt-token-ids", "not allowed"]),
    ([], ["--prompt", "--prompt-token-ids", "required"]),
    (["--prompt", "hi"], ["--prompt", "tokenizer.json"]),
])
def test_generate_argument_errors(args, expected, config_only_dir, capsys):
    code, err = run_cli(["generate", "--model", str(config_only_dir), *args], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for word in expected:
        assert word in err, err


def test_missing_model_dir(tmp_path, capsys):
    missing = tmp_path / "nope"
    code, err = run_cli(["generate", "--model", str(missing), "--prompt-token-ids", "1,2"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "--model" in err and str(missing) in err and "config.json" in err


def test_unknown_subcommand_and_executor(config_only_dir, capsys):
    code, err = run_cli(["frobnicate"], capsys)
    assert code == 2 and "frobnicate" in err
    code, err = run_cli(["generate", "--model", str(config_only_dir), "--prompt-token-ids", "1",
                         "--executor", "warp"], capsys)
    assert code == 2 and "--executor: invalid choice: 'warp'" in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny"), arch="qwen3_next")


def test_generate_json_end_to_end(tiny_dir, capsys):
    from engine.llm_engine import LLMEngine
    from engine.local_executor import LocalExecutor
    from engine.sampling import SamplingParams

    prompts = [[5, 9, 13], [101], [3, 3, 3, 250, 17]]
    code = main(["generate", "--model", str(tiny_dir), "--max-tokens", "4", "--temperature", "0", "--json",
                 *[a for p in prompts for a in ("--prompt-token-ids", ",".join(map(str, p)))]])
    assert code == 0
    lines = capsys.readouterr().out.strip().split("\n")
    got = [json.loads(line) for line in lines]
    ex = LocalExecutor(model_dir=tiny_dir, num_slots=1, max_model_len=64)
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=True)
    for p, g in zip(prompts, got, strict=True):
        (want,) = LLMEngine(ex).generate([p], params)
        assert set(g) == {"token_ids", "logprobs"}
        assert g["token_ids"] == list(want.token_ids)
        assert g["logprobs"] == pytest.approx(list(want.logprobs), abs=5e-4)  # see test_local_executor


def test_generate_with_a_small_kv_cache(tiny_dir, capsys):
    """--num-kv-blocks smaller than the prompts need together: the same tokens (sequences are
    preempted and recomputed); a prompt larger than the whole cache is a usage error."""
    argv = ["generate", "--model", str(tiny_dir), "--max-tokens", "6", "--temperature", "0", "--json",
            "--prompt-token-ids", "5,9,13,2,77,31,8", "--prompt-token-ids", "3,3,3,250,17"]
    assert main(argv) == 0
    want = [json.loads(line) for line in capsys.readouterr().out.strip().split("\n")]
    assert main([*argv, "--block-size", "4", "--num-kv-blocks", "4"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.strip().split("\n")]
    assert [g["token_ids"] for g in got] == [w["token_ids"] for w in want]
    for g, w in zip(got, want, strict=True):  # recomputed in other batches: float32 noise only
        assert g["logprobs"] == pytest.approx(w["logprobs"], abs=5e-4)
    code, err = run_cli([*argv, "--block-size", "2", "--num-kv-blocks", "3"], capsys)
    assert code == 2 and "--prompt-token-ids" in err and "KV-cache blocks" in err and err.count("\n") == 1


def test_generate_with_and_without_prefix_caching(tiny_dir, capsys):
    """The second prompt extends the first: with the cache (the default) it resumes from the
    first's saved state when run after it; --no-prefix-caching computes it whole. Same tokens."""
    first = [5, 9, 13, 2, 77, 31, 8, 40, 41, 42]
    argv = ["generate", "--model", str(tiny_dir), "--max-tokens", "6", "--temperature", "0", "--json",
            "--block-size", "4", "--max-num-seqs", "1", "--prefix-cache-state-interval", "1",
            "--prompt-token-ids", ",".join(map(str, first)),
            "--prompt-token-ids", ",".join(map(str, [*first, 7, 7]))]
    outs = []
    for extra in ([], ["--no-prefix-caching"], ["--prefix-cache-states", "0"]):
        assert main([*argv, *extra]) == 0
        outs.append([json.loads(line) for line in capsys.readouterr().out.strip().split("\n")])
    for got in outs[1:]:
        assert [g["token_ids"] for g in got] == [w["token_ids"] for w in outs[0]]
        for g, w in zip(got, outs[0], strict=True):
            assert g["logprobs"] == pytest.approx(w["logprobs"], abs=5e-4)


def test_generate_with_speculative_tokens(tiny_dir, tmp_path, capsys):
    """--speculative-tokens K drafts with the checkpoint's MTP layer: the same greedy tokens; a
    checkpoint without one is a usage error naming the key."""
    argv = ["generate", "--model", str(tiny_dir), "--max-tokens", "9", "--temperature", "0", "--json",
            "--prompt-token-ids", "5,9,13,2,77,31,8", "--prompt-token-ids", "3,3,3,250,17"]
    assert main(argv) == 0
    want = [json.loads(line) for line in capsys.readouterr().out.strip().split("\n")]
    assert main([*argv, "--speculative-tokens", "2"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.strip().split("\n")]
    assert [g["token_ids"] for g in got] == [w["token_ids"] for w in want]
    code, err = run_cli([*argv, "--speculative-tokens", "-1"], capsys)
    assert code == 2 and "--speculative-tokens" in err
    from model.tiny import make_tiny_model

    moe = make_tiny_model(tmp_path / "moe", arch="qwen3_moe")
    code, err = run_cli(["generate", "--model", str(moe), "--prompt-token-ids", "1",
                         "--speculative-tokens", "2"], capsys)
    assert code == 2 and "speculative_tokens=2" in err


def test_generate_text_prompts(tiny_dir, capsys):
    argv = ["generate", "--model", str(tiny_dir), "--prompt", "hello world", "--prompt", "a",
            "--max-tokens", "3", "--temperature", "0.8", "--seed", "1"]
    assert main([*argv, "--json"]) == 0
    first = [json.loads(line) for line in capsys.readouterr().out.strip().split("\n")]
    assert len(first) == 2 and all(1 <= len(r["token_ids"]) <= 3 for r in first)
    assert main([*argv, "--json"]) == 0  # same seed, same tokens
    assert [json.loads(line) for line in capsys.readouterr().out.strip().split("\n")] == first
    assert main(argv) == 0  # without --json: the decoded text, one line per prompt at most
    assert "{" not in capsys.readouterr().out


def test_token_ids_below_the_models_vocab_size(tiny_dir, capsys):
    """The server's rule: ids below max(tokenizer size 483, vocab_size 512) are valid; those
    without a token decode to ""."""
    code = main(["generate", "--model", str(tiny_dir), "--max-tokens", "2", "--temperature", "0",
                 "--prompt-token-ids", "3,483,511"])
    assert code == 0
    code, err = run_cli(["generate", "--model", str(tiny_dir), "--prompt-token-ids", "3,512"], capsys)
    assert code == 2 and "512" in err and "vocab_size 512" in err and err.count("\n") == 1


def test_quantized_checkpoint_is_refused(tiny_dir, tmp_path, capsys):
    import shutil

    d = tmp_path / "awq"
    shutil.copytree(tiny_dir, d)
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (d / "config.json").write_text(json.dumps(config))
    code, err = run_cli(["generate", "--model", str(d), "--prompt-token-ids", "3"], capsys)
    assert code == 2 and "quantization_config.quant_method='awq'" in err and err.count("\n") == 1


def test_rebalance_sends_the_admin_key(monkeypatch, capsys):
    import requests

    sent = {}

    class Reply:
        ok, status_code, text = True, 200, "{}"

        def json(self):
            return {"scheduled": True}

    def fake_post(url, headers=None, timeout=None):
        sent.update(url=url, headers=headers)
        return Reply()

    monkeypatch.setattr(requests, "post", fake_post)
    monkeypatch.setenv("NEXTSERVE_ADMIN_API_KEY", "from-env")
    assert main(["rebalance", "--url", "http://h:1/"]) == 0
    assert sent == {"url": "http://h:1/rebalance", "headers": {"Authorization": "Bearer from-env"}}
    assert main(["rebalance", "--url", "http://h:1", "--admin-key", "flag"]) == 0
    assert sent["headers"] == {"Authorization": "Bearer flag"}


def test_make_tiny_model(tmp_path, capsys):
    assert main(["make-tiny-model", str(tmp_path / "m"), "--arch", "qwen3_moe"]) == 0
    assert (tmp_path / "m" / "config.json").is_file()
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]


def test_rebalance_without_a_server(capsys):
    """Port 9 (discard) has no server on loopback: one line naming the flag, exit code 2."""
    code, err = run_cli(["rebalance", "--url", "http://127.0.0.1:9"], capsys)
    assert code == 2 and err.strip() == ("nextserve rebalance: error: --url: cannot reach "
                                         "http://127.0.0.1:9 (ConnectionError)")


def test_generate_defaults_to_the_builtin_trained_model(capsys):
    """Without --model: the trained checkpoint shipped in models/tiny-qwen3-next, whose greedy
    text is English (it learnt the standard library's docstrings), not byte soup."""
    from deployments.cli import TINY_MODEL_DIR

    assert (TINY_MODEL_DIR / "config.json").is_file(), "the built-in model ships in the repository"
    code = main(["generate", "--prompt", "Return the", "--max-tokens", "12", "--temperature", "0"])
    assert code == 0
    words = capsys.readouterr().out.split()
    known = {"the", "a", "of", "to", "is", "and", "in", "file", "object", "return", "string", "name", "if",
             "value", "list", "be", "for", "or", "this", "that", "an", "new", "with", "by", "as", "not"}
    assert sum(w.strip(".,:;()'\"`").lower() in known for w in words) >= 3, words


def test_missing_builtin_model_names_how_to_restore_it(tmp_path, monkeypatch, capsys):
    import deployments.cli as cli

    monkeypatch.setattr(cli, "TINY_MODEL_DIR", tmp_path / "tiny-qwen3-next")
    code, err = run_cli(["generate", "--prompt", "hi"], capsys)
    assert code == 2 and "--model" in err and "git checkout -- models/tiny-qwen3-next" in err
