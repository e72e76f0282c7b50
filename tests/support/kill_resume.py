"""Kill-and-resume runs: each long job is started as its own process, SIGKILLed at several points in turn
(each rerun killed at the next), then run to the end, and compared with an uninterrupted run.

Jobs: ``densepr encode`` (unit: a part of passages), ``densepr index dense`` (unit: an embeddings part
added, checkpointed), ``densepr train`` and ``densepr train-reader`` (unit: a checkpoint; reruns pass
``--resume``), ``densepr evaluate-qa`` (unit: a piece of questions read) and the ``reader-cloze`` stage
of ``densepr reproduce`` (unit: a checkpoint). The first kill point of every chain is before the job's
first unit (its directory set up, nothing to resume from yet). After each kill, every file under a final
name must be complete (``densepr verify`` passes on every manifest; embeddings parts load with the right
shape; pieces are whole JSON) and the last rerun must give exactly the uninterrupted result.
``tests/test_kill_resume.py`` asserts each scenario (two kill points each; more under ``-m slow``);
``python -m tests.support.kill_resume`` writes ``benchmarks/results/kill-resume.md`` (the slow tests' points).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]  # the repository: `python -m tests.support...` runs from here


DENSEPR = [sys.executable, "-m", "densepr"]


def densepr(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*DENSEPR, *args], capture_output=True, text=True, cwd=ROOT, **kw)


def run_and_kill(args: list[str], ready: Callable[[], bool], timeout: float = 120, program: Sequence[str] = tuple(DENSEPR)) -> bool:
    """Start ``program args``; SIGKILL it as soon as ``ready()``; True if it was still running then."""
    proc = subprocess.Popen([*program, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
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
    raise TimeoutError(f"{' '.join(args)}: never reached the kill point")


def verify_ok(directory: Path) -> bool:
    r = densepr("verify", str(directory))
    if r.returncode != 0 and "no manifest.json found" not in r.stderr:
        print(r.stdout, r.stderr)
        return False
    return True


# Kill points: START is "before the job's first unit of resumption" (its first checkpoint, part or piece: the job
# has set up its directory and nothing it could resume from is there yet); a number n is "once n units are done".
START = "start"
Point = str | int


@dataclass
class Chain:
    """One job killed at each of ``points`` in turn (each rerun killed at the next point), then run to the end."""

    first: list[str]  # the first command's arguments
    again: list[str]  # the rerun's (the same command, e.g. with --resume)
    ready: Callable[[Point], Callable[[], bool]]  # a kill point's predicate
    done: Callable[[], int]  # units done now
    clean: Callable[[], bool]  # nothing corrupt under a final name
    program: Sequence[str] = tuple(DENSEPR)

    def run(self, points: Sequence[Point]) -> dict:
        kills, done, clean = [], [], True
        for i, p in enumerate(points):
            kills.append(run_and_kill(self.first if i == 0 else self.again, self.ready(p), program=self.program))
            done.append(self.done())
            clean = self.clean() and clean
        r = subprocess.run([*self.program, *self.again], capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 0:
            print(r.stdout, r.stderr)
        return {"killed": kills, "done": done, "clean": clean, "finished": r.returncode == 0,
                "before_first": points[0] != START or done[0] == 0}  # fmt: skip


def _row(job: str, unit: str, points: Sequence[Point], res: dict, same: bool, done: Callable[[int], str]) -> dict:
    return {"job": job, "unit": unit, "kill_points": ", ".join("before the first" if p == START else str(p) for p in points),
            "killed_mid_run": all(res["killed"]), "killed_before_first_unit": res["before_first"],
            "done_at_kill": "; ".join(done(d) for d in res["done"]), "nothing_corrupt": res["clean"],
            "same_result": res["finished"] and same}  # fmt: skip


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
    from densepr.fileio.atomic import save_npy, write_json
    from densepr.fileio.ids import write_ids
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
def scenario_encode(tmp: Path, encoder: Path, points: Sequence[Point] = (START, 3)) -> dict:
    tsv = passages_tsv(tmp / "p.tsv", 3000)
    common = ["--encoder", str(encoder), "--part-size", "300", "--device", "cpu", "--batch-size", "32"]
    ref, out = tmp / "emb-ref", tmp / "emb"
    assert densepr("encode", str(tsv), str(ref), *common).returncode == 0
    from densepr.index.embeddings import _part_ok

    def parts() -> int:
        return len(list(out.glob("part-*.npy")))

    def ready(p: Point) -> Callable[[], bool]:  # START: encoding.json written, no part yet
        return (lambda: (out / "encoding.json").is_file()) if p == START else (lambda: parts() >= p)

    def clean() -> bool:
        return not (out / "manifest.json").exists() and all(_part_ok(out, int(q.stem[5:]), 300, 32) for q in out.glob("part-*.npy"))

    args = ["encode", str(tsv), str(out), *common]
    res = Chain(args, args, ready, parts, clean).run(points)
    same = res["finished"] and all(np.array_equal(np.load(a, allow_pickle=False), np.load(out / a.name, allow_pickle=False))
                                   for a in sorted(ref.glob("part-*.npy")))  # fmt: skip
    return _row("densepr encode (3,000 passages, 10 parts)", "part of 300 passages", points, res, same and verify_ok(out),
                lambda d: f"{d} of 10 parts")  # fmt: skip


def scenario_index(tmp: Path, points: Sequence[Point] = (START, 4)) -> dict:
    emb = synthetic_embeddings(tmp / "emb")
    common = ["--type", "ivf-flat", "--nlist", "64", "--checkpoint-seconds", "0"]
    ref, out = tmp / "ix-ref", tmp / "ix"
    assert densepr("index", "dense", str(emb), str(ref), *common).returncode == 0
    work = tmp / "ix.building"

    def parts() -> int:
        try:
            return json.loads((work / "progress.json").read_text())["parts"]
        except (OSError, ValueError):
            return 0

    def ready(p: Point) -> Callable[[], bool]:  # START: the work directory set up (build.json), before the quantiser is trained
        return (lambda: (work / "build.json").is_file()) if p == START else (lambda: parts() >= p)

    def clean() -> bool:
        return not (out / "manifest.json").exists() and not (out / "index.faiss").exists()

    args = ["index", "dense", str(emb), str(out), *common]
    res = Chain(args, args, ready, parts, clean).run(points)
    from densepr.index.dense import DenseIndex

    same = False
    if res["finished"]:
        a, b = DenseIndex.load(ref), DenseIndex.load(out)
        q = np.random.default_rng(1).standard_normal((50, 64), dtype=np.float32)
        ra, rb = a.search(q, 20), b.search(q, 20)
        same = a.ids == b.ids and np.array_equal(ra.rows, rb.rows) and np.allclose(ra.scores, rb.scores)
    return _row("densepr index dense --type ivf-flat (100,000 x 64, 20 parts)", "embeddings part added (checkpointed)", points, res,
                same and not work.exists() and verify_ok(out), lambda d: f"{d} of 20 parts")  # fmt: skip


def _same_safetensors(a: Path, b: Path) -> bool:
    from safetensors.numpy import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def _checkpoint_step(run: Path) -> int:
    try:
        return json.loads((run / "checkpoint" / "trainer_state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def _training_chain(command: str, out: Path, common: list[str]) -> Chain:
    """A training run: START is once its config.json is written (before the first checkpoint); a rerun passes --resume."""

    def ready(p: Point) -> Callable[[], bool]:
        return (lambda: (out / "config.json").is_file()) if p == START else (lambda: _checkpoint_step(out) >= p)

    return Chain([command, "-o", str(out), *common], [command, "-o", str(out), *common, "--resume"], ready,
                 lambda: _checkpoint_step(out), lambda: verify_ok(out))  # fmt: skip


def scenario_train(tmp: Path, encoder: Path, points: Sequence[Point] = (START, 6)) -> dict:
    from densepr.data import write_train_records
    from tests.train.test_train import _records

    data = tmp / "train.json"
    write_train_records(_records(12), data)
    common = ["--train", str(data), "--init", str(encoder), "--batch-size", "4", "--epochs", "10", "--save-every", "3",
              "--max-length", "64", "--warmup-steps", "2", "--lr", "1e-3", "--device", "cpu"]  # fmt: skip
    ref, out = tmp / "run-ref", tmp / "run"
    assert densepr("train", "-o", str(ref), *common).returncode == 0
    res = _training_chain("train", out, common).run(points)
    same = res["finished"] and all(_same_safetensors(ref / "checkpoint" / t / "model.safetensors", out / "checkpoint" / t / "model.safetensors")
                                   for t in ("question_encoder", "passage_encoder"))  # fmt: skip
    return _row("densepr train (30 steps)", "checkpoint every 3 steps", points, res, same,
                lambda d: f"checkpoint at step {d} of 30" if d else "no checkpoint")  # fmt: skip


def scenario_train_reader(tmp: Path, init: Path, points: Sequence[Point] = (START, 6)) -> dict:
    from tests.models.test_reader import _dpr_results

    data = _dpr_results(tmp / "res.json")
    common = ["--train", str(data), "--init", str(init), "--passages", "4", "--batch-size", "2", "--epochs", "20", "--save-every", "3",
              "--max-length", "96", "--lr", "1e-3", "--device", "cpu"]  # fmt: skip
    ref, out = tmp / "r-ref", tmp / "r"
    assert densepr("train-reader", "-o", str(ref), *common).returncode == 0
    res = _training_chain("train-reader", out, common).run(points)
    same = res["finished"] and _same_safetensors(ref / "checkpoint/reader/model.safetensors", out / "checkpoint/reader/model.safetensors")
    return _row("densepr train-reader (40 steps)", "checkpoint every 3 steps", points, res, same,
                lambda d: f"checkpoint at step {d} of 40" if d else "no checkpoint")  # fmt: skip


PIECE = 20  # questions per piece in the evaluate-qa scenario (densepr's is 250)


def scenario_evaluate_qa(tmp: Path, init: Path, points: Sequence[Point] = (START, 2)) -> dict:
    """``densepr evaluate-qa`` of 160 questions in pieces of 20 (run through :func:`pieces_worker`)."""
    from densepr.models.reader import Reader, ReaderConfig
    from tests.support.tiny import QUESTIONS

    idx = tmp / "index"
    idx.mkdir()
    passages_tsv(idx / "passages.tsv", 60)
    assert densepr("index", "bm25", str(idx / "passages.tsv"), str(idx / "bm25")).returncode == 0
    Reader.load(init, "cpu", ReaderConfig(max_length=96, stride=16)).save(tmp / "reader")
    qa = tmp / "qa.tsv"
    qa.write_text("".join(f"{q} ({i})\t{a!r}\n" for i in range(160 // len(QUESTIONS) + 1) for q, a in QUESTIONS), encoding="utf-8")
    n = len(qa.read_text().splitlines())
    common = ["evaluate-qa", "--qa", str(qa), "--index", str(idx), "--reader", str(tmp / "reader"), "--modes", "bm25", "--ks", "1,5,10",
              "--device", "cpu", "--batch-size", "16", "-o"]  # fmt: skip
    program = [sys.executable, "-m", "tests.support.kill_resume", "pieces", str(PIECE)]
    ref, out = tmp / "qa-ref", tmp / "qa"
    assert subprocess.run([*program, *common, str(ref)], capture_output=True, cwd=ROOT).returncode == 0

    def pieces() -> int:
        return len(list((out / "pieces").glob("*/*/readings-*.json")))

    def ready(p: Point) -> Callable[[], bool]:  # START: the set's pieces directory made, no piece read yet
        return (lambda: any((out / "pieces").glob("*/*/"))) if p == START else (lambda: pieces() >= p)

    def clean() -> bool:
        from densepr.fileio.atomic import read_json

        return not (out / "qa-results.json").exists() and all(isinstance(read_json(f), dict) for f in (out / "pieces").glob("*/*/readings-*.json"))

    res = Chain([*common, str(out)], [*common, str(out)], ready, pieces, clean, program).run(points)
    same = False
    if res["finished"]:
        a, b = (json.loads((d / "qa-results.json").read_text())["sets"]["qa.tsv"] for d in (ref, out))
        same = a["modes"] == b["modes"] and a["gold"] == b["gold"] and a["key"] == b["key"] and not (out / "pieces").exists()
    parts = -(-n // PIECE)
    return _row(f"densepr evaluate-qa ({n} questions, {parts} pieces)", f"piece of {PIECE} questions read", points, res, same,
                lambda d: f"{d} of {parts} pieces")  # fmt: skip


def scenario_reader_cloze(tmp: Path, points: Sequence[Point] = (START, 3)) -> dict:
    """Stage reader-cloze of ``densepr reproduce`` (the tiny dpr profile of tests/test_reproduce.py with cloze
    pre-training on, run through :func:`reproduce_worker`): killed at each point, then run again to the end."""
    from tests.support.tiny import QUESTIONS, make_tiny_bert

    make_tiny_bert(tmp / "bert", pooling="cls")
    (tmp / "qa.tsv").write_text("".join(f"{q}\t{a!r}\n" for q, a in QUESTIONS), encoding="utf-8")
    program = [sys.executable, "-m", "tests.support.kill_resume", "reproduce", str(tmp)]
    ref, out = tmp / "ref", tmp / "out"
    r = subprocess.run([*program, str(ref)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    run_dir = out / "models" / "reader-cloze"

    def ready(p: Point) -> Callable[[], bool]:
        return (lambda: (run_dir / "config.json").is_file()) if p == START else (lambda: _checkpoint_step(run_dir) >= p)

    res = Chain([str(out)], [str(out)], ready, lambda: _checkpoint_step(run_dir), lambda: verify_ok(run_dir), program).run(points)
    same = False
    if res["finished"]:
        a, b = (json.loads((d / "results.json").read_text()) for d in (ref, out))
        same = (_same_safetensors(ref / "models/reader-cloze/final/model.safetensors", run_dir / "final/model.safetensors")
                and _same_safetensors(ref / "models/reader/best/model.safetensors", out / "models/reader/best/model.safetensors")
                and all(a["qa"]["sets"][s]["modes"] == b["qa"]["sets"][s]["modes"] for s in a["qa"]["sets"]))  # fmt: skip
    return _row("densepr reproduce, stage reader-cloze (tiny dpr profile, 12 steps)", "checkpoint every 3 steps", points, res, same,
                lambda d: f"checkpoint at step {d} of 12" if d else "no checkpoint")  # fmt: skip


# -- workers (the processes the scenarios kill) ----------------------------------------------------
def pieces_worker(size: int, args: list[str]) -> None:
    """``densepr ARGS`` with pieces of ``size`` questions (evaluate-qa's are 250: too many for a test)."""
    import densepr.pipeline
    from densepr.cli import main

    densepr.pipeline.PIECE_QUESTIONS = size
    main(args)


def reproduce_worker(root: Path, out: Path) -> None:
    """``reproduce`` of the tiny dpr profile (tests/test_reproduce.py) with cloze pre-training, into ``out``."""
    import densepr.reproduce as rp
    from densepr.data import Corpus, Passage
    from tests.support.tiny import PASSAGES
    from tests.test_reproduce import _tiny_dpr

    # what cloze questions are made of: ~3 per passage (not the first: it would pass the tiny BERT's 128 positions)
    cloze = " The Treaty of Paris was signed in 1783 by Britain. Britain had lost 13 colonies by 1783. The 13 colonies of Britain were in America."
    corpus = Corpus.from_passages(Passage(str(i), t, x + cloze * (i > 1)) for i, (t, x) in enumerate(PASSAGES, 1))
    config = _tiny_dpr(setattr, lambda d, k, v: d.__setitem__(k, v), root, corpus, root / "qa.tsv", root / "bert",
                       reader_kw={"cloze": 30, "max_steps": 12, "save_every": 3})  # fmt: skip
    rp.run(config(out), log=lambda m: None)


# the kill points of the slow tests and of the table: before the first unit, and three more
SLOW_POINTS = {"encode": (START, 2, 5, 8), "index": (START, 3, 9, 15), "train": (START, 3, 12, 24), "reader": (START, 6, 18, 33),
               "evaluate-qa": (START, 1, 4, 7), "reader-cloze": (START, 3, 6, 9)}  # fmt: skip


def main() -> None:
    import tempfile

    from tests.support.tiny import make_tiny_bert

    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        enc = make_tiny_bert(tmp / "enc", pooling="cls", dropout=0.0)
        rdr = make_tiny_bert(tmp / "rdr", seed=3, dropout=0.0)
        scenarios = {"encode": lambda t, p: scenario_encode(t, enc, p), "index": scenario_index, "train": lambda t, p: scenario_train(t, enc, p),
                     "reader": lambda t, p: scenario_train_reader(t, rdr, p), "evaluate-qa": lambda t, p: scenario_evaluate_qa(t, rdr, p),
                     "reader-cloze": scenario_reader_cloze}  # fmt: skip
        for name, fn in scenarios.items():
            (tmp / name).mkdir()
            t0 = time.perf_counter()
            row = fn(tmp / name, SLOW_POINTS[name])
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(row, flush=True)
    lines = ["# Kill-and-resume runs", "",
             "`python -m tests.support.kill_resume` (the scenarios of `tests/test_kill_resume.py` at the slow tests' kill points): each job "
             "is SIGKILLed at each point in turn (the first before its first unit of resumption: its directory set up, nothing to resume "
             "from yet), each rerun killed at the next point, then run to the end; its result is compared with an uninterrupted run of the "
             "same job.", "",
             "| job | unit of resumption | kill points (units done) | killed mid-run, first before the first unit | done at each kill | "
             "nothing corrupt under a final name | rerun = uninterrupted | seconds (all runs) |",
             "|---|---|---|---|---|---|---|---:|"]  # fmt: skip
    yes = {True: "yes", False: "**no**"}
    for r in rows:
        lines.append(f"| {r['job']} | {r['unit']} | {r['kill_points']} | {yes[r['killed_mid_run'] and r['killed_before_first_unit']]} | "
                     f"{r['done_at_kill']} | {yes[r['nothing_corrupt']]} | {yes[r['same_result']]} | {r['seconds']} |")  # fmt: skip
    out = ROOT / "benchmarks" / "results" / "kill-resume.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"written to {out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if sys.argv[1:2] == ["pieces"]:
        pieces_worker(int(sys.argv[2]), sys.argv[3:])
    elif sys.argv[1:2] == ["reproduce"]:
        reproduce_worker(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        main()
