"""Profile dpr-gpu: the paper's sizes with the 12-layer all-mpnet-base-v2 for both towers and the reader, on a GPU.
Checked here on the CPU: its plan and settings, its refusal on a CPU, and its stage path with a tiny MPNet."""

from __future__ import annotations

from dataclasses import asdict, replace

import pytest

from densepr.errors import DenseprError
from densepr.fileio import read_json
from tests.test_reproduce import _tiny_dpr


def test_the_gpu_profile_plans_the_papers_sizes_on_the_12_layer_model(tmp_path):
    import densepr.reproduce as rp
    from densepr.reproduce.regression import regression_check, uses_defaults

    cfg = rp.ReproduceConfig(out_dir=tmp_path / "out", profile="dpr-gpu", device="cuda")
    plan, reader = cfg.plan, cfg.reader
    assert (plan.model, plan.batch_size, plan.hard_negatives, plan.epochs, plan.round2_epochs) == ("mpnet", 128, 1, 40, 40)
    assert plan.precision == "bf16" and plan.grad_cache_chunk == 0 and plan.lr == 1e-5 and plan.full_graph_peak_gib is None
    assert (reader.model, reader.passages, reader.batch_size, reader.max_length) == ("mpnet", 24, 16, 350)
    assert reader.qa_limit is None and reader.tune_limit is None  # every test question read end to end
    assert rp.stage_order("dpr-gpu") == rp.DPR_STAGES
    assert "min" in rp.PROFILES["dpr-gpu"].expected and "estimate" in rp.PROFILES["dpr-gpu"].expected
    job = rp.Job(cfg, log=lambda m: None, show_progress=False)
    assert job.pretrained_models() == ["mpnet"]  # the job fetches it (data fetch --model mpnet)
    assert job.names["dense-zeroshot"] == "dense (mpnet, zero-shot)"
    # the settings a run may override apply as on profile dpr
    assert rp.ReproduceConfig(profile="dpr-gpu", device="cuda:0", epochs=2, qa_limit=100).plan.epochs == 2
    # no figures recorded for it yet: its run is not compared (rather than failing the check)
    assert uses_defaults(cfg) and not regression_check({"results": {}}, cfg).compared
    # the CPU profiles still start from the embedded MiniLM, with the same stage settings as before
    assert rp.ReproduceConfig(profile="dpr").plan.model == "embedded" and rp.ReproduceConfig(profile="dpr").reader.model == "embedded"
    assert rp.Job(rp.ReproduceConfig(out_dir=tmp_path / "o2", profile="dpr-smoke"), log=lambda m: None, show_progress=False).pretrained_models() == []


def test_the_gpu_profile_is_refused_on_a_cpu_with_what_to_do(tmp_path, capsys):
    import densepr.reproduce as rp
    from tests.support.cli import run

    with pytest.raises(DenseprError, match="sized for a GPU.*--device cuda"):
        rp.ReproduceConfig(profile="dpr-gpu", device="cpu")
    code, _, err = run(capsys, "reproduce", "--profile", "dpr-gpu", "--device", "cpu", "-o", str(tmp_path / "out"))
    assert code == 1 and "sized for a GPU" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_the_gpu_plans_stage_path_runs_with_a_tiny_mpnet(monkeypatch, tmp_path, corpus, qa_tsv, tiny_bert):
    """The dpr-gpu recipe at toy sizes on the CPU: both towers and the reader start from an MPNet (no token_type_ids)."""
    import densepr.reproduce as rp
    from densepr.models.reader import Reader
    from densepr.models.reader_model import SpanReader
    from tests.support.tiny import make_tiny_mpnet

    mpnet = str(make_tiny_mpnet(tmp_path / "mpnet", seed=2))
    small = dict(batch_size=2, val_fraction=0.34, epochs=1, round2_epochs=1, max_steps=2, warmup_steps=1, save_every=1, depth=12, mined_hard=3)
    plan = {k: v for k, v in asdict(replace(rp.profiles.GPU_TRAIN, model=mpnet, **small)).items() if k not in ("sets",)}
    reader = {k: v for k, v in asdict(rp.profiles.GPU_READER).items() if k in ("span_loss", "head_lr", "dropout", "lr")}
    config = _tiny_dpr(monkeypatch.setattr, monkeypatch.setitem, tmp_path, corpus, qa_tsv, tiny_bert,
                       reader_kw={**reader, "model": mpnet}, **plan)  # fmt: skip
    out = tmp_path / "out"
    summary = rp.run(config(out), log=lambda m: None)
    ran = {r["stage"]: r["status"] for r in summary["stages"]}
    assert ran["train-round2"] == "ran" and ran["qa-set-a"] == "ran" and "fetch-mpnet" not in ran  # a directory: nothing to fetch
    assert read_json(out / "models" / "round1" / "config.json")["init"] == mpnet
    assert read_json(out / "models" / "round1" / "config.json")["precision"] == "bf16"
    assert read_json(out / "dense-zeroshot" / "manifest.json")["question_encoder"].startswith(str((tmp_path / "mpnet").resolve()))
    assert read_json(out / "models" / "round2" / "best" / "question_encoder" / "config.json")["model_type"] == "mpnet"
    assert read_json(out / "models" / "reader" / "config.json")["init"] == mpnet
    assert isinstance(Reader.load(out / "reader", "cpu").model, SpanReader)
    assert summary["config"]["encoder"] == f"trained here from {mpnet}"
