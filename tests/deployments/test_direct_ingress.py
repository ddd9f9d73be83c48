"""`serve.ingress: direct` (`nextserve serve --ingress direct`): the one engine replica serves HTTP
on http_options.port itself (Ray Serve's direct ingress), not through Serve's proxy. Refusals
without Ray; then a real `nextserve serve` subprocess on a tiny checkpoint, once with serve.ingress
left at its default (auto, which chooses direct ingress for one replica of a cluster it starts) and
once with `direct`: a streamed completion and /health on the documented port, the API key still
checked there, the port held by the replica process, and every socket of the cluster it started on
loopback. (tests/deployments/test_serve_command.py has the choice's other cases.) Start pytest in a
loopback-only network namespace, as for every test that starts Ray."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from deployments.cli import main
from deployments.serve_command import DEPLOYMENT_NAME, direct_ingress_environment
from tests.deployments.overload import burst
from tests.procfs import descendants, listening_sockets
from tests.serve_app import free_port

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-direct-ingress-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_NUM_SEQS, MAX_QUEUED = 4, 4


def write_config(path: Path, model: Path | str, port: int, deployment: dict,
                 ingress: str | None = "direct") -> Path:
    """A Serve config for `nextserve serve`; `ingress` None leaves serve.ingress at its default."""
    serve_args = {"served_model_name": "tiny", "torch_threads": 1, "max_queued_requests": MAX_QUEUED,
                  "retry_after_s": 2, **({} if ingress is None else {"ingress": ingress})}
    path.write_text(yaml.safe_dump({
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": "nextserve", "route_prefix": "/", "import_path": "deployments.app:build_app",
            "args": {"model": str(model), "dtype": "float32", "executor": "local",
                     "engine": {"max_num_seqs": MAX_NUM_SEQS, "max_model_len": 128,
                                "max_num_batched_tokens": 128, "engine_process": "inline"},
                     "serve": serve_args},
            "deployments": [{"name": DEPLOYMENT_NAME, **deployment}]}]}))
    return path


def run_cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_environment_pins_the_replica_to_the_one_port():
    env = direct_ingress_environment(8123)
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    # Serve's port range is [min, max): exactly the documented port.
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) \
        == ("8123", "8124")
    assert env["RAY_SERVE_PORT_QUARANTINE_S"] == "0"


def test_direct_ingress_refuses_several_replicas(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", ROOT / "models" / "tiny-qwen3-next", free_port(),
                       {"autoscaling_config": {"min_replicas": 1, "max_replicas": 3}})
    code, err = run_cli(["serve", "--config", str(cfg)], capsys)
    assert code == 2 and "serve.ingress: direct" in err and "3 replicas" in err, err


def test_direct_ingress_refuses_a_busy_port(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = write_config(tmp_path / "c.yaml", ROOT / "models" / "tiny-qwen3-next", port,
                           {"num_replicas": 1})
        code, err = run_cli(["serve", "--config", str(cfg)], capsys)
    assert code == 2 and f"127.0.0.1:{port}" in err, err


def test_ingress_flag_is_checked(capsys):
    code, err = run_cli(["serve", "--ingress", "haproxy"], capsys)
    assert code == 2 and "--ingress" in err, err


def test_a_cluster_to_join_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    cfg = write_config(tmp_path / "c.yaml", ROOT / "models" / "tiny-qwen3-next", free_port(),
                       {"num_replicas": 1})
    code, err = run_cli(["serve", "--config", str(cfg)], capsys)
    assert code == 2 and "starts itself" in err, err


def _listening(port: int) -> list[tuple[int, str]]:
    """(pid, "ADDR:PORT" hex as /proc/net/tcp{,6} writes it) of every listening socket on `port`."""
    return [(sock.pid, sock.address) for sock in listening_sockets(port=port)]


LOOPBACK = ("0100007F:", "00000000000000000000000001000000:", "0000000000000000FFFF00000100007F:")


@pytest.fixture(scope="module", params=[None, "direct"], ids=["default-ingress", "direct"])
def server(request, tmp_path_factory):
    """`nextserve serve` on a tiny checkpoint, a port of its own, an API key: serve.ingress at its
    default (auto), then `direct`. Yields (url, port, process, its log)."""
    pytest.importorskip("ray")
    from model.tiny import make_tiny_model

    tmp = tmp_path_factory.mktemp("direct")
    model = make_tiny_model(tmp / "model", arch="qwen3_next")
    port = free_port()
    cfg = write_config(tmp / "serve.yaml", model, port,
                       {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1}}, ingress=request.param)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NEXTSERVE_API_KEY": KEY}
    env.pop("RAY_ADDRESS", None)
    log = (tmp / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "deployments.cli", "serve", "--config", str(cfg)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"nextserve serve did not come up: {(tmp / 'serve.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, port, proc, tmp / "serve.log"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        log.close()


def test_a_streamed_completion_on_the_documented_port(server):
    url, *_ = server
    body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with requests.post(f"{url}/v1/completions", json=body, headers=headers, stream=True, timeout=60) as r:
        assert r.status_code == 200, r.text
        events = [ln[6:] for ln in r.iter_lines() if ln.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    tokens = [t for e in events[:-1] for c in json.loads(e)["choices"] for t in c.get("token_ids") or ()]
    assert len(tokens) == 8
    # The same request, not streamed, gives the same greedy tokens.
    plain = requests.post(f"{url}/v1/completions", json={**body, "stream": False}, headers=headers,
                          timeout=60)
    assert plain.status_code == 200 and plain.json()["choices"][0]["token_ids"] == tokens


def test_the_api_key_is_still_checked_but_health_is_open(server):
    url, *_ = server
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
    r = requests.get(f"{url}/v1/models", timeout=10)
    assert r.status_code == 401 and r.headers.get("WWW-Authenticate") == "Bearer"
    wrong = requests.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert wrong.status_code == 401
    ok = requests.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "tiny"


def test_the_replica_itself_listens_on_the_port_on_loopback(server):
    _, port, *_ = server
    holders = _listening(port)
    assert holders, f"nothing listens on {port}"
    names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid, _ in holders}
    assert all(n.startswith("ray::ServeRepl") for n in names), names  # not Serve's proxy
    assert all(addr.startswith(LOOPBACK) for _, addr in holders), holders


def test_every_socket_of_the_cluster_it_started_is_on_loopback(server):
    """The replica's HTTP server binds http_options.host (loopback here), as the proxy would."""
    proc = server[2]
    found = [(sock.pid, sock.address) for sock in listening_sockets(descendants(proc.pid))]
    assert found and all(addr.startswith(LOOPBACK) for _, addr in found), found


