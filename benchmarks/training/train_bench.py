"""Training speed and memory: densepr's DPR step against sentence-transformers' MNRL, side by side.

Every configuration trains the embedded all-MiniLM-L6-v2, or ``--model DIR`` (e.g. the 12-layer
all-mpnet-base-v2 of ``densepr data fetch --model mpnet``) (mean pooling, no normalisation,
one shared encoder so both sides do the same work) on the same batches: B questions from
the embedded NQ-dev, each with its BM25-mined positive and one BM25 hard negative, passages
as ``title [SEP] text``, dot-product similarity with scale 1, AdamW. Configurations:

* ``densepr``: :func:`densepr.train.retriever.loss_and_backward`, the whole batch in one graph;
* ``densepr-gradcache``: the same with gradient caching (chunks of ``--chunk`` sequences);
* ``densepr-bf16``: ``densepr`` under bf16 autocast (``train --precision bf16``; weights stay float32);
* ``densepr-gradcache-bf16``: both (what a BERT-base-size model needs on a CPU: bounded memory, bf16 speed);
* ``st-mnrl``: sentence-transformers' ``MultipleNegativesRankingLoss(scale=1, dot_score)`` on
  (question, positive, hard negative) triplets: the same objective;
* ``st-cached-mnrl``: its ``CachedMultipleNegativesRankingLoss`` (mini-batch ``--chunk``).

Each runs in a fresh process (so peak memory is its own): one warm-up step, then ``--steps``
timed steps; questions/s is B over the median step time. A configuration the kernel kills
for lack of memory is recorded as such. Prints a table and writes
``benchmarks/training/results/train-speed-b<batch>.json``.

    python benchmarks/training/train_bench.py [--batch-size 128] [--steps 2] [--chunk 8] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "train-speed-b{batch}.json"
CONFIGS = ("densepr", "densepr-gradcache", "densepr-bf16", "densepr-gradcache-bf16", "st-mnrl", "st-cached-mnrl")


def make_batches(batch_size: int, steps: int) -> list[tuple[list[str], list[tuple[str, str]], list[tuple[str, str]]]]:
    """``steps`` batches of (questions, positives, hard negatives) mined from NQ-dev with BM25."""
    from densepr.data import EmbeddedData, load_wiki_summaries
    from densepr.retrieve.bm25 import BM25Index
    from densepr.train.mining import mine

    data = EmbeddedData()
    corpus = load_wiki_summaries(data.summaries)
    qas = data.load_qa("nq-dev", limit=batch_size * steps * 10)  # ~16% have a BM25 positive
    recs = list(mine([qas], corpus, BM25Index.build(corpus), hard_negatives=1, random_negatives=0))
    recs = [r for r in recs if r.hard_negative_ctxs][: batch_size * steps]
    if len(recs) < batch_size * steps:
        raise SystemExit(f"only {len(recs)} mined questions for {steps} batches of {batch_size}")
    out = []
    for s in range(steps):
        part = recs[s * batch_size : (s + 1) * batch_size]
        out.append(([r.question for r in part], [(r.positive_ctxs[0].title, r.positive_ctxs[0].text) for r in part],
                    [(r.hard_negative_ctxs[0].title, r.hard_negative_ctxs[0].text) for r in part]))  # fmt: skip
    return out


def run_one(config: str, batch_size: int, steps: int, chunk: int, model: Path | None = None) -> dict:
    """Train ``steps + 1`` steps in this process; returns timings and peak memory."""
    import torch

    from densepr.data import EmbeddedData
    from densepr.models.encoder import BiEncoder, Encoder, EncoderConfig
    from densepr.train.distributed import Dist
    from densepr.train.gradcache import loss_and_backward

    torch.manual_seed(0)
    batches = make_batches(batch_size, steps + 1)
    model_dir = model or EmbeddedData().model_dir
    times, losses = [], []
    if config.startswith("densepr"):
        enc = Encoder.load(model_dir, EncoderConfig("mean", False, 256), device="cpu")
        model = BiEncoder(enc).train()
        opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
        for qs, pos, neg in batches:
            t0 = time.perf_counter()
            passages = [p for pair in zip(pos, neg) for p in pair]
            q_in = enc.collate(enc.tokenize_questions(qs))
            p_in = enc.collate(enc.tokenize_passages([t for t, _ in passages], [x for _, x in passages]))
            loss, _ = loss_and_backward(model, q_in, p_in, torch.arange(0, 2 * len(qs), 2), Dist(), chunk if "gradcache" in config else 0,
                                        "bf16" if "bf16" in config else "fp32")  # fmt: skip
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            losses.append(loss)
    else:
        from sentence_transformers import SentenceTransformer, models, util
        from sentence_transformers import losses as st_losses

        word = models.Transformer(str(model_dir), max_seq_length=256)
        model = SentenceTransformer(modules=[word, models.Pooling(word.get_word_embedding_dimension(), "mean")], device="cpu")
        model.train()
        if config == "st-mnrl":
            loss_fn = st_losses.MultipleNegativesRankingLoss(model, scale=1.0, similarity_fct=util.dot_score)
        else:
            loss_fn = st_losses.CachedMultipleNegativesRankingLoss(model, scale=1.0, similarity_fct=util.dot_score, mini_batch_size=chunk)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
        for qs, pos, neg in batches:
            t0 = time.perf_counter()
            feats = [model.tokenize(qs), model.tokenize([f"{t} [SEP] {x}" for t, x in pos]),
                     model.tokenize([f"{t} [SEP] {x}" for t, x in neg])]  # fmt: skip
            loss = loss_fn(feats, None)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
    step = statistics.median(times[1:])
    return {"config": config, "batch_size": batch_size, "timed_steps": steps, "step_s": round(step, 2),
            "questions_per_s": round(batch_size / step, 2), "first_loss": round(losses[0], 4),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}  # fmt: skip


def _mem_gib() -> int:
    with open("/proc/meminfo") as fh:
        return round(int(fh.readline().split()[1]) / 2**20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=8, help="gradient-cache chunk / CachedMNRL mini-batch")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--model", type=Path, default=None, help="encoder directory (default: the embedded all-MiniLM-L6-v2)")
    ap.add_argument("--output", type=Path, default=None, help="default: benchmarks/training/results/train-speed-b<batch>.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration in this process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.batch_size, args.steps, args.chunk, args.model)))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, shared by every group
    from common import machine_info

    from densepr.fileio.atomic import write_json

    rows = []
    for config in args.configs:  # one fresh process each: peak memory is that configuration's
        cmd = [sys.executable, __file__, "--one", config, "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--chunk", str(args.chunk)]
        cmd += ["--model", str(args.model)] if args.model else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode < 0 or proc.returncode == 137:
            # Killed by a signal: on this machine that is the kernel's out-of-memory killer.
            sig = -proc.returncode if proc.returncode < 0 else 9
            rows.append({"config": config, "batch_size": args.batch_size, "error": f"killed by signal {sig} (out of memory: the machine has {_mem_gib()} GiB)"})
        elif proc.returncode != 0:
            raise SystemExit(f"{config} failed:\n{(proc.stderr + proc.stdout)[-2000:]}")
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    by = {r["config"]: r for r in rows if "error" not in r}
    ratios = {}
    if "densepr" in by and "st-mnrl" in by:
        ratios["densepr_vs_st_mnrl"] = round(by["densepr"]["questions_per_s"] / by["st-mnrl"]["questions_per_s"], 3)
    if "densepr-gradcache" in by and "st-cached-mnrl" in by:
        ratios["densepr_gradcache_vs_st_cached_mnrl"] = round(by["densepr-gradcache"]["questions_per_s"] / by["st-cached-mnrl"]["questions_per_s"], 3)
    if "densepr" in by and "densepr-bf16" in by:
        ratios["bf16_speedup_over_plain"] = round(by["densepr-bf16"]["questions_per_s"] / by["densepr"]["questions_per_s"], 3)
    if "densepr" in by and "densepr-gradcache" in by:
        ratios["memory_gradcache_over_plain"] = round(by["densepr-gradcache"]["peak_rss_gib"] / by["densepr"]["peak_rss_gib"], 3)
    result = {"command": "python benchmarks/training/train_bench.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k in ("batch_size", "steps", "chunk", "model") and v is not None)
              + " --configs " + " ".join(args.configs),
              "date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "model": str(args.model or "embedded all-MiniLM-L6-v2"),
              "rows": rows, "ratios": ratios}  # fmt: skip
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"training step, batch {args.batch_size} questions x (positive + 1 hard negative), {args.model.name if args.model else 'all-MiniLM-L6-v2'}, CPU")
    for col in ("configuration", "s/step", "questions/s", "peak RSS (GiB)", "first loss"):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    for r in rows:
        if "error" in r:
            table.add_row(r["config"], "-", "-", r["error"], "-")
        else:
            table.add_row(r["config"], f"{r['step_s']:.1f}", f"{r['questions_per_s']:.2f}", f"{r['peak_rss_gib']:.2f}", f"{r['first_loss']:.4f}")
    Console(width=140).print(table)
    print("ratios:", ratios)
    output = args.output or Path(str(RESULTS).format(batch=args.batch_size))
    write_json(output, result)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
