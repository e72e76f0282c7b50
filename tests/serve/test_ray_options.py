"""`densepr serve --ray` options, without starting Ray: connection flags Ray Serve's proxy has no
equivalent of are refused, the keep-alive timeout reaches the proxy's options, and
``--question-encoder`` reaches the question-encoder deployment."""

from __future__ import annotations

import pytest

from tests.support.cli import run
from tests.support.tiny import make_tiny_bert


@pytest.mark.parametrize("flags", [["--read-timeout", "3"], ["--max-connections", "64"], ["--read-timeout", "10", "--max-connections", "256"],
                                   ["--max-connections-per-client", "8"], ["--first-byte-timeout", "2"], ["--send-timeout", "30"]])
def test_serve_ray_refuses_connection_limits_it_cannot_apply(capsys, tmp_path, flags):
    """Given explicitly (even at their default values) with --ray, they are refused before any cluster starts."""
    code, _, err = run(capsys, "serve", "--index", str(tmp_path), "--ray", "local", *flags)
    assert code == 1 and "not available with --ray" in err, err
    assert all(f in err for f in flags[::2])


def test_serve_ray_accepts_the_defaults_and_keep_alive(capsys, tmp_path):
    """Left at their defaults they are not refused (a bad --ray-replicas, parsed next, stops it before Ray starts)."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'densepr[ray]')")
    code, _, err = run(capsys, "serve", "--index", str(tmp_path), "--ray", "local", "--timeout-keep-alive", "7", "--ray-replicas", "bogus")
    assert code == 1 and "--ray-replicas 'bogus'" in err and "not available" not in err, err


def test_serve_ray_passes_keep_alive_to_the_proxy():
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'densepr[ray]')")
    from ray.serve.config import HTTPOptions

    from densepr.serve.ray_app import http_options

    assert HTTPOptions(**http_options("127.0.0.1", 8123, 7.5)).keep_alive_timeout_s == 8  # whole seconds, rounded up
    assert HTTPOptions(**http_options("127.0.0.1", 8123)).keep_alive_timeout_s == HTTPOptions().keep_alive_timeout_s  # Ray's default


def encoder_of(app) -> str:
    """The model the question-encoder deployment of a bound Ray Serve app loads."""
    router = app._bound_deployment  # the router's init args: info, reader, limits, encoder app, ...
    return router.init_args[3]._bound_deployment.init_args[0]


def test_serve_ray_uses_the_question_encoder_given(index_dir, tmp_path, tiny_bert):
    """`serve --ray --question-encoder X` binds the encoder deployment to X (an ONNX export's #int8
    kept), not to the index's; without it, the index's."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'densepr[ray]')")
    from densepr.fileio.atomic import read_json
    from densepr.serve.ray_app import build_app

    other = make_tiny_bert(tmp_path / "other-encoder", seed=1)  # as wide as the index's
    assert encoder_of(build_app(index_dir, question_encoder=str(other))) == str(other.resolve())
    assert encoder_of(build_app(index_dir, question_encoder=f"{other}#int8")) == f"{other.resolve()}#int8"
    assert encoder_of(build_app(index_dir)) == read_json(index_dir / "dense/manifest.json")["question_encoder"]


def test_serve_ray_refuses_a_question_encoder_of_another_width_before_starting(index_dir, tmp_path):
    """As single-process serving does (Retriever), before any replica loads it."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'densepr[ray]')")
    from densepr.errors import DenseprError
    from densepr.serve.ray_app import build_app

    wide = make_tiny_bert(tmp_path / "wide-encoder", hidden=48)
    with pytest.raises(DenseprError, match="48-d vectors, the dense index holds 32-d"):
        build_app(index_dir, question_encoder=str(wide))
    with pytest.raises(DenseprError, match="not a question encoder directory"):
        build_app(index_dir, question_encoder=str(tmp_path))


def test_serve_ray_checks_the_host_header_as_the_single_process_server(index_dir):
    """The router gets the same Host allow-list as `densepr serve`: loopback names when the proxy is
    bound to loopback, none on another address, and --allowed-hosts as given."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'densepr[ray]')")
    from densepr.serve.app import LOOPBACK_NAMES
    from densepr.serve.limits import Limits
    from densepr.serve.ray_app import build_app

    def allowed(app):
        return tuple(app._bound_deployment.init_args[2]["allowed_hosts"] or ()) or None  # the router's limits

    assert set(LOOPBACK_NAMES) <= set(allowed(build_app(index_dir)))
    assert allowed(build_app(index_dir, host="0.0.0.0")) is None
    assert allowed(build_app(index_dir, limits=Limits(allowed_hosts=("search.example",)), host="0.0.0.0")) == ("search.example",)


def test_serve_ray_command_passes_the_question_encoder_on(index_dir, tmp_path, capsys, monkeypatch):
    """From the command line: `densepr serve --ray local --question-encoder X` builds the application with
    X as its question encoder (the command once dropped the option: the index's encoder was served)."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'densepr[ray]')")
    from densepr.serve import ray_app

    built = []

    def start(index, reader=None, limits=None, replicas=None, question_encoder=None, **kw):  # instead of starting Ray
        built.append(ray_app.build_app(index, reader, limits, replicas, question_encoder=question_encoder))

    monkeypatch.setattr(ray_app, "run", start)
    other = make_tiny_bert(tmp_path / "other-encoder", seed=1)
    code, _, err = run(capsys, "serve", "--index", str(index_dir), "--ray", "local", "--question-encoder", str(other))
    assert code == 0, err
    assert [encoder_of(app) for app in built] == [str(other.resolve())]
