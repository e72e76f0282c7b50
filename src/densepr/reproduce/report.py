"""The report: results.md, curves.json and the plots from the evaluated sets, and the training and
QA summaries that ``results.json`` carries."""

from __future__ import annotations

import json

import numpy as np

from densepr.evaluate.report import ablation_table, markdown_table, paper_table, plot_qa, plot_topk, qa_markdown
from densepr.fileio.atomic import atomic_write, read_json, write_json
from densepr.reproduce.context import Job
from densepr.reproduce.profiles import DPR_MODELS, model_label
from densepr.stages import Stage


def report(job: Job, evaluated: dict[str, str], qa: dict[str, str] | None = None) -> Stage:
    """curves.json, results.md and topk.png from the evaluated sets (``{set: its stage}``)."""
    out, cfg = job.cfg.out_dir, job.cfg
    if job.plan is not None:
        start = "all-MiniLM-L6-v2" if job.plan.model == "embedded" else model_label(job.plan.model)  # the default's words: its record stays current
        dense_name = f"DPR trained here ({start} initial weights)"
    else:
        dense_name = "all-MiniLM-L6-v2, zero-shot" if cfg.encoder is None else str(cfg.encoder)

    def build() -> None:
        done = job.runner.done
        best = done["tune"].get()[0]
        results = {n: done[s].get()[0] for n, s in evaluated.items()}
        curves = {n: done[s].get()[1] for n, s in evaluated.items()}
        write_json(out / "curves.json", curves, indent=None)
        title = f"densepr on the embedded benchmark ({len(job.corpus())} Wikipedia summaries; dense = {dense_name})"
        parts = [f"# {title}\n\nhybrid λ = {best} (tuned on {'held-out dev questions' if job.plan else 'dev'})\n"]
        if job.plan is not None:
            methods = [str(m) for m in job.methods if str(m) != "rrf"]
            mined = {"round 1 (BM25)": done["mine"].get(), "round 2 (re-mined)": done["remine"].get()}
            parts += [
                "## Top-20 / top-100 accuracy, all questions (laid out like the paper's Table 2)\n",
                paper_table(results, methods, job.names, "all"),
                "## The same on the answerable subset\n",
                paper_table(results, methods, job.names, "answerable"),
                "## Ablation (top-20, all / answerable)\n",
                ablation_table(results, ["dense-inbatch", "dense-round1", "dense"], job.names),
                "## Training data\n",
                mining_table(mined),
                "## Every method, top-1/5/20/100\n",
            ]
        parts.append(markdown_table(results, names=job.names))
        if qa:
            read = qa_results(job, qa)
            limit = job.reader_plan.qa_limit
            parts += [f"## End to end: exact match of the reader over the top k ({'the first ' + str(limit) if limit else 'all'} "
                      "questions of each set)\n",
                      "DPR's rule: the passage with the best selection logit; fused: selection tuned on held-out questions "
                      "(`tune-reader`).\n", qa_markdown(read)]  # fmt: skip
            if job.reader_plan.model != "embedded":
                parts.insert(-1, f"The reader: trained here from {model_label(job.reader_plan.model)} (new heads).\n")
            plot_qa(read, out / "qa-em.png")
        with atomic_write(out / "results.md") as fh:
            fh.write("\n".join(parts))
        plot_topk(curves, out / "topk.png", job.names, title)

    qa = qa or {}
    upstream = ("passages", "tune", *(("mine", "remine") if job.plan else ()), *evaluated.values(), *qa.values())
    outputs = [out / "curves.json", out / "results.md", out / "topk.png", *([out / "qa-em.png"] if qa else [])]
    return Stage("report", build, settings={"sets": list(evaluated), "qa": list(qa), "dense": dense_name}, upstream=upstream,
                 outputs=outputs)  # fmt: skip


def qa_results(job: Job, qa: dict[str, str]) -> dict:
    """The qa stages' results in ``densepr evaluate-qa``'s layout (``{"ks", "modes", "limit", "sets"}``)."""
    rp = job.reader_plan
    return {"ks": list(rp.ks), "modes": list(rp.modes), "limit": rp.qa_limit,
            "sets": {n: job.runner.done[s].get() for n, s in qa.items()}}  # fmt: skip


def mining_table(mined: dict[str, dict]) -> str:
    """Questions kept per mining round and where their positives came from (``{round: build_training_data report}``)."""
    lines = ["| training data | questions kept | of | positives from BM25 / the model |", "|---|---:|---:|---|"]
    for name, rep in mined.items():
        r = rep["train"]
        lines.append(f"| {name} | {r['records']} | {sum(r['questions'].values())} | "
                     f"{r['positive_from'].get('bm25', 0)} / {r['positive_from'].get('model', 0)} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def training_summary(job: Job) -> dict:
    """Profile dpr: questions mined per round and each model's training run (steps, wall time, last validation)."""
    done, out = job.runner.done, job.cfg.out_dir
    runs = {}
    for model in DPR_MODELS:
        run_dir = out / "models" / model
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        steps = [m for m in metrics if m.get("kind") == "train"]
        vals = [m for m in metrics if m.get("kind") == "validation"]
        runs[model] = {"init": read_json(run_dir / "config.json")["init"], "steps": len(steps),
                       "questions_per_s": round(float(np.median([m["questions_per_s"] for m in steps])), 2) if steps else None,
                       "first_loss": steps[0]["loss"] if steps else None, "last_loss": steps[-1]["loss"] if steps else None,
                       "validation": vals[-1] if vals else None}  # fmt: skip
    mined = {stage: {"records": done[stage].get()["train"]["records"], "questions": done[stage].get()["train"]["questions"],
                     "positive_from": done[stage].get()["train"]["positive_from"]} for stage in ("mine", "remine")}  # fmt: skip
    return {"mined": mined, "runs": runs}
