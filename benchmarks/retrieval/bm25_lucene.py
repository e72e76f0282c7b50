"""How close densepr's BM25 (bm25s, Lucene scoring) is to real Lucene on the embedded benchmark.

The reference is Anserini 0.12.0 (Lucene 8.3), the jar inside Pyserini 0.12.0's wheel:

* the 10,033 summaries are written as an Anserini ``JsonCollection`` (``contents`` =
  ``title\\ntext``, as Pyserini's DPR Wikipedia index) and indexed with ``IndexCollection``;
* each test set's questions go through ``SearchCollection -bm25 -bm25.k1 0.9 -bm25.b 0.4
  -hits 100`` (BagOfWords query, DefaultEnglishAnalyzer, Porter stemming);
* densepr's ``BM25Index`` answers the same questions.

All runs are scored with densepr's DPR evaluation (top-1/5/20/100 on all questions and on
the answerable subset) and compared with Lucene query by query: top-20 overlap, top-1 agreement,
first-hit rank, and the BM25 scores of passages both retrieved. Two Lucene variants are run:
Anserini's default (document lengths stored lossily in one-byte norms, as in every Anserini and
Pyserini index) and ``-bm25.accurate`` (AccurateBM25Similarity, exact lengths). To tell scoring
from analysis apart, a control runs bm25s exactly as densepr does but on the terms Anserini's
DefaultEnglishAnalyzer produces (through a small Java helper), and the two analyzers are
compared directly on every passage and question.

Needs Java 11+ and, once, network access to PyPI: the pinned pyserini wheel is downloaded with
``pip download`` (sha256-checked) and only its Anserini jar is kept, in
``<cache>/tools/anserini-0.12.0-fatjar.jar`` (``<cache>`` as for ``densepr data fetch``:
``$DENSEPR_CACHE`` or ``~/.cache/densepr``). Needs the embedded data (``densepr data fetch``).
Prints tables and writes ``benchmarks/retrieval/results/bm25-lucene.json``.

    python benchmarks/retrieval/bm25_lucene.py [--limit N] [--sets nq-test ...] [--threads 1] [--work-dir DIR] [--wheel-dir DIR]
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import bm25s
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, shared by every group
from common import machine_info

from densepr.data import Corpus, EmbeddedData, QASet, default_cache_dir, load_wiki_summaries
from densepr.data.fetch import Extract, FetchError, WheelSpec, extract_wheel, find_wheel, pip_download
from densepr.data.runs import read_trec_run
from densepr.errors import DenseprError
from densepr.evaluate.answers import AnswerMatcher
from densepr.evaluate.topk import accuracy_report, first_hit_rank
from densepr.fileio.atomic import write_json
from densepr.fileio.dirs import remove_tree, writable_dir
from densepr.fileio.manifest import sha256_file
from densepr.ranking import SearchResult
from densepr.retrieve.bm25 import BACKENDS, BM25Index

RESULTS = Path(__file__).parent / "results" / "bm25-lucene.json"
JAR_NAME = "anserini-0.12.0-fatjar.jar"
ANSERINI = WheelSpec(
    "pyserini",
    "0.12.0",
    "15832592a972c2006f946f7721fc8bc5ff69822d8b29c853dc701ab7535a5553",
    (Extract(f"pyserini/resources/jars/{JAR_NAME}", JAR_NAME, "9897860794da6ea2961716ac19b5a66391800c57ffa6b7f00473db02eb07f874"),),
    note="Anserini 0.12.0 fat jar (Lucene 8.3)",
)
K1, B, HITS = 0.9, 0.4, 100
# Lucene variants: Anserini's default similarity (lossy one-byte document-length norms) and
# AccurateBM25Similarity (exact lengths): (IndexCollection flags, SearchCollection ranker flag).
# The accurate index stores exact lengths as norms, so it must be searched with the accurate
# ranker; and SearchCollection 0.12 picks plain BM25 when given both -bm25 and -bm25.accurate.
VARIANTS = {"lucene": ([], "-bm25"), "lucene-accurate": (["-bm25.accurate"], "-bm25.accurate")}

# Runs Anserini's own analyzer (what IndexCollection/SearchCollection use with default flags)
# over a file of lines; Java 11+ runs a single source file directly, so nothing is compiled here.
ANALYZE_JAVA = """\
import io.anserini.analysis.AnalyzerUtils;
import io.anserini.analysis.DefaultEnglishAnalyzer;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;

