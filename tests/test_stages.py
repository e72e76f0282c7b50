"""The resumable stage runner: skip what is current, rerun what changed and everything after it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from densepr.errors import DenseprError
from densepr.fileio.dirs import atomic_dir
from densepr.fileio.manifest import read_manifest, write_dir_manifest
from densepr.stages import Stage, StageRunner

ORDER = ("a", "b", "c")


def _job(out: Path, settings=None, force_from=None, fail_at=None):
    """Three stages: a writes a.txt; b reads it and writes the directory artefact b/ (with a
    manifest); c reads b/ and writes c.txt. Returns the runner and the builds and loads that ran."""
    settings = {"a": 1, "b": 1, "c": 1, **(settings or {})}
    calls: list[str] = []
    r = StageRunner(out, ORDER, force_from)

    def build_a():
        calls.append("a")
        (out / "a.txt").write_text(f"a{settings['a']}")
        return f"a{settings['a']}"

    def build_b():
        calls.append("b")
        text = r.done["a"].get() + f"b{settings['b']}"
        with atomic_dir(out / "b", "toy") as d:
            (d / "part1.txt").write_text(text)
            (d / "part2.txt").write_text(text[::-1])
            if fail_at == "b":
                raise RuntimeError("killed")
            write_dir_manifest(d, "toy")
        return text

    def load_b():
        calls.append("load b")
        read_manifest(out / "b", "toy", verify="sha256")
        return (out / "b" / "part1.txt").read_text()

    def build_c():
        calls.append("c")
        text = r.done["b"].get() + f"c{settings['c']}"
        (out / "c.txt").write_text("half" if fail_at == "c" else text)
        if fail_at == "c":
            raise RuntimeError("killed")
        (out / "c.txt").write_text(text)
        return text

    r.run(Stage("a", build_a, lambda: (out / "a.txt").read_text(), {"x": settings["a"]}, (), [out / "a.txt"]))
    r.run(Stage("b", build_b, load_b, {"x": settings["b"]}, ("a",), [out / "b"]))
    r.run(Stage("c", build_c, lambda: (out / "c.txt").read_text(), {"x": settings["c"]}, ("b",), [out / "c.txt"]))
    return r, calls


def _statuses(r: StageRunner) -> list[str]:
    return [row["status"] for row in r.rows]


def test_second_run_skips_every_stage_and_loads_nothing(tmp_path):
    _, first = _job(tmp_path)
    r, second = _job(tmp_path)
    assert first == ["a", "b", "c"] and second == []  # nothing built, and no skipped output read back
    assert _statuses(r) == ["skipped"] * 3
    assert r.done["c"].get() == "a1b1c1"
    table = r.table()
    for name in ORDER:
        assert f"| {name} | skipped |" in table
    assert "0 ran, 3 skipped" in table and set(r.timings()) == set(ORDER)
    record = json.loads((tmp_path / "stages" / "b.json").read_text())
    assert set(record) >= {"fingerprint", "finished", "seconds", "settings", "upstream", "wrote"}
    assert record["wrote"] == {"b": {"manifest": {"kind": "toy", "sha256": record["wrote"]["b"]["manifest"]["sha256"]}}}
    assert json.loads((tmp_path / "stages" / "a.json").read_text())["wrote"]["a.txt"]["bytes"] == 2


def test_a_changed_setting_reruns_that_stage_and_the_later_ones(tmp_path):
    _job(tmp_path)
    r, calls = _job(tmp_path, {"b": 2})
    assert calls == ["b", "c"]
    assert "a" not in calls and _statuses(r) == ["skipped", "ran", "ran"]
    assert (tmp_path / "c.txt").read_text() == "a1b2c1"
    _, calls = _job(tmp_path, {"b": 2, "c": 5})
    assert calls == ["c", "load b"]  # c reads b's artefact, loaded (and verified) only now


def test_a_setting_added_later_keeps_recorded_runs_current_at_its_old_value(tmp_path):
    """A stage that gains a setting (say precision, "fp32" before it existed) stays current for runs recorded
    without it while the setting holds that value; any other value reruns it."""
    calls: list[str] = []

    def job(settings: dict, added: dict | None = None) -> str:
        r = StageRunner(tmp_path, ("a",))
        done = r.run(Stage("a", lambda: calls.append(str(settings)), lambda: None, settings, (), [], added=added or {}))
        return done.status

    assert job({"x": 1}) == "ran"
    assert job({"x": 1, "precision": "fp32"}, {"precision": "fp32"}) == "skipped" and len(calls) == 1
    assert job({"x": 1, "precision": "bf16"}, {"precision": "fp32"}) == "ran" and len(calls) == 2
    assert job({"x": 1, "precision": "fp32"}) == "ran"  # not declared as added: a new setting like any other
    record = json.loads((tmp_path / "stages" / "a.json").read_text())
    assert record["settings"] == {"x": 1, "precision": "fp32"}  # the record says what ran, all settings


def test_from_forces_a_stage_and_all_after_it(tmp_path):
    _job(tmp_path)
    r, calls = _job(tmp_path, force_from="b")
    assert "a" not in calls and {"b", "c"} <= set(calls)
    assert _statuses(r) == ["skipped", "ran", "ran"]
    with pytest.raises(DenseprError, match="no such stage"):
        StageRunner(tmp_path, ORDER, "nope")


def test_a_stage_that_fails_midway_leaves_no_record_and_runs_again(tmp_path):
    _job(tmp_path)
    for stage, settings in (("b", {"b": 3, "c": 3}), ("c", {"b": 3, "c": 4})):
        with pytest.raises(RuntimeError):
            _job(tmp_path, settings, fail_at=stage)
        assert not (tmp_path / "stages" / f"{stage}.json").exists()  # the old record went before the rebuild began
        r, calls = _job(tmp_path, settings)
        assert stage in calls and r.done[stage].status == "ran"
    assert (tmp_path / "c.txt").read_text() == "a1b3c4"


KILLED = """
import os, signal, sys
from pathlib import Path
from densepr.stages import Stage, StageRunner

