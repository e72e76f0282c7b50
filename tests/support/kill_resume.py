"""Kill-and-resume runs: each long job is started as its own process, SIGKILLed part-way, rerun,
and compared with an uninterrupted run.

Jobs: ``densepr encode`` (unit: a part of passages), ``densepr index dense`` (unit: an
embeddings part added, checkpointed), ``densepr train`` and ``densepr train-reader`` (unit: a
checkpoint). After the kill, every file under a final name must be complete (``densepr verify``
passes on every manifest; embeddings parts load with the right shape) and the rerun must give
exactly the uninterrupted result. ``tests/test_kill_resume.py`` asserts each scenario;
``python -m tests.support.kill_resume`` writes ``benchmarks/results/kill-resume.md``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def densepr(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "densepr", *args], capture_output=True, text=True, cwd=ROOT, **kw)


def run_and_kill(args: list[str], ready: Callable[[], bool], timeout: float = 120) -> bool:
    """Start ``densepr args``; SIGKILL it as soon as ``ready()``; True if it was still running then."""
    proc = subprocess.Popen([sys.executable, "-m", "densepr", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            return False  # finished (or failed) before it could be killed
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    proc.kill()
    raise TimeoutError(f"densepr {' '.join(args)}: never reached the kill point")


def verify_ok(directory: Path) -> bool:
    r = densepr("verify", str(directory))
    if r.returncode != 0 and "no manifest.json found" not in r.stderr:
        print(r.stdout, r.stderr)
        return False
    return True


# -- inputs ----------------------------------------------------------------------------------------
def passages_tsv(path: Path, n: int) -> Path:
    from tests.support.tiny import PASSAGES

    with open(path, "w", encoding="utf-8") as fh:
        fh.write("id\ttext\ttitle\n")
        for i in range(n):
            t, x = PASSAGES[i % len(PASSAGES)]
            fh.write(f"{i}\t{x} (copy {i})\t{t}\n")
    return path


def synthetic_embeddings(out: Path, n: int = 100_000, dim: int = 64, part: int = 5_000) -> Path:
    """An embeddings directory of random vectors, in densepr's layout (for index building)."""
    from densepr.data import Corpus, Passage
    from densepr.fileio import save_npy, write_ids, write_json
    from densepr.index.embeddings import finalize

    corpus = Corpus.from_passages(Passage(str(i), "", "") for i in range(n))
    out.mkdir(parents=True)
    write_json(out / "encoding.json", {"encoder": {"path": "synthetic", "dim": dim}, "question_encoder": "synthetic",
                                       "corpus": corpus.fingerprint(), "part_size": part, "dtype": "float32"})  # fmt: skip
    rng = np.random.default_rng(0)
    for i in range(0, n, part):
        write_ids(out / f"part-{i // part:05d}.ids", corpus.ids[i : i + part])
        save_npy(out / f"part-{i // part:05d}.npy", rng.standard_normal((min(part, n - i), dim), dtype=np.float32))
    finalize(out, corpus, dim)
    return out


# -- scenarios -------------------------------------------------------------------------------------
def scenario_encode(tmp: Path, encoder: Path) -> dict:
    tsv = passages_tsv(tmp / "p.tsv", 3000)
    common = ["--encoder", str(encoder), "--part-size", "300", "--device", "cpu", "--batch-size", "32"]
    ref, out = tmp / "emb-ref", tmp / "emb"
    assert densepr("encode", str(tsv), str(ref), *common).returncode == 0
    killed = run_and_kill(["encode", str(tsv), str(out), *common], lambda: len(list(out.glob("part-*.npy"))) >= 3)
    done = len(list(out.glob("part-*.npy")))
    from densepr.index.embeddings import _part_ok

    clean = not (out / "manifest.json").exists() and all(_part_ok(out, int(p.stem[5:]), 300, 32) for p in out.glob("part-*.npy"))
    r = densepr("encode", str(tsv), str(out), *common)
    same = r.returncode == 0 and all(np.array_equal(np.load(a, allow_pickle=False), np.load(out / a.name, allow_pickle=False))
                                     for a in sorted(ref.glob("part-*.npy")))  # fmt: skip
    return {"job": "densepr encode (3,000 passages, 10 parts)", "unit": "part of 300 passages", "killed_mid_run": killed,
            "done_at_kill": f"{done} of 10 parts", "nothing_corrupt": clean and verify_ok(out), "same_result": same and verify_ok(out)}  # fmt: skip


