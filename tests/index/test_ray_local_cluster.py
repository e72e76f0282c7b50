"""``--ray local`` (serve and encode): the cluster densepr starts on this machine listens on loopback
only, with token authentication on and its token in a file only this user can read. The cluster is
started in a child process (as the CLI does), so its settings do not leak into this one."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import densepr
from densepr.errors import DenseprError
from densepr.index.ray_encode import check_ray_version

# The child: densepr's helper starts the cluster, a task runs (so a worker process is up), then the
# child reports and waits for its stdin to close.
CHILD = """
import json, os, sys
import ray
from densepr.index.ray_encode import connect
connect("local")
ray.get(ray.remote(lambda: 1).remote())
print(json.dumps({"token": os.environ.get("RAY_AUTH_TOKEN_PATH")}), flush=True)
sys.stdin.read()
"""


def _loopback(ip: str) -> bool:
    a = ipaddress.ip_address(ip.split("%")[0])
    return (a.ipv4_mapped or a).is_loopback if isinstance(a, ipaddress.IPv6Address) else a.is_loopback


def _listening(root) -> list[tuple[str, str, int]]:
    """(process, address, port) of every listening TCP socket of ``root`` and its descendants."""
    import psutil

    out = []
    for p in [root, *root.children(recursive=True)]:
        try:
            name = " ".join(p.cmdline()[:2]) or p.name()
            out += [(name, c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.ray
def test_local_cluster_listens_on_loopback_only_with_token_auth():
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'densepr[ray]')")
    psutil = pytest.importorskip("psutil")
    import httpx

    env = {**os.environ, "PYTHONPATH": str(Path(densepr.__file__).parents[1]), "RAY_USAGE_STATS_ENABLED": "0"}
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        env.pop(k, None)
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)  # fmt: skip
    try:
        line = child.stdout.readline()
        assert line, f"the child did not start its cluster: {child.stderr.read()[-3000:] if child.poll() is not None else ''}"
        report = json.loads(line)
        sockets = _listening(psutil.Process(child.pid))
        names = " ".join(n for n, _, _ in sockets)
        assert "gcs_server" in names and "raylet" in names, sockets  # the check saw the cluster's own processes
        exposed = [s for s in sockets if not _loopback(s[1])]
        assert not exposed, f"listening beyond loopback: {exposed}"

        token = Path(report["token"] or "")
        assert token.is_file(), report
        assert token.stat().st_mode & 0o777 == 0o600 and token.parent.stat().st_mode & 0o777 == 0o700
        # the job agent (the Jobs API: code execution) refuses a request without the token, accepts it with
        secret = token.read_text().strip()
        codes = {}
        for _, _, port in sockets:
            try:
                url = f"http://127.0.0.1:{port}/api/job_agent/jobs/"
                codes[port] = (httpx.get(url, timeout=5).status_code, httpx.get(url, headers={"Authorization": f"Bearer {secret}"}, timeout=5).status_code)
            except httpx.HTTPError:  # a gRPC port
                pass
        assert any(a == 401 and b != 401 for a, b in codes.values()), codes
    finally:
        child.stdin.close()  # the child exits: its atexit hook stops the cluster and removes the token
        try:
            child.wait(120)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    assert not token.parent.exists()


@pytest.mark.parametrize("version", ["2.40.0", "2.51.9", "1.13.0", "dev"])
def test_a_ray_without_token_auth_is_refused(version):
    with pytest.raises(DenseprError, match=r"needs Ray >= 2\.52"):
        check_ray_version(version)


@pytest.mark.parametrize("version", ["2.52.0", "2.60.0", "3.0.0.dev0"])
def test_a_ray_with_token_auth_is_accepted(version):
    check_ray_version(version)