out = Path(sys.argv[1])
r = StageRunner(out, ("a", "b"))
r.run(Stage("a", lambda: (out / "a.txt").write_text("a"), settings={}, outputs=[out / "a.txt"]))

def build_b():
    (out / "b.txt").write_text("half of b")
    os.kill(os.getpid(), signal.SIGKILL)

r.run(Stage("b", build_b, settings={"x": int(sys.argv[2])}, upstream=("a",), outputs=[out / "b.txt"]))
"""


def test_a_stage_killed_by_sigkill_leaves_no_record_and_runs_again(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(KILLED))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, str(script), str(out), "1"], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert (out / "stages" / "a.json").exists() and not (out / "stages" / "b.json").exists()
    built = []
    r = StageRunner(out, ("a", "b"))
    r.run(Stage("a", lambda: built.append("a"), settings={}, outputs=[out / "a.txt"]))
    r.run(Stage("b", lambda: built.append("b") or (out / "b.txt").write_text("b"), settings={"x": 1}, upstream=("a",), outputs=[out / "b.txt"]))
    assert built == ["b"] and _statuses(r) == ["skipped", "ran"]


def test_a_flipped_byte_in_an_output_file_is_rebuilt_never_used(tmp_path):
    _job(tmp_path)
    (tmp_path / "c.txt").write_text("a1b1c9")  # same size, other bytes
    r, calls = _job(tmp_path)
    assert "c" in calls and r.done["c"].status == "ran"
    assert (tmp_path / "c.txt").read_text() == "a1b1c1"
    assert _statuses(r)[:2] == ["skipped", "skipped"]


def test_a_corrupt_directory_artefact_is_rebuilt_never_used(tmp_path):
    _job(tmp_path)
    part = tmp_path / "b" / "part2.txt"
    data = bytearray(part.read_bytes())
    data[0] ^= 1
    part.write_bytes(bytes(data))  # the manifest no longer matches
    r, calls = _job(tmp_path)
    assert calls[0] == "b" and "load b" not in calls and r.done["b"].status == "ran"
    assert part.read_text() == "1b1a"
    # a different (even self-consistent) manifest than the one the stage wrote is not trusted either
    manifest = tmp_path / "b" / "manifest.json"
    (tmp_path / "b" / "part1.txt").write_text("a1b7")
    write_dir_manifest(tmp_path / "b", "toy")
    assert manifest.is_file()
    r, calls = _job(tmp_path)
    assert calls[0] == "b" and r.done["b"].status == "ran"
    assert (tmp_path / "b" / "part1.txt").read_text() == "a1b1"


def _pieces_job(out: Path, setting: int, fail_after: int | None = None) -> list[int]:
    """One resumable stage summing 5 pieces (i * setting), each kept in its scratch directory;
    fails after ``fail_after`` pieces. Returns the pieces computed (not read back) in this run."""
    computed: list[int] = []

    def build(scratch: Path) -> int:
        total = 0
        for i in range(5):
            piece = scratch / f"{i}.json"
            if not piece.is_file():
                if fail_after is not None and len(computed) == fail_after:
                    raise RuntimeError("killed")
                computed.append(i)
                piece.write_text(json.dumps(i * setting))
            total += json.loads(piece.read_text())
        (out / "sum.txt").write_text(str(total))
        return total

    StageRunner(out, ("s",)).run(Stage("s", build, settings={"x": setting}, outputs=[out / "sum.txt"], resumable=True))
    return computed


def test_a_resumable_stage_resumes_from_its_pieces_and_never_mixes_in_other_settings(tmp_path):
    scratch = tmp_path / "stages" / "s.partial"
    with pytest.raises(RuntimeError):
        _pieces_job(tmp_path, 1, fail_after=2)
    assert sorted(p.name for p in scratch.iterdir()) == ["0.json", "1.json", "fingerprint.txt"]
    with pytest.raises(RuntimeError):
        _pieces_job(tmp_path, 1, fail_after=1)  # resumed: pieces 0 and 1 read back, 2 computed
    assert _pieces_job(tmp_path, 1) == [3, 4]
    assert (tmp_path / "sum.txt").read_text() == "10" and not scratch.exists()  # recorded: scratch removed
    assert _pieces_job(tmp_path, 1) == []  # current: skipped
    with pytest.raises(RuntimeError):
        _pieces_job(tmp_path, 2, fail_after=3)
    (scratch / "fingerprint.txt").write_text("another run's")  # pieces of other inputs: discarded
    assert _pieces_job(tmp_path, 2) == [0, 1, 2, 3, 4]
    assert (tmp_path / "sum.txt").read_text() == "20"


def test_a_stage_must_name_its_upstream_and_its_group(tmp_path):
    r = StageRunner(tmp_path, ("a", "eval"))
    with pytest.raises(ValueError, match="have not run"):
        r.run(Stage("a", lambda: None, upstream=("x",)))
    with pytest.raises(ValueError, match="not in the runner's order"):
        r.run(Stage("z", lambda: None))
    r.run(Stage("a", lambda: None))
    for name in ("eval-x", "eval-y"):
        r.run(Stage(name, lambda: None, upstream=("a",), group="eval"))
    forced = StageRunner(tmp_path, ("a", "eval"), force_from="eval")
    forced.run(Stage("a", lambda: None))
    forced.run(Stage("eval-x", lambda: None, upstream=("a",), group="eval"))
    assert _statuses(forced) == ["skipped", "ran"]


def test_several_processes_rank0_builds_plain_stages_all_build_distributed_ones(tmp_path):
    """Two ranks (threads) with a broadcast-barrier as torchrun's: one record per stage, written by rank 0."""
    import threading

    barrier, box, lock = threading.Barrier(2), [None], threading.Lock()
    built: list[tuple[int, str]] = []

    def sync(value, rank):
        if rank == 0:
            box[0] = value
        barrier.wait()
        out = box[0]
        barrier.wait()
        return out

    def process(rank, results):
        r = StageRunner(tmp_path, ("plain", "trained", "after"), rank=rank, sync=lambda v: sync(v, rank))

        def build(name, text):
            def f():
                with lock:
                    built.append((rank, name))
                if rank == 0:
                    (tmp_path / f"{name}.txt").write_text(text)
                return text

            return f

        def load(name):
            return lambda: (tmp_path / f"{name}.txt").read_text()

        r.run(Stage("plain", build("plain", "p"), load("plain"), {}, (), [tmp_path / "plain.txt"]))
        r.run(Stage("trained", build("trained", "t"), load("trained"), {}, ("plain",), [tmp_path / "trained.txt"], distributed=True))
        r.run(Stage("after", build("after", r.done["trained"].get() + "a"), load("after"), {}, ("trained",), [tmp_path / "after.txt"]))
        results[rank] = ([row["status"] for row in r.rows], r.done["plain"].get(), r.done["after"].get())

    def twice():
        results: dict = {}
        threads = [threading.Thread(target=process, args=(rank, results)) for rank in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return results

    results = twice()
    assert sorted(built) == [(0, "after"), (0, "plain"), (0, "trained"), (1, "trained")]
    assert results[0] == (["ran", "ran", "ran"], "p", "ta")
    assert results[1] == (["waited", "ran", "waited"], "p", "ta")  # rank 1 read what rank 0 wrote
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == ["after.json", "plain.json", "trained.json"]
    built.clear()
    results = twice()  # rank 0 finds everything current: no process builds anything
    assert built == [] and results[0][0] == results[1][0] == ["skipped"] * 3
