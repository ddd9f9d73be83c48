"""Start Debian's prometheus and chromium for the live tests: loopback only, free ports, temp
dirs, stopped by PID."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def prometheus(tmp: Path, ray_targets: list[str], ingress: str, rules: Path) -> Iterator[str]:
    """A Prometheus on 127.0.0.1 scraping every second: Ray's export ports through a file_sd file
    in the format Ray's head writes, and the ingress's /metrics; yields its base URL."""
    sd = tmp / "ray_sd.json"
    sd.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": ray_targets}]))
    shutil.copy(rules, tmp / "rules.yml")
    (tmp / "prometheus.yml").write_text(json.dumps({  # YAML is a superset of JSON
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yml"],
        "scrape_configs": [
            {"job_name": "ray", "file_sd_configs": [{"files": [str(sd)]}]},
            {"job_name": "nextserve-ingress", "static_configs": [{"targets": [ingress]}]},
        ]}))
    port = free_port()
    log = (tmp / "prometheus.log").open("w")
    proc = subprocess.Popen(["prometheus", f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{url}/-/ready", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (tmp / "prometheus.log").read_text()[-2000:]
                raise RuntimeError(f"prometheus did not start: {tail}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def query(url: str, promql: str) -> list[dict]:
    r = requests.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10)
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_for_value(url: str, promql: str, want: float, timeout_s: float = 60) -> float | None:
    """Poll until the query's single value equals `want`; returns the last value seen."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        result = query(url, promql)
        if len(result) == 1:
            last = float(result[0]["value"][1])
            if abs(last - want) < 1e-9:
                return last
        time.sleep(1)
    return last


def run_chromium(args: list[str], tmp: Path, timeout_s: float = 90) -> subprocess.CompletedProcess:
    exe = chromium()
    assert exe is not None
    profile = tmp / "chromium-profile"
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=timeout_s, check=False)