def test_the_start_up_line_and_stats_say_direct_ingress(server):
    url, _, _, log = server
    deadline = time.monotonic() + 60  # the replica may answer before `serve.run` returns
    while "(direct ingress: the replica serves this port itself)" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    chosen = [ln for ln in log.read_text().splitlines() if ln.startswith("nextserve: ingress ")]
    assert chosen[0].startswith("nextserve: ingress direct: serve.ingress: "), chosen
    assert _stats(url)["ingress"] == "direct"


def _stats(url: str) -> dict:
    return requests.get(f"{url}/stats", headers=AUTH, timeout=10).json()


def _wait_idle(url: str, timeout_s: float = 20) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        s = _stats(url)
        if (s["num_slots_used"] == 0 and s["num_running"] == 0 and s["num_waiting"] == 0) \
                or time.monotonic() > deadline:
            return s
        time.sleep(0.1)


def test_a_client_that_leaves_frees_its_slot(server):
    """With no proxy in between, the replica's own HTTP server must pass the disconnect on."""
    url, *_ = server
    start = _wait_idle(url)
    body = {"model": "tiny", "prompt": "go on", "max_tokens": 100, "temperature": 0, "ignore_eos": True,
            "stream": True}
    r = requests.post(f"{url}/v1/completions", json=body, headers=AUTH, stream=True, timeout=60)
    lines = r.iter_lines()
    while not next(lines).startswith(b"data: "):
        pass
    assert _stats(url)["num_slots_used"] == start["num_slots_used"] + 1
    r.close()
    end = _wait_idle(url)
    assert end["num_slots_used"] == 0
    assert end["num_generated_tokens"] - start["num_generated_tokens"] < 100


def test_a_full_replica_answers_429_with_retry_after(server):
    url, *_ = server
    n = MAX_NUM_SEQS + MAX_QUEUED + 4
    body = {"model": "tiny", "prompt": "wait", "max_tokens": 100, "stream": True, "ignore_eos": True}
    statuses = burst(url, body, n, n - MAX_NUM_SEQS - MAX_QUEUED, headers=AUTH)
    refused = [(h, e) for s, h, e in statuses if s == 429]
    assert len(statuses) == n and {s for s, _, _ in statuses} <= {200, 429}, statuses
    assert len(refused) == n - MAX_NUM_SEQS - MAX_QUEUED, statuses
    assert all(h == "2" and e == "RateLimitError" for h, e in refused), statuses
    assert _wait_idle(url)["num_slots_used"] == 0


def test_a_replacement_replica_serves_the_same_port(server):
    """Last: kills the replica. Serve starts another, which takes the documented port again (the
    port range is that one port and Serve's quarantine of released ports is off)."""
    url, port, proc, _ = server
    (pid,) = {pid for pid, _ in _listening(port)}
    assert pid in descendants(proc.pid)  # this test's own server's replica, nothing else
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:
        holders = _listening(port)
        try:
            if holders and {p for p, _ in holders} != {pid} \
                    and requests.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "no replica came back on the port"
        time.sleep(0.5)
    r = requests.post(f"{url}/v1/completions", headers=AUTH, timeout=60,
                      json={"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