public class AnalyzeLines {
  public static void main(String[] a) throws Exception {
    var analyzer = DefaultEnglishAnalyzer.fromArguments("porter", false, null);
    try (var in = Files.newBufferedReader(Path.of(a[0]), StandardCharsets.UTF_8);
         var out = Files.newBufferedWriter(Path.of(a[1]), StandardCharsets.UTF_8)) {
      for (String line; (line = in.readLine()) != null; ) {
        out.write(String.join(" ", AnalyzerUtils.analyze(analyzer, line)));
        out.write('\\n');
      }
    }
  }
}
"""
# Times Lucene in process, one thread, as densepr is timed: for each question, Anserini's analyzer and
# bag-of-words query, then IndexSearcher's top-k with BM25Similarity(k1, b); a few passes, so the JVM's
# JIT has compiled the hot code before the last pass (reported).
TIME_JAVA = """\
import io.anserini.analysis.DefaultEnglishAnalyzer;
import io.anserini.search.query.BagOfWordsQueryGenerator;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;
import org.apache.lucene.index.DirectoryReader;
import org.apache.lucene.search.IndexSearcher;
import org.apache.lucene.search.similarities.BM25Similarity;
import org.apache.lucene.store.FSDirectory;

public class TimeSearch {
  public static void main(String[] a) throws Exception {
    var analyzer = DefaultEnglishAnalyzer.fromArguments("porter", false, null);
    var searcher = new IndexSearcher(DirectoryReader.open(FSDirectory.open(Paths.get(a[0]))));
    searcher.setSimilarity(new BM25Similarity(Float.parseFloat(a[2]), Float.parseFloat(a[3])));
    int hits = Integer.parseInt(a[4]), passes = Integer.parseInt(a[5]);
    var questions = Files.readAllLines(Paths.get(a[1]), StandardCharsets.UTF_8);
    var generator = new BagOfWordsQueryGenerator();
    for (int p = 0; p < passes; p++) {
      long t0 = System.nanoTime(), found = 0;
      for (String q : questions) {
        found += searcher.search(generator.buildQuery("contents", analyzer, q), hits).scoreDocs.length;
      }
      System.out.println("pass " + p + " seconds " + (System.nanoTime() - t0) / 1e9 + " hits " + found);
    }
  }
}
"""
_PASS = re.compile(r"^pass (\d+) seconds ([0-9.Ee-]+) hits (\d+)$")
PASSES = 3
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*\[(Start|End)\s*\] ranker")


class BenchError(Exception):
    """A situation the benchmark cannot go on from (no Java, no jar, Anserini failed)."""


@dataclass
class Run:
    """One system's top-``HITS`` lists for a question set, as corpus rows (-1 pads) and scores."""

    rows: np.ndarray
    scores: np.ndarray
    wall_s: float
    search_s: float | None = None  # Lucene only: SearcherThread time from Anserini's log


def timed(fn, *a, **k) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*a, **k)
    return time.perf_counter() - t0, out


# --- the reference: Anserini's jar and Java -------------------------------------------------


def ensure_jar(cache_root: Path, wheel_dir: Path | None = None) -> Path:
    """The Anserini jar in ``<cache>/tools``, taken from the pinned pyserini wheel once."""
    tools = cache_root / "tools"
    jar = tools / JAR_NAME
    if jar.is_file() and sha256_file(jar) == ANSERINI.files[0].sha256:
        return jar
    tools.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="densepr-anserini-", dir=tools) as tmp:
        # The same pinned-wheel path as `densepr data fetch`: wheel and jar are sha256-checked.
        try:
            if wheel_dir is not None:
                wheel = find_wheel(ANSERINI, wheel_dir)
            else:
                print(f"downloading {ANSERINI.requirement} (~72 MB) for its Anserini jar ...", flush=True)
                wheel = pip_download(ANSERINI, Path(tmp), [])
            extract_wheel(ANSERINI, wheel, tools)
        except FetchError as e:
            raise BenchError(str(e).split("\n  what to do:")[0] + "\n  what to do: check the network or proxy (pip honours "
                             f"PIP_INDEX_URL and HTTPS_PROXY), or get {ANSERINI.requirement}'s wheel elsewhere and pass --wheel-dir DIR") from None
    return jar