def scenario_index(tmp: Path) -> dict:
    emb = synthetic_embeddings(tmp / "emb")
    common = ["--type", "ivf-flat", "--nlist", "64", "--checkpoint-seconds", "0"]
    ref, out = tmp / "ix-ref", tmp / "ix"
    assert densepr("index", "dense", str(emb), str(ref), *common).returncode == 0
    progress = tmp / "ix.building" / "progress.json"

    def ready() -> bool:
        try:
            return json.loads(progress.read_text())["parts"] >= 4
        except (OSError, ValueError):
            return False

    killed = run_and_kill(["index", "dense", str(emb), str(out), *common], ready)
    done = json.loads(progress.read_text())["parts"] if progress.is_file() else 0
    clean = not (out / "manifest.json").exists() and not (out / "index.faiss").exists()
    r = densepr("index", "dense", str(emb), str(out), *common)
    from densepr.index.dense import DenseIndex

    same = False
    if r.returncode == 0:
        a, b = DenseIndex.load(ref), DenseIndex.load(out)
        q = np.random.default_rng(1).standard_normal((50, 64), dtype=np.float32)
        ra, rb = a.search(q, 20), b.search(q, 20)
        same = a.ids == b.ids and np.array_equal(ra.rows, rb.rows) and np.allclose(ra.scores, rb.scores)
    return {"job": "densepr index dense --type ivf-flat (100,000 x 64, 20 parts)", "unit": "embeddings part added (checkpointed)",
            "killed_mid_run": killed, "done_at_kill": f"{done} of 20 parts", "nothing_corrupt": clean and verify_ok(out),
            "same_result": same and not (tmp / "ix.building").exists()}  # fmt: skip


def _same_safetensors(a: Path, b: Path) -> bool:
    from safetensors.numpy import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def _checkpoint_step(run: Path) -> int:
    try:
        return json.loads((run / "checkpoint" / "trainer_state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def scenario_train(tmp: Path, encoder: Path) -> dict:
    from densepr.data import write_train_records
    from tests.train.test_train import _records

    data = tmp / "train.json"
    write_train_records(_records(12), data)
    common = ["--train", str(data), "--init", str(encoder), "--batch-size", "4", "--epochs", "20", "--save-every", "3",
              "--max-length", "64", "--warmup-steps", "2", "--lr", "1e-3", "--device", "cpu"]  # fmt: skip
    ref, out = tmp / "run-ref", tmp / "run"
    assert densepr("train", "-o", str(ref), *common).returncode == 0
    killed = run_and_kill(["train", "-o", str(out), *common], lambda: _checkpoint_step(out) >= 6)
    done = _checkpoint_step(out)
    clean = verify_ok(out)
    r = densepr("train", "-o", str(out), *common, "--resume")
    same = r.returncode == 0 and all(_same_safetensors(ref / "checkpoint" / t / "model.safetensors", out / "checkpoint" / t / "model.safetensors")
                                     for t in ("question_encoder", "passage_encoder"))  # fmt: skip
    return {"job": "densepr train (60 steps)", "unit": "checkpoint every 3 steps", "killed_mid_run": killed,
            "done_at_kill": f"checkpoint at step {done} of 60", "nothing_corrupt": clean, "same_result": same}  # fmt: skip


def scenario_train_reader(tmp: Path, init: Path) -> dict:
    from tests.models.test_reader import _dpr_results

    data = _dpr_results(tmp / "res.json")
    common = ["--train", str(data), "--init", str(init), "--passages", "4", "--batch-size", "2", "--epochs", "20", "--save-every", "3",
              "--max-length", "96", "--lr", "1e-3", "--device", "cpu"]  # fmt: skip
    ref, out = tmp / "r-ref", tmp / "r"
    assert densepr("train-reader", "-o", str(ref), *common).returncode == 0
    killed = run_and_kill(["train-reader", "-o", str(out), *common], lambda: _checkpoint_step(out) >= 6)
    done = _checkpoint_step(out)
    clean = verify_ok(out)
    r = densepr("train-reader", "-o", str(out), *common, "--resume")
    same = r.returncode == 0 and _same_safetensors(ref / "checkpoint/reader/model.safetensors", out / "checkpoint/reader/model.safetensors")
    return {"job": "densepr train-reader (40 steps)", "unit": "checkpoint every 3 steps", "killed_mid_run": killed,
            "done_at_kill": f"checkpoint at step {done} of 40", "nothing_corrupt": clean, "same_result": same}  # fmt: skip


def main() -> None:
    import tempfile

    from tests.support.tiny import make_tiny_bert

    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        enc = make_tiny_bert(tmp / "enc", pooling="cls", dropout=0.0)
        rdr = make_tiny_bert(tmp / "rdr", seed=3, dropout=0.0)
        for name, fn in (("encode", lambda t: scenario_encode(t, enc)), ("index", scenario_index),
                         ("train", lambda t: scenario_train(t, enc)), ("reader", lambda t: scenario_train_reader(t, rdr))):  # fmt: skip
            (tmp / name).mkdir()
            t0 = time.perf_counter()
            row = fn(tmp / name)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(row, flush=True)
    lines = ["# Kill-and-resume runs", "",
             "`python -m tests.support.kill_resume` (the scenarios of `tests/test_kill_resume.py`): each job is SIGKILLed part-way, "
             "then rerun; its result is compared with an uninterrupted run of the same job.", "",
             "| job | unit of resumption | killed mid-run | done at the kill | nothing corrupt under a final name | rerun = uninterrupted | seconds (3 runs) |",
             "|---|---|---|---|---|---|---:|"]  # fmt: skip
    yes = {True: "yes", False: "**no**"}
    for r in rows:
        lines.append(f"| {r['job']} | {r['unit']} | {yes[r['killed_mid_run']]} | {r['done_at_kill']} | {yes[r['nothing_corrupt']]} | "
                     f"{yes[r['same_result']]} | {r['seconds']} |")  # fmt: skip
    out = ROOT / "benchmarks" / "results" / "kill-resume.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"written to {out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
