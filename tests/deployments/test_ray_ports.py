"""A Ray cluster that nextserve starts on its own (`nextserve serve` without a cluster to join,
`generate --executor cluster`) listens on loopback only. Checked in a network namespace of its
own that has an address Ray would otherwise take for the node's (and bind every port to all
interfaces for): every listening socket of Ray's processes must be on 127.0.0.1 or ::1."""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXTERNAL = "10.200.0.1"  # stands for the machine's LAN address
NAMESPACE = (f"ip link set lo up && ip addr add {EXTERNAL}/32 dev lo && "
             f"ip route add default dev lo src {EXTERNAL} && exec {sys.executable} -c \"$0\"")

CHILD = f"""
import json, os, socket, sys, time
sys.path.insert(0, {str(ROOT)!r})
import ray
from cluster.session import start_local_ray
from tests.procfs import descendants, listening_sockets

with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # how Ray finds the node's address
    s.connect(("8.8.8.8", 53))
    external = s.getsockname()[0]
start_local_ray(1, {{"env_vars": {{"PYTHONPATH": {str(ROOT)!r}}}}})

@ray.remote
def ping():
    return 1

ray.get(ping.remote(), timeout=120)  # a worker, with its own server, is up too
time.sleep(1)


found = []
for sock in listening_sockets(descendants(os.getpid())):
    try:
        found.append((open(f"/proc/{{sock.pid}}/comm").read().strip(), sock.table, sock.address))
    except OSError:
        continue
print(json.dumps({{"external": external, "sockets": found}}))
ray.shutdown()
"""


def address(table: str, hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp{,6}'s "ADDR:PORT": the address in 32-bit words of host (little-endian) order."""
    raw = bytes.fromhex(hex_address.split(":")[0])
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped or ip


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare for a network namespace")
def test_local_ray_listens_on_loopback_only():
    try:
        run = subprocess.run(["unshare", "-n", "sh", "-c", NAMESPACE, CHILD], capture_output=True, text=True,
                             timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("Ray did not start within 240 s")
    if run.returncode != 0 and "Operation not permitted" in run.stderr:
        pytest.skip("no permission to make a network namespace")
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["external"] == EXTERNAL  # Ray would have taken this address for the node's
    sockets = [(name, address(table, addr)) for name, table, addr in report["sockets"]]
    names = {name for name, _ in sockets}
    assert "gcs_server" in names and "raylet" in names, sockets
    assert all(ip.is_loopback for _, ip in sockets), [(n, str(ip)) for n, ip in sockets if not ip.is_loopback]
