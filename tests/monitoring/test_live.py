"""The monitoring end to end on a running app (tiny model, local executor, one Serve app for the
module): the ingress's /metrics and /expert_load, Ray's metrics export, a real Prometheus
(Debian's) scraping both and answering PromQL with what the engine counted, every PromQL
expression of the Grafana dashboard and the rules naming only series that exist, and /dashboard
rendering its heatmap in headless Chromium (Debian's), saved as docs/dashboard.png when
NEXTSERVE_UPDATE_SCREENSHOT=1."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from monitoring.definitions import METRICS, series_names
from monitoring.promql import metric_names
from tests.monitoring import tools

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from deployments.app import build_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
TIMEOUT = 60


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from model.tiny import make_tiny_model

    model = make_tiny_model(tmp_path_factory.mktemp("mon-model"), arch="qwen3_next")
    metrics_port = tools.free_port()
    # Ray's agents report every second (default 10 s), so a test waits seconds, not minutes.
    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 1000},
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        port = tools.free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # The cluster executor, as ray_config.yaml runs it: its actors report step times and the
        # router's bytes too (1 attention + 1 DeltaNet actor, 2 expert shards, 1 CPU each).
        args = dict(model=str(model), dtype="float32", executor="cluster",
                    engine=dict(max_num_seqs=4, max_model_len=128, max_num_batched_tokens=128),
                    serve=dict(served_model_name="tiny", torch_threads=1))
        serve.run(build_app(args), name="nextserve", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        prompts = ["hello world", "the quick brown fox", "a", "metrics please"]
        with ThreadPoolExecutor(4) as pool:  # concurrent: steps with several sequences
            list(pool.map(lambda p: _complete(url, p), prompts))
        requests.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=TIMEOUT)  # 404
        yield {"url": url, "metrics_port": metrics_port, "port": port}
    finally:
        serve.shutdown()
        ray.shutdown()


def _complete(url: str, prompt: str) -> None:
    r = requests.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 6,
                                                     "temperature": 0, "ignore_eos": True}, timeout=TIMEOUT)
    r.raise_for_status()


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _value(samples, name: str, **labels) -> float:
    """Sum over the series of `name` whose labels include `labels` (Ray adds its own)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def _ray_scrape(port: int, until: str, timeout_s: float = 60) -> str:
    """Ray's export on this node, once it carries `until`."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if until in text or time.monotonic() > deadline:
            return text
        time.sleep(1)


def test_ingress_metrics_match_the_engine(app):
    stats = requests.get(f"{app['url']}/stats", timeout=TIMEOUT).json()
    s = _samples(requests.get(f"{app['url']}/metrics", timeout=TIMEOUT).text)
    assert stats["num_generated_tokens"] == 4 * 6
    assert _value(s, "nextserve_generation_tokens_total") == stats["num_generated_tokens"]
    assert _value(s, "nextserve_prompt_tokens_total") == stats["num_prompt_tokens"]
    assert _value(s, "nextserve_engine_steps_total") == stats["num_steps"]
    assert _value(s, "nextserve_requests_finished_total", reason="length") == 4
    assert _value(s, "nextserve_time_to_first_token_seconds_count") == 4
    assert _value(s, "nextserve_request_errors_total", kind="not_found") == 1
    assert _value(s, "nextserve_http_requests_total", route="/v1/completions", status="2xx") == 4
    load = requests.get(f"{app['url']}/expert_load", timeout=TIMEOUT).json()
    assert load["num_steps"] == stats["num_steps"] and load["layers"]
    for layer, row, step in zip(load["layers"], load["counts"], load["last_step"], strict=True):
        routed = _value(s, "nextserve_moe_routed_tokens_total", layer=str(layer))
        assert routed == sum(row) > 0
        assert _value(s, "nextserve_moe_active_experts_ratio", layer=str(layer)) == step["active_ratio"]
    assert 0 < _value(s, "nextserve_moe_active_params_ratio") < 1
    # the cluster's actors: one step time per actor per engine step; the router's bytes
    steps = stats["num_steps"]
    for kind, actors in (("engine", 1), ("attention", 1), ("deltanet", 1), ("experts", 2)):
        assert _value(s, "nextserve_actor_step_seconds_count", kind=kind) == actors * steps, kind
        assert _value(s, "nextserve_actor_step_seconds_sum", kind=kind) > 0, kind
    combine = _value(s, "nextserve_router_bytes_total", direction="combine")
    assert 0 < combine < _value(s, "nextserve_router_bytes_total", direction="dispatch")


def _all_promql() -> list[str]:
    exprs = []
    dash = json.loads((MONITORING / "grafana_dashboard.json").read_text())
    for panel in dash["panels"]:
        exprs += [t["expr"] for t in panel.get("targets", [])]
    rules = yaml.safe_load((MONITORING / "rules.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    return exprs


def test_every_promql_name_exists_in_a_live_scrape(app):
    recorded = {r["record"] for g in yaml.safe_load((MONITORING / "rules.yml").read_text())["groups"]
                for r in g["rules"] if "record" in r}
    exprs = _all_promql()
    assert len(exprs) > 20
    wanted = {n for e in exprs for n in metric_names(e)} - recorded
    # Ray exports its metrics in batches, some of them seconds after the others on a busy machine:
    # scrape until every name is there, or the deadline.
    deadline = time.monotonic() + 60
    while True:
        text = _ray_scrape(app["metrics_port"], "ray_nextserve_moe_routed_tokens_total")
        live = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
        missing = wanted - live
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not missing, f"PromQL names absent from Ray's export: {sorted(missing)}"
    # and every metric of the table reaches Ray's export under the name the docs promise
    for m in METRICS:
        assert set(series_names(m, ray=True)) & live, m.name


INSTALL = "CI installs it: scripts/install_monitoring_tools.sh"


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason=f"Debian's prometheus is not installed ({INSTALL})")
def test_prometheus_sees_what_the_engine_counted(app, tmp_path):
    stats = requests.get(f"{app['url']}/stats", timeout=TIMEOUT).json()
    load = requests.get(f"{app['url']}/expert_load", timeout=TIMEOUT).json()
    _ray_scrape(app["metrics_port"], "ray_nextserve_moe_routed_tokens_total")
    with tools.prometheus(tmp_path, [f"127.0.0.1:{app['metrics_port']}"], f"127.0.0.1:{app['port']}",
                          MONITORING / "rules.yml") as prom:
        gen = stats["num_generated_tokens"]
        assert tools.wait_for_value(prom, "sum(ray_nextserve_generation_tokens_total)", gen) == gen
        assert tools.wait_for_value(prom, 'sum(nextserve_generation_tokens_total{job="nextserve-ingress"})',
                                    gen) == gen
        for step in load["last_step"]:
            q = f'max(ray_nextserve_moe_active_experts_ratio{{layer="{step["layer"]}"}})'
            assert tools.wait_for_value(prom, q, step["active_ratio"]) == pytest.approx(step["active_ratio"])
        combine = _value(_samples(requests.get(f"{app['url']}/metrics", timeout=TIMEOUT).text),
                         "nextserve_router_bytes_total", direction="combine")
        q = 'sum(ray_nextserve_router_bytes_total{direction="combine"})'
        assert tools.wait_for_value(prom, q, combine) == combine
        layer = load["layers"][0]
        routed = sum(load["counts"][0])
        q = f'sum(ray_nextserve_moe_routed_tokens_total{{layer="{layer}"}})'
        assert tools.wait_for_value(prom, q, routed) == routed
        # the rules load and evaluate
        r = requests.get(f"{prom}/api/v1/rules", timeout=10).json()
        assert r["status"] == "success" and len(r["data"]["groups"]) == 2
        assert all(rule["health"] != "err" for g in r["data"]["groups"] for rule in g["rules"])


@pytest.mark.skipif(tools.chromium() is None, reason=f"Debian's chromium is not installed ({INSTALL})")
def test_dashboard_renders_the_heatmap(app, tmp_path):
    page = f"{app['url']}/dashboard"
    assert "<canvas id=\"heatmap\"" in requests.get(page, timeout=TIMEOUT).text
    assert requests.get(f"{app['url']}/dashboard/dashboard.js", timeout=TIMEOUT).ok
    # virtual time: the page polls a few times before the DOM is dumped
    out = tools.run_chromium(["--virtual-time-budget=4000", "--dump-dom", page], tmp_path)
    m = re.search(r'id="heatmap"[^>]*data-cells="(\d+)"', out.stdout) or \
        re.search(r'data-cells="(\d+)"[^>]*id="heatmap"', out.stdout)
    assert m, f"no heatmap in the DOM: {out.stdout[-2000:]} {out.stderr[-2000:]}"
    assert int(m.group(1)) > 0, "the heatmap drew no non-empty cell"
    assert "experts active in the last step" in out.stdout.lower()
    shot = tmp_path / "dashboard.png"
    out = tools.run_chromium(["--virtual-time-budget=4000", "--window-size=960,760",
                              f"--screenshot={shot}", page], tmp_path)
    assert shot.is_file() and shot.stat().st_size > 5000, out.stderr[-2000:]
    # The README's screenshot is refreshed on request only: a test run leaves the tree clean.
    if os.environ.get("NEXTSERVE_UPDATE_SCREENSHOT"):
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(shot, ROOT / "docs" / "dashboard.png")
