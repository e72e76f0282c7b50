"""``--ray local`` (serve and encode start it with one helper, ``ray_encode.connect``): the Ray cluster
densepr starts on this machine listens on loopback only, with token authentication on and its token
in a file only this user can read. The test runs ``densepr serve --ray local`` as a user would, in a
child process, so the cluster's settings do not leak into this one, and Ray Serve's replicas are
checked as well as Ray's own processes."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import densepr
from densepr.errors import DenseprError
from densepr.index.ray_encode import check_ray_version


def _loopback(ip: str) -> bool:
    a = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(a, "ipv4_mapped", None) or a).is_loopback  # ::ffff:127.0.0.1 is loopback too


def _tree(pid: int) -> list:
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _listening(procs) -> list[tuple[str, str, int]]:
    """(process, address, port) of every listening TCP socket of ``procs``."""
    import psutil

    out = []
    for p in procs:
        try:
            name = " ".join(p.cmdline()[:2]) or p.name()
            out += [(name, c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            pass
    return out


def _default_sigint() -> None:
    # A background job of a non-interactive shell (CI scripts, `cmd &`) starts with SIGINT ignored, and Python
    # then keeps it ignored: the child gets Ctrl-C's default, as in a terminal, however pytest was started.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.ray
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_local_cluster_listens_on_loopback_only_with_token_auth(index_dir, tmp_path, stop):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'densepr[ray]')")
    pytest.importorskip("psutil")
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(densepr.__file__).parents[1]), "RAY_USAGE_STATS_ENABLED": "0", "RAY_worker_niceness": "0"}
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        env.pop(k, None)
    log = tmp_path / "serve.log"
    child = subprocess.Popen([sys.executable, "-m", "densepr", "serve", "--index", str(index_dir), "--ray", "local", "--port", str(port),
                              "--ray-replicas", "cpus=0.25"], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=_default_sigint)  # fmt: skip
    token, procs = None, []
    try:
        for _ in range(600):  # up once the proxy answers /health (Ray and Serve start in 20-60 s on 2 busy cores)
            assert child.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        procs = _tree(child.pid)
        sockets = _listening(procs)
        names = " ".join(n for n, _, _ in sockets)
        assert all(p in names for p in ("gcs_server", "raylet", "ServeReplica:densepr:Router", "ProxyActor")), sockets  # the check saw them
        exposed = [s for s in sockets if not _loopback(s[1])]
        assert not exposed, f"listening beyond loopback: {exposed}"

        gcs = next(p for p in procs if "gcs_server" in " ".join(p.cmdline()[:1]))
        token = Path(gcs.environ().get("RAY_AUTH_TOKEN_PATH", ""))  # the token the cluster was started with
        assert token.is_file(), gcs.environ()
        assert token.stat().st_mode & 0o777 == 0o600 and token.parent.stat().st_mode & 0o777 == 0o700
        # the job agent (the Jobs API: code execution) refuses a request without the token, accepts it with
        bearer = {"Authorization": f"Bearer {token.read_text().strip()}"}
        codes = {}
        for _, _, p in sockets:
            try:
                url = f"http://127.0.0.1:{p}/api/job_agent/jobs/"
                codes[p] = (httpx.get(url, timeout=5).status_code, httpx.get(url, headers=bearer, timeout=5).status_code)
            except httpx.HTTPError:  # a gRPC port
                pass
        assert any(a == 401 and b != 401 for a, b in codes.values()), codes
    finally:
        child.send_signal(stop)  # Ctrl-C, or a service manager's stop: the command stops the cluster and removes the token
        try:
            child.wait(180)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    import psutil

    left = psutil.wait_procs(procs[1:], timeout=60)[1]  # Ray's processes go with the command
    for p in left:
        p.kill()
    assert child.returncode != -signal.SIGKILL, f"not stopped within 180 s of {stop.name}: {log.read_text()[-3000:]}"
    assert token is None or not token.parent.exists()
    assert not left, f"Ray processes outlived the command: {[p.pid for p in left]}"


@pytest.mark.parametrize("version", ["2.40.0", "2.51.9", "1.13.0", "dev"])
def test_a_ray_without_token_auth_is_refused(version):
    with pytest.raises(DenseprError, match=r"needs Ray >= 2\.52"):
        check_ray_version(version)


@pytest.mark.parametrize("version", ["2.52.0", "2.60.0", "3.0.0.dev0"])
def test_a_ray_with_token_auth_is_accepted(version):
    check_ray_version(version)
