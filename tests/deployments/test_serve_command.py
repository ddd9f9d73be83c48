"""`nextserve serve` and ray_config.yaml without starting Ray: the file is a valid Serve config
whose deployment names match the app's, and bad flags or files end with exit code 2 and one line."""

import pytest
import yaml

from deployments.cli import main
from deployments.serve_command import DEFAULT_CONFIG, DEPLOYMENT_NAME, deployment_options, load_app_config


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
