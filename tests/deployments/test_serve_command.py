"""`nextserve serve` and ray_config.yaml without starting Ray: the file is a valid Serve config
whose deployment names match the app's, and bad flags or files end with exit code 2 and one line."""

import pytest
import yaml

from deployments.cli import main
from deployments.config import NextserveConfig
from deployments.serve_command import (
    DEFAULT_CONFIG,
    DEPLOYMENT_NAME,
    ServeUsageError,
    choose_ingress,
    deployment_options,
    load_app_config,
    max_replicas,
)


def test_ray_config_is_a_serve_config():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(raw)
    (app,) = schema.applications
    assert app.import_path == "deployments.app:build_app"
    assert [d.name for d in app.deployments] == [DEPLOYMENT_NAME]
    entry, _, http = load_app_config(DEFAULT_CONFIG, model=None)
    assert http["host"] == "127.0.0.1" and "autoscaling_config" in deployment_options(entry)
    assert load_app_config(DEFAULT_CONFIG, model="/elsewhere")[1]["model"] == "/elsewhere"


def run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["serve", "--port", "0"], ["--port", "0"]),
    (["serve", "--port", "x"], ["--port", "'x'"]),
    (["serve", "--model", "/no/such/dir"], ["--model", "/no/such/dir", "config.json"]),
    (["serve", "--config", "/no/such.yaml"], ["--config", "/no/such.yaml"]),
])
def test_serve_usage_errors(argv, words, capsys):
    code, err = run(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err


def test_bad_config_values_are_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"applications": [{"name": "x", "import_path": "deployments.app:build_app",
                                                     "args": {"engine": {"max_num_seqs": 0}}}]}))
    code, err = run(["serve", "--config", str(bad)], capsys)
    assert code == 2 and "engine.max_num_seqs" in err and "0" in err, err


# serve.ingress: auto (the default) takes direct ingress exactly where `nextserve serve` can give it.
FREE = dict(replicas=1, join_address=None, port_error=None)


def test_auto_chooses_direct_where_it_can_be_and_says_why():
    choice = choose_ingress("auto", **FREE)
    assert choice.mode == "direct" and "auto" in choice.why and "one engine replica" in choice.why


@pytest.mark.parametrize("facts, words", [
    (dict(replicas=3), ["3 replicas"]),
    (dict(replicas="auto"), ["default max_replicas"]),
    (dict(join_address="10.0.0.5:6379"), ["10.0.0.5:6379", "starts"]),
    (dict(serve_has_direct_ingress=False), ["no direct ingress"]),
])
def test_auto_falls_back_to_the_proxy_and_direct_refuses(facts, words):
    choice = choose_ingress("auto", **{**FREE, **facts})
    assert choice.mode == "proxy" and "auto" in choice.why and all(w in choice.why for w in words), choice
    with pytest.raises(ServeUsageError) as e:
        choose_ingress("direct", **{**FREE, **facts})
    assert "serve.ingress: direct" in str(e.value) and all(w in str(e.value) for w in words), e.value


def test_a_port_nothing_can_listen_on_is_refused_by_auto_and_direct():
    busy = {**FREE, "port_error": "cannot listen on 127.0.0.1:80 (Permission denied)"}
    for setting in ("auto", "direct"):
        with pytest.raises(ServeUsageError, match=r"--port: cannot listen on 127.0.0.1:80"):
            choose_ingress(setting, **busy)


def test_proxy_and_direct_are_taken_as_asked():
    assert choose_ingress("proxy", replicas=3, join_address="x:1", port_error="busy").mode == "proxy"
    assert choose_ingress("direct", **FREE).mode == "direct"
    with pytest.raises(ServeUsageError, match="'haproxy'"):
        choose_ingress("haproxy", **FREE)


@pytest.mark.parametrize("options, replicas", [
    ({}, 1),
    ({"num_replicas": 2}, 2),
    ({"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}, 1),
    ({"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}, 4),
    ({"autoscaling_config": {"min_replicas": 1}}, 1),  # Serve's default max_replicas
    ({"num_replicas": "auto"}, "auto"),
    ({"num_replicas": "auto", "autoscaling_config": {"max_replicas": 1}}, 1),
])
def test_max_replicas(options, replicas):
    assert max_replicas(options) == replicas


def test_the_shipped_config_defaults_to_auto_and_a_bad_value_is_named(tmp_path, capsys):
    _, args, _ = load_app_config(DEFAULT_CONFIG, model=None)
    assert NextserveConfig.from_args(args).serve.ingress == "auto"
    assert NextserveConfig.from_args({}).serve.ingress == "auto"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"applications": [{"name": "x", "import_path": "deployments.app:build_app",
                                                     "args": {"serve": {"ingress": "haproxy"}}}]}))
    code, err = run(["serve", "--config", str(bad)], capsys)
    assert code == 2 and "serve.ingress" in err and "haproxy" in err, err
    code, err = run(["serve", "--ingress", "haproxy"], capsys)
    assert code == 2 and "--ingress" in err and "haproxy" in err, err
