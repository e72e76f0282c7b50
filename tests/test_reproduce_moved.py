"""A reproduce run directory moved elsewhere resumes: its dense index finds the trained encoder that moved with it."""

from __future__ import annotations

import shutil

import numpy as np

from densepr.data import write_passages_tsv
from densepr.reproduce import retrieval
from densepr.reproduce.context import Job
from densepr.reproduce.profiles import ReproduceConfig
from densepr.retrieve.retriever import open_corpus
from densepr.stages import Stage


def _job(out, corpus) -> Job:
    """The dpr profile's retrieval stages over a small corpus: the dense index encoded with a model inside the
    run directory (as round 2's trained encoder is, at <out>/models/...)."""
    job = Job(ReproduceConfig(out_dir=out, profile="smoke", device="cpu"), lambda m: None, False)

    def passages():
        write_passages_tsv(corpus, out / "passages.tsv")
        return open_corpus(out)

    job.runner.run(Stage("passages", passages, lambda: open_corpus(out), {}, (), [out / "passages.tsv"]))
    job.runner.run(retrieval.bm25(job))
    job.runner.run(retrieval.dense(job, model=lambda: str(out / "models" / "best")))
    return job


def test_a_moved_run_directory_resumes_with_its_trained_encoder(tmp_path, corpus, tiny_bert):
    """Was: the job loaded the question encoder from the manifest's absolute path, gone once the run moved:
    "not a Hugging Face model directory"."""
    run = tmp_path / "run"
    shutil.copytree(tiny_bert, run / "models" / "best")
    first = _job(run, corpus)
    assert first.runner.done["dense"].status == "ran"
    want = first.retriever().retrieve(["who created python"], 3, "dense")
    shutil.move(run, tmp_path / "moved")
    again = _job(tmp_path / "moved", corpus)
    assert again.runner.done["dense"].status == "skipped"  # current: loaded, not rebuilt
    got = again.retriever().retrieve(["who created python"], 3, "dense")
    assert again.retriever().question_encoder.name == str((tmp_path / "moved" / "models" / "best").resolve())
    assert (got.rows == want.rows).all() and np.allclose(got.scores, want.scores)