def java_version() -> str:
    java = shutil.which("java")
    if java is None:
        raise BenchError("java not found on PATH: Anserini 0.12 needs a Java 11+ runtime (e.g. `apt-get install openjdk-17-jre-headless`)")
    proc = subprocess.run([java, "-version"], capture_output=True, text=True)
    first = (proc.stderr or proc.stdout).splitlines()[:1]
    m = re.search(r'version "(\d+)', first[0]) if first else None
    if proc.returncode != 0 or m is None:
        raise BenchError(f"`java -version` failed: {(proc.stderr or proc.stdout).strip()[:300]}")
    if int(m.group(1)) < 11:
        raise BenchError(f"{first[0]}: Anserini 0.12 and the analyzer helper need Java 11 or newer")
    return first[0]


def java(jar: Path, main: str, args: Sequence[str], expect: str = "") -> tuple[float, str]:
    """Run a class (or a .java source file) with the jar; returns wall seconds and its log.

    Anserini's tools exit 0 even when they fail, so success is also ``expect`` in the log.
    """
    cmd = ["java", "-cp", str(jar), main, *args]
    t, proc = timed(subprocess.run, cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0 or expect not in log:
        tail = "\n    ".join(log.strip().splitlines()[-8:])
        raise BenchError(f"{Path(main).name} failed (exit {proc.returncode}):\n    {' '.join(cmd)}\n    {tail}")
    return t, log


def write_collection(corpus: Corpus, directory: Path, files: int = 2) -> None:
    """JsonCollection, split in ``files`` parts so that each indexing thread has one."""
    directory.mkdir(parents=True, exist_ok=True)
    per = -(-len(corpus) // files)
    for f in range(files):
        with open(directory / f"docs{f:02d}.jsonl", "w", encoding="utf-8") as fh:
            for i in range(f * per, min(len(corpus), (f + 1) * per)):
                fh.write(json.dumps({"id": corpus.ids[i], "contents": f"{corpus.titles[i]}\n{corpus.texts[i]}"}) + "\n")


def build_lucene(jar: Path, collection: Path, index: Path, flags: list[str], threads: int) -> float:
    t, _ = java(jar, "io.anserini.index.IndexCollection", ["-collection", "JsonCollection", "-generator",
                "DefaultLuceneDocumentGenerator", "-input", str(collection), "-index", str(index),
                "-threads", str(threads), "-storeRaw", *flags], expect="documents indexed")  # fmt: skip
    return t


def one_line(text: str) -> str:
    # TSV topics and the analyzer helper read lines: tabs and line breaks become spaces,
    # which the tokenizer treats alike.
    return re.sub(r"[\t\r\n]", " ", text)


def search_lucene(jar: Path, index: Path, questions: Sequence[str], corpus: Corpus, work: Path, ranker: str, threads: int) -> Run:
    topics, run_file = work / "topics.tsv", work / "run.txt"
    run_file.unlink(missing_ok=True)  # never read a previous variant's run
    with open(topics, "w", encoding="utf-8") as fh:
        for qid, q in enumerate(questions):
            fh.write(f"{qid}\t{one_line(q)}\n")
    wall, log = java(jar, "io.anserini.search.SearchCollection", ["-index", str(index), "-topics", str(topics),
                     "-topicreader", "TsvString", "-output", str(run_file), ranker, "-bm25.k1", str(K1),
                     "-bm25.b", str(B), "-hits", str(HITS), "-threads", str(threads)], expect="Total run time")  # fmt: skip
    stamps = {m.group(2): datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f") for ln in log.splitlines() if (m := _LOG_TIME.match(ln))}
    search_s = (stamps["End"] - stamps["Start"]).total_seconds() if len(stamps) == 2 else None
    tag = "bm25accurate(" if ranker == "-bm25.accurate" else "bm25("
    if f"ranker: {tag}" not in log:  # Anserini silently picks one ranker when flags conflict
        raise BenchError(f"SearchCollection did not run the {tag[:-1]} ranker asked for with {ranker}")
    if not run_file.is_file():
        raise BenchError(f"SearchCollection wrote no run file {run_file}; its log ends:\n    " + "\n    ".join(log.strip().splitlines()[-5:]))
    rows = np.full((len(questions), HITS), -1, dtype=np.int64)
    scores = np.zeros((len(questions), HITS), dtype=np.float32)
    # read_trec_run keeps the file's order for equal scores (a stable sort), i.e. Anserini's
    # tie-break by docid; a question with no matching passage has no lines at all.
    for qid, hits in read_trec_run(run_file).items() if run_file.stat().st_size else ():
        for j, (docid, score) in enumerate(hits[:HITS]):
            rows[int(qid), j], scores[int(qid), j] = corpus.row(docid), score
    return Run(rows, scores, wall, search_s)


def time_lucene_one_thread(jar: Path, index: Path, questions: Sequence[str], work: Path) -> tuple[float, int]:
    """Lucene's in-process, one-thread seconds for the questions (the last of PASSES passes) and hits found."""
    src, topics = work / "TimeSearch.java", work / "time-topics.txt"
    src.write_text(TIME_JAVA, encoding="utf-8")
    topics.write_text("".join(one_line(q) + "\n" for q in questions), encoding="utf-8")
    _, log = java(jar, str(src), [str(index), str(topics), str(K1), str(B), str(HITS), str(PASSES)])
    passes = [m for ln in log.splitlines() if (m := _PASS.match(ln.strip()))]
    if len(passes) != PASSES:
        raise BenchError("the timing helper printed no timings; its output ends:\n    " + "\n    ".join(log.strip().splitlines()[-5:]))
    return float(passes[-1].group(2)), int(passes[-1].group(3))


def time_densepr(index: BM25Index, questions: Sequence[str], backend: str) -> tuple[float, SearchResult]:
    """densepr's one-thread seconds for the questions with a BM25 backend (the last of PASSES passes: warm caches, compiled code)."""
    for _ in range(PASSES):
        t, res = timed(index.search, questions, HITS, backend=backend)
    return t, res


def lucene_terms(jar: Path, texts: Sequence[str], work: Path) -> list[list[str]]:
    """Anserini's DefaultEnglishAnalyzer terms for each text (one Java run for all)."""
    src, inp, out = work / "AnalyzeLines.java", work / "analyze-in.txt", work / "analyze-out.txt"
    src.write_text(ANALYZE_JAVA, encoding="utf-8")
    inp.write_text("".join(one_line(t) + "\n" for t in texts), encoding="utf-8")
    java(jar, str(src), [str(inp), str(out)])
    lines = out.read_text(encoding="utf-8").split("\n")[: len(texts)]
    if len(lines) != len(texts):
        raise BenchError(f"the analyzer helper returned {len(lines)} lines for {len(texts)} texts")
    return [ln.split(" ") if ln else [] for ln in lines]


# --- comparisons -----------------------------------------------------------------------------


def analyzer_agreement(lucene: list[list[str]], ours: list[list[str]], texts: Sequence[str], examples: int = 5) -> dict:
    """How often the two analyzers give the same term sequence, and the terms that differ."""
    same = [a == b for a, b in zip(lucene, ours)]
    only_lucene, only_ours = Counter(), Counter()
    for a, b, s in zip(lucene, ours, same):
        if not s:
            ca, cb = Counter(a), Counter(b)
            only_lucene.update(ca - cb)
            only_ours.update(cb - ca)
    diff = [i for i, s in enumerate(same) if not s]
    # Same number of terms: only a term's spelling differs (stemming); else tokenisation differs.
    spelling = [i for i in diff if len(lucene[i]) == len(ours[i])]
    other = [i for i in diff if len(lucene[i]) != len(ours[i])]
    same_count = len(spelling)
    return {"texts": len(same), "identical": int(sum(same)), "identical_fraction": round(float(np.mean(same)), 4) if same else None,
            "differ_same_term_count": int(same_count), "differ_other_term_count": len(diff) - int(same_count),
            "terms_lucene": int(sum(map(len, lucene))), "terms_densepr": int(sum(map(len, ours))),
            "top_terms_only_lucene": only_lucene.most_common(15), "top_terms_only_densepr": only_ours.most_common(15),
            "examples": [{"text": texts[i][:200], "changes": changes(lucene[i], ours[i])} for i in spelling[:examples] + other[:examples]]}  # fmt: skip


def changes(a: list[str], b: list[str]) -> list[list[list[str]]]:
    """The ``[a_terms, b_terms]`` runs where two term sequences differ."""
    ops = difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes()
    return [[a[i1:i2], b[j1:j2]] for op, i1, i2, j1, j2 in ops if op != "equal"]


def agreement(ref: Run, ours: Run, ref_hits: np.ndarray, our_hits: np.ndarray) -> dict:
    """Query-by-query agreement of another system's lists (``ours``) with a Lucene run (``ref``)."""
    n = len(ref.rows)
    overlap, top1, top1_tie, diffs, rel = [], [], [], [], []
    for i in range(n):
        r, o = ref.rows[i][ref.rows[i] >= 0], ours.rows[i][ours.rows[i] >= 0]
        # Overlap over the first 20, out of the longer of the two lists (20 unless few passages match).
        denom = min(20, max(len(r), len(o)))
        overlap.append(len(set(r[:20].tolist()) & set(o[:20].tolist())) / denom if denom else 1.0)
        same = (len(r) == 0 and len(o) == 0) or (len(r) > 0 and len(o) > 0 and r[0] == o[0])
        top1.append(same)
        # Lucene's first passage is tied with our first under our own scores: the
        # difference is only which of equal scores comes first.
        our_score = dict(zip(o.tolist(), ours.scores[i][: len(o)].tolist()))
        tie = len(r) > 0 and r[0] in our_score and abs(our_score[r[0]] - float(ours.scores[i][0])) <= 1e-5 * max(1.0, abs(float(ours.scores[i][0])))
        top1_tie.append(same or tie)
        for j, row in enumerate(r.tolist()):
            if row in our_score:
                d = our_score[row] - float(ref.scores[i][j])
                diffs.append(abs(d))
                rel.append(abs(d) / max(abs(float(ref.scores[i][j])), 1e-9))
    fr, fo = first_hit_rank(ref_hits, none=HITS), first_hit_rank(our_hits, none=HITS)
    h20r, h20o = fr < 20, fo < 20
    diffs_a, rel_a = np.asarray(diffs), np.asarray(rel)
    return {
        "top20_overlap": round(float(np.mean(overlap)), 4),
        "top1_agreement": round(float(np.mean(top1)), 4),
        "top1_agreement_or_tied": round(float(np.mean(top1_tie)), 4),
        "first_hit_rank_equal": round(float(np.mean(fr == fo)), 4),
        "first_hit_rank_mean_diff": round(float(np.mean(fo.astype(float) - fr)), 3),  # other - Lucene; no hit = 100
        "hit20_only_lucene": int((h20r & ~h20o).sum()),
        "hit20_only_other": int((h20o & ~h20r).sum()),
        # Passages in both top-100 lists: Lucene's scores are printed rounded to 1e-4 (and
        # nudged by 1e-6 per tie), so equal scoring shows as |diff| <= ~2e-4.
        "common_passages": int(len(diffs_a)),
        "score_abs_diff_max": round(float(diffs_a.max()), 6) if len(diffs_a) else None,
        "score_rel_diff_mean": round(float(rel_a.mean()), 6) if len(rel_a) else None,
        "score_equal_fraction": round(float(np.mean(diffs_a <= 2e-4)), 4) if len(diffs_a) else None,
    }


def points(a: dict, b: dict) -> dict:
    """``b - a`` in accuracy points, for every subset and k."""
    return {sub: {k: round(b[sub][k] - a[sub][k], 2) for k in a[sub] if k != "n"} for sub in a}


def control_search(model: bm25s.BM25, queries: list[list[str]]) -> Run:
    """bm25s (Lucene scoring, as densepr uses it) over *Lucene's* terms: scoring without analysis."""
    rows = np.full((len(queries), HITS), -1, dtype=np.int64)
    scores = np.zeros((len(queries), HITS), dtype=np.float32)
    t0 = time.perf_counter()
    for i, q in enumerate(queries):
        if q:  # a question of stopwords only matches nothing (bm25s would fail on it)
            docs, sc = model.retrieve([q], k=HITS, show_progress=False, n_threads=0)
            rows[i] = np.where(sc[0] > 0, docs[0], -1)
            scores[i] = np.where(sc[0] > 0, sc[0], 0.0)
    return Run(rows, scores, time.perf_counter() - t0)


# (compared system, Lucene reference) pairs reported for every set.
PAIRS = (("densepr", "lucene"), ("densepr", "lucene-accurate"), ("bm25s-lucene-terms", "lucene"), ("bm25s-lucene-terms", "lucene-accurate"))


def bench_set(qas: QASet, index: BM25Index, control: bm25s.BM25, control_queries: list[list[str]], matcher: AnswerMatcher,
              corpus: Corpus, jar: Path, indexes: dict[str, Path], work: Path, threads: int) -> dict:  # fmt: skip
    questions = qas.questions
    runs: dict[str, Run] = {}
    for variant, (_, ranker) in VARIANTS.items():
        runs[variant] = search_lucene(jar, indexes[variant], questions, corpus, work, ranker, threads)
    lucene_s, lucene_found = time_lucene_one_thread(jar, indexes["lucene"], questions, work)
    one_thread = {"lucene": len(questions) / lucene_s}
    for backend in BACKENDS:
        t, res = time_densepr(index, questions, backend)
        one_thread[f"densepr-{backend}"] = len(questions) / t
        runs.setdefault("densepr", Run(res.rows, res.scores, t))  # both backends return the same lists
        if not (np.array_equal(runs["densepr"].rows, res.rows) and np.array_equal(runs["densepr"].scores, res.scores)):
            raise BenchError(f"densepr's BM25 backends disagree on {qas.name}")
    found = int((runs["densepr"].rows >= 0).sum())
    runs["bm25s-lucene-terms"] = control_search(control, control_queries)
    hits = dict(zip(runs, matcher.hits_many([r.rows for r in runs.values()], qas)))
    answerable = matcher.answerable(qas)
    acc = {k: accuracy_report(h, answerable) for k, h in hits.items()}
    n = len(questions)
    speed = {"densepr_queries_per_s": round(n / runs["densepr"].wall_s, 1),
             "one_thread_queries_per_s": {k: round(v, 1) for k, v in one_thread.items()},
             "one_thread_ratio_to_lucene": {k: round(v / one_thread["lucene"], 2) for k, v in one_thread.items() if k != "lucene"},
             "one_thread_hits": {"lucene": lucene_found, "densepr": found}}  # fmt: skip
    for variant in VARIANTS:
        r = runs[variant]
        speed[f"{variant}_queries_per_s_wall"] = round(n / r.wall_s, 1)
        speed[f"{variant}_queries_per_s_search"] = round(n / r.search_s, 1) if r.search_s else None
    return {
        "questions": n,
        "answerable": int(answerable.sum()),
        "match": qas.match,
        "accuracy": acc,
        "densepr_minus_lucene_points": points(acc["lucene"], acc["densepr"]),
        "densepr_minus_lucene_accurate_points": points(acc["lucene-accurate"], acc["densepr"]),
        "lucene_accurate_minus_lucene_points": points(acc["lucene"], acc["lucene-accurate"]),
        "agreement": {f"{o} vs {r}": agreement(runs[r], runs[o], hits[r], hits[o]) for o, r in PAIRS},
        "speed": speed,
    }


# --- report ----------------------------------------------------------------------------------


def print_tables(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    m = results["machine"]
    acc = Table(title=f"DPR top-k accuracy (%), BM25 k1={K1} b={B}: Lucene (Anserini 0.12) vs densepr ({m['cpu']}, {m['cores']} cores)")
    for col in ("set", "system", "n", "top1", "top5", "top20", "top100", "ans. n", "ans. top1", "ans. top5", "ans. top20", "ans. top100"):
        acc.add_column(col, justify="left" if col in ("set", "system") else "right")
    for name, d in results["datasets"].items():
        for system in ("lucene", "lucene-accurate", "densepr", "bm25s-lucene-terms"):
            a = d["accuracy"][system]
            acc.add_row(name, system, str(a["all"]["n"]), *(f"{a['all'][f'top{k}']:.2f}" for k in (1, 5, 20, 100)),
                        str(a["answerable"]["n"]), *(f"{a['answerable'][f'top{k}']:.2f}" for k in (1, 5, 20, 100)))  # fmt: skip
        p = d["densepr_minus_lucene_points"]
        acc.add_row(name, "[bold]densepr - lucene[/]", "", *(f"{p['all'][f'top{k}']:+.2f}" for k in (1, 5, 20, 100)), "",
                    *(f"{p['answerable'][f'top{k}']:+.2f}" for k in (1, 5, 20, 100)), end_section=True)  # fmt: skip
    console.print(acc)

    short = {"lucene": "lucene", "lucene-accurate": "accurate", "densepr": "densepr", "bm25s-lucene-terms": "control"}
    agr = Table(title="Agreement with Lucene, and queries/s (Lucene wall includes JVM start-up and index opening)\n"
                      "accurate = lucene-accurate; control = bm25s on Lucene's own terms; scores equal = |diff| <= 2e-4 on passages both retrieved")  # fmt: skip
    for col in ("set", "system vs Lucene", "top20 overlap", "top1 agree", "top1 agree|tie", "first-hit equal",
                "hit@20 only L/other", "scores equal", "densepr q/s", "Lucene q/s wall", "Lucene q/s search"):  # fmt: skip
        agr.add_column(col, justify="left" if col in ("set", "system vs Lucene") else "right", no_wrap=col == "system vs Lucene")
    for name, d in results["datasets"].items():
        for j, (other, ref) in enumerate(PAIRS):
            g, s = d["agreement"][f"{other} vs {ref}"], d["speed"]
            q_search = s[f"{ref}_queries_per_s_search"]
            speeds = (f"{s['densepr_queries_per_s']:.0f}", f"{s[f'{ref}_queries_per_s_wall']:.0f}", f"{q_search:.0f}" if q_search else "-")
            agr.add_row(name, f"{short[other]} vs {short[ref]}", f"{g['top20_overlap']:.4f}", f"{g['top1_agreement']:.4f}", f"{g['top1_agreement_or_tied']:.4f}",
                        f"{g['first_hit_rank_equal']:.4f}", f"{g['hit20_only_lucene']}/{g['hit20_only_other']}",
                        f"{g['score_equal_fraction']:.4f}" if g["score_equal_fraction"] is not None else "-",
                        *(speeds if other == "densepr" else ("", "", "")), end_section=j == len(PAIRS) - 1)  # fmt: skip
    console.print(agr)

    speed = Table(title=f"BM25 search, one thread, questions/s (same questions, top-{HITS}, analysis included; the last of {PASSES} passes)")
    for col in ("set", "n", "Lucene (in process)", "densepr numba", "densepr numpy", "numba / Lucene", "numpy / Lucene", "hits Lucene / densepr"):
        speed.add_column(col, justify="left" if col == "set" else "right")
    for name, d in results["datasets"].items():
        q, r, h = d["speed"]["one_thread_queries_per_s"], d["speed"]["one_thread_ratio_to_lucene"], d["speed"]["one_thread_hits"]
        speed.add_row(name, str(d["questions"]), f"{q['lucene']:.0f}", f"{q['densepr-numba']:.0f}", f"{q['densepr-numpy']:.0f}",
                      f"{r['densepr-numba']:.2f}x", f"{r['densepr-numpy']:.2f}x", f"{h['lucene']} / {h['densepr']}")  # fmt: skip
    console.print(speed)

    an = results["analyzer"]
    for what in ("passages", "questions"):
        a = an[what]
        console.print(f"analyzer, {what}: {a['identical']}/{a['texts']} identical term sequences ({100 * a['identical_fraction']:.2f}%); "
                      f"terms only Lucene: {a['top_terms_only_lucene'][:8]}; only densepr: {a['top_terms_only_densepr'][:8]}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None, help="first N questions of each set (default: all)")
    ap.add_argument("--sets", nargs="+", default=list(EmbeddedData.TEST_SETS), choices=EmbeddedData.TEST_SETS, metavar="SET",
                    help=f"test sets (default: all of {', '.join(EmbeddedData.TEST_SETS)})")  # fmt: skip
    ap.add_argument("--threads", type=int, default=1, help="Anserini indexing and SearchCollection threads (the in-process timing is always one thread)")
    ap.add_argument("--work-dir", type=Path, default=None, help="keep the collection, Lucene indexes and runs here (default: a temporary dir, removed)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="cache root for the jar (default: $DENSEPR_CACHE or ~/.cache/densepr)")
    ap.add_argument("--wheel-dir", type=Path, default=None, help=f"take {ANSERINI.requirement}'s wheel from here instead of PyPI")
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args()
    try:
        results = run(args)
    except (BenchError, FetchError, DenseprError) as e:
        sys.exit(f"bm25_lucene: {e}")
    print_tables(results)
    write_json(args.output, results)
    print(f"wrote {args.output}")


def run(args: argparse.Namespace) -> dict:
    command = "python benchmarks/retrieval/bm25_lucene.py" + (f" --limit {args.limit}" if args.limit else "") + \
        ("" if args.sets == list(EmbeddedData.TEST_SETS) else " --sets " + " ".join(args.sets)) + f" --threads {args.threads}"  # fmt: skip
    jversion = java_version()
    data = EmbeddedData()
    corpus = load_wiki_summaries(data.summaries)
    qa_sets = {name: data.load_qa(name, limit=args.limit) for name in args.sets}
    jar = ensure_jar(Path(args.cache_dir or default_cache_dir()).expanduser(), args.wheel_dir)
    with tempfile.TemporaryDirectory(prefix="densepr-bm25-lucene-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        write_collection(corpus, work / "collection")
        index_s, indexes = {}, {}
        for variant, (flags, _) in VARIANTS.items():
            indexes[variant] = work / f"index-{variant}"
            writable_dir(indexes[variant], "Lucene index", ("segments*", "write.lock", "_*"))  # a folder Lucene did not write: refused
            remove_tree(indexes[variant])
            print(f"indexing {len(corpus)} passages with Anserini ({variant}) ...", flush=True)
            index_s[variant] = build_lucene(jar, work / "collection", indexes[variant], flags, args.threads)
        t_build, index = timed(BM25Index.build, corpus)

        print("comparing analyzers on every passage and question ...", flush=True)
        doc_texts = [f"{t}\n{x}" for t, x in zip(corpus.titles, corpus.texts)]
        questions = [q for qas in qa_sets.values() for q in qas.questions]
        lucene = lucene_terms(jar, doc_texts + questions, work)
        ours = index.analyzer.many([f"{t} {x}" for t, x in zip(corpus.titles, corpus.texts)] + questions)
        nd = len(doc_texts)
        analyzer = {"passages": analyzer_agreement(lucene[:nd], ours[:nd], doc_texts),
                    "questions": analyzer_agreement(lucene[nd:], ours[nd:], questions)}  # fmt: skip

        # The control: the same bm25s scoring densepr uses, fed Lucene's own terms.
        control = bm25s.BM25(k1=K1, b=B, method="lucene")
        control.index(lucene[:nd], show_progress=False)
        matcher = AnswerMatcher(corpus.texts)
        datasets, start = {}, nd
        for name, qas in qa_sets.items():
            print(f"{name}: {len(qas)} questions ...", flush=True)
            queries, start = lucene[start : start + len(qas)], start + len(qas)
            datasets[name] = bench_set(qas, index, control, queries, matcher, corpus, jar, indexes, work, args.threads)
            datasets[name]["questions_analyzed_identically"] = round(float(np.mean([a == b for a, b in zip(queries, ours[start - len(qas) : start])])), 4)
    return {
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
        "machine": {**machine_info(), "java": jversion},
        "reference": {"anserini": "0.12.0 (Lucene 8.3)", "jar": JAR_NAME, "jar_sha256": ANSERINI.files[0].sha256,
                      "from_wheel": ANSERINI.requirement, "wheel_sha256": ANSERINI.sha256,
                      "index": "JsonCollection, contents = title\\ntext, DefaultLuceneDocumentGenerator, -storeRaw",
                      "search": f"SearchCollection -topicreader TsvString -bm25 (or -bm25.accurate) -bm25.k1 {K1} -bm25.b {B} -hits {HITS} -threads {args.threads}",
                      "variants": {"lucene": "default BM25Similarity (document lengths in lossy one-byte norms)",
                                   "lucene-accurate": "-bm25.accurate at index time and as the search ranker (AccurateBM25Similarity: exact document lengths)"}},
        "densepr": {"k1": index.k1, "b": index.b, "analyzer": index.analyzer.name, "fields": "title + ' ' + text",
                    "search": "BM25Index.search, one process, bm25s n_threads=0"},
        "timing_notes": "queries/s: densepr = BM25Index.search over the set (query analysis + retrieval), after a 10-query warm-up; "
                        "Lucene wall = the whole SearchCollection process (JVM start-up, index opening, topics, search, run file); "
                        "Lucene search = Anserini's log, SearcherThread [Start] to [End] (query analysis, search, run file; ms resolution).",
        "corpus": {"passages": len(corpus), "lucene_index_s": round(index_s["lucene"], 2),
                   "lucene_accurate_index_s": round(index_s["lucene-accurate"], 2), "densepr_build_s": round(t_build, 2)},
        "systems": {"lucene": "Anserini default BM25 (what Pyserini's prebuilt indexes use)",
                    "lucene-accurate": "Anserini AccurateBM25Similarity (exact document lengths)",
                    "densepr": "densepr BM25Index (bm25s, method=lucene, densepr's LuceneAnalyzer)",
                    "bm25s-lucene-terms": "control: bm25s as densepr calls it, on terms from Anserini's DefaultEnglishAnalyzer "
                                          "(passages and questions): scoring alone, no analyzer difference"},
        "analyzer": analyzer,
        "datasets": datasets,
    }  # fmt: skip


if __name__ == "__main__":
    main()
