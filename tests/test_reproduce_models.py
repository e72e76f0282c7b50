"""``densepr reproduce --reader-model / --retriever-model``: the model a training profile's reader or retriever starts from
(ReaderPlan.model / TrainPlan.model): checked up front, part of the affected stages' settings only, and the default
profiles' stage settings unchanged (their finished runs stay current)."""

from __future__ import annotations

import pytest

from densepr.errors import DenseprError
from densepr.fileio import read_json
from tests.test_reproduce import _tiny_dpr

# Profile dpr's default train-reader and train-round1 settings (the fingerprinted ones), as the code before
# TrainPlan.model / ReaderPlan.model existed computed them (commit 5a2eea9^): a default run recorded then stays current.
DPR_TRAIN_READER = {"adam_eps": 1e-08, "batch_size": 32, "depth": 20, "dev_limit": 100, "dropout": 0.0, "epochs": 3, "eval_every": 0,
                    "head_lr": 0.001, "init": "embedded", "lr": 0.0001, "match": "string", "max_answer_length": 10, "max_grad_norm": 2.0,
                    "max_length": 192, "max_negatives": 50, "max_positives": 10, "max_questions": None, "max_steps": None, "passages": 2,
                    "piece": 16, "save_every": 10, "seed": 12345, "span_loss": "shared", "warmup_steps": 10, "weight_decay": 0.0}  # fmt: skip
DPR_TRAIN_ROUND1 = {"adam_eps": 1e-08, "batch_size": 128, "epochs": 1, "grad_cache_chunk": 0, "hard_negatives": 1, "init": "embedded",
                    "log_every": 1, "lr": 3e-05, "max_grad_norm": 2.0, "max_length": 256, "max_steps": None, "normalize": True, "pooling": None,
                    "random_negatives": 0, "save_every": 10, "scale": 20.0, "seed": 12345, "shared": False, "skip_bad": False,
                    "tensorboard": False, "val_hard_negatives": 5, "warmup_steps": 6, "weight_decay": 0.0}  # fmt: skip


def _job(cfg):
    import densepr.reproduce as rp

    return rp.Job(cfg, log=lambda m: None, show_progress=False)


def test_the_model_flags_override_the_plans_and_are_checked_up_front(tmp_path):
    import densepr.reproduce as rp
    from densepr.reproduce.regression import uses_defaults

    mp = rp.ReproduceConfig(out_dir=tmp_path / "o", profile="dpr", reader_model="mpnet")
    assert mp.reader.model == "mpnet" and mp.plan.model == "embedded" and not uses_defaults(mp)  # not compared with MiniLM's figures
    assert _job(mp).pretrained_models() == ["mpnet"]  # the job fetches it (as `densepr data fetch --model mpnet`)
    both = rp.ReproduceConfig(out_dir=tmp_path / "o", profile="dpr-smoke", retriever_model="mpnet", reader_model="mpnet")
    assert (both.plan.model, both.reader.model) == ("mpnet", "mpnet")
    # the default named explicitly is the default: the same plan, still compared with the committed figures
    same = rp.ReproduceConfig(profile="dpr", reader_model="embedded", retriever_model="embedded")
    assert same.plan == rp.PROFILES["dpr"].train and same.reader == rp.PROFILES["dpr"].reader and uses_defaults(same)
    # the GPU profile's MPNet can be swapped back too
    assert rp.ReproduceConfig(profile="dpr-gpu", device="cuda", reader_model="embedded").reader.model == "embedded"
    # a directory: made absolute, so the stage settings name the same model from any working directory
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    rel = model.relative_to(tmp_path)
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert rp.ReproduceConfig(profile="dpr", reader_model=str(rel)).reader.model == str(model.resolve())
    finally:
        os.chdir(cwd)
    (tmp_path / "empty").mkdir()
    for kw, message in (({"profile": "full", "reader_model": "mpnet"}, "--reader-model applies to the profiles with a reader"),
                        ({"profile": "smoke", "retriever_model": "mpnet"}, "--retriever-model applies to the training profiles"),
                        ({"profile": "dpr", "reader_model": "bert-large"}, "--reader-model 'bert-large': no such model directory.*embedded, mpnet"),
                        ({"profile": "dpr", "retriever_model": str(tmp_path / "gone")}, "--retriever-model .*gone.*no such model directory"),
                        ({"profile": "dpr", "reader_model": str(tmp_path / "empty")}, "not a model directory \\(no config.json"),
                        ({"profile": "dpr", "encoder": str(model)}, "--encoder applies to the zero-shot profiles")):  # fmt: skip
        with pytest.raises(DenseprError, match=message):
            rp.ReproduceConfig(**kw)


def test_the_model_flags_fail_on_the_command_line_with_one_line_and_write_nothing(tmp_path, capsys):
    from tests.support.cli import run

    for args, message in ((["--profile", "full", "--reader-model", "mpnet"], "--reader-model applies"),
                          (["--profile", "dpr", "--retriever-model", str(tmp_path / "nope")], "no such model directory")):  # fmt: skip
        code, _, err = run(capsys, "reproduce", *args, "-o", str(tmp_path / "out"))
        assert code == 1 and message in err and "Traceback" not in err
        assert not (tmp_path / "out").exists()


def test_the_default_profiles_stage_settings_are_those_recorded_before_the_model_fields(monkeypatch, tmp_path, corpus, qa_tsv, tiny_bert):
    import densepr.reproduce as rp

    _tiny_dpr(monkeypatch.setattr, monkeypatch.setitem, tmp_path, corpus, qa_tsv, tiny_bert)  # the data without a fetch
    for kw in ({}, {"reader_model": "embedded", "retriever_model": "embedded"}):
        job = _job(rp.ReproduceConfig(out_dir=tmp_path / "o", profile="dpr", **kw))
        assert rp.reading.train_reader(job).fingerprinted == DPR_TRAIN_READER
        assert rp.training.train(job, "round1", "mine", 1, 1).fingerprinted == DPR_TRAIN_ROUND1
        cloze = _job(rp.ReproduceConfig(out_dir=tmp_path / "o", profile="dpr", reader_cloze=100, **kw))
        assert "init" not in rp.reading.reader_cloze(cloze).fingerprinted  # absent when the reader starts from the embedded MiniLM
        assert rp.report.report(job, {}).fingerprinted["dense"] == "DPR trained here (all-MiniLM-L6-v2 initial weights)"
    job = _job(rp.ReproduceConfig(out_dir=tmp_path / "o", profile="dpr", retriever_model="mpnet"))
    assert rp.report.report(job, {}).fingerprinted["dense"] == "DPR trained here (mpnet:all-mpnet-base-v2 initial weights)"


def test_the_reader_model_changes_the_reader_stages_only_and_the_retriever_model_the_retrievers(monkeypatch, tmp_path, corpus, qa_tsv, tiny_bert):
    from densepr.reproduce.reading import reader_cloze, reader_data, train_reader
    from densepr.reproduce.retrieval import dense
    from densepr.reproduce.training import mine, train
    from tests.support.tiny import make_tiny_mpnet

    mpnet = str(make_tiny_mpnet(tmp_path / "mpnet", seed=2).resolve())  # as the flag records it
    config = _tiny_dpr(monkeypatch.setattr, monkeypatch.setitem, tmp_path, corpus, qa_tsv, tiny_bert)

    def stages(**kw) -> dict:
        job = _job(config(tmp_path / "out", **kw))
        built = [mine(job), dense(job, "dense-zeroshot"), train(job, "round1", "mine", 1, 1), train(job, "round2", "remine", 1, 1, "round1"),
                 reader_data(job), train_reader(job), reader_cloze(job)]  # fmt: skip
        return {s.name: (s.fingerprinted, tuple(s.upstream)) for s in built}

    default, reader, retriever = stages(), stages(reader_model=mpnet), stages(retriever_model=mpnet)
    assert [n for n in default if default[n] != reader[n]] == ["train-reader", "reader-cloze"]
    assert reader["train-reader"][0]["init"] == mpnet and reader["reader-cloze"][0]["init"] == mpnet
    # round 2 starts from round 1's weights: its own settings are the same, its upstream (round 1) changes
    assert [n for n in default if default[n] != retriever[n]] == ["dense-zeroshot", "train-round1"]
    assert retriever["train-round1"][0]["init"] == mpnet and retriever["dense-zeroshot"][0]["encoder"] == mpnet
    # bf16 (--train-precision) reaches the MPNet reader's training too
    half = _job(config(tmp_path / "out", reader_model=mpnet, train_precision="bf16"))
    assert train_reader(half).fingerprinted["precision"] == "bf16"
    # --reader-train-precision: the reader alone, so the fp32 retrievers of a finished run stay current
    reader_half = stages(reader_model=mpnet, reader_train_precision="bf16")
    assert [n for n in default if default[n] != reader_half[n]] == ["train-reader", "reader-cloze"]
    assert reader_half["train-reader"][0]["precision"] == reader_half["reader-cloze"][0]["precision"] == "bf16"
    assert "precision" not in reader_half["train-round1"][0]
    fewer = stages(reader_epochs=1)  # a reader of other epochs: its training alone reruns
    assert [n for n in default if default[n] != fewer[n]] == ["train-reader"] and fewer["train-reader"][0]["epochs"] == 1


def test_a_run_with_another_reader_model_reruns_the_reader_stages_only(monkeypatch, tmp_path, corpus, qa_tsv, tiny_bert):
    """The tiny dpr run, then the same with an MPNet reader (in bf16): only the reader's training and what follows rerun."""
    import densepr.reproduce as rp
    from densepr.models.reader import Reader
    from densepr.models.reader_model import SpanReader
    from tests.support.tiny import make_tiny_mpnet

    mpnet = str(make_tiny_mpnet(tmp_path / "mpnet", seed=2).resolve())  # as the flag records it
    config = _tiny_dpr(monkeypatch.setattr, monkeypatch.setitem, tmp_path, corpus, qa_tsv, tiny_bert)
    out = tmp_path / "out"

    def job(**kw):
        summary = rp.run(config(out, train_precision="bf16", **kw), log=lambda m: None)
        return summary, {r["stage"]: r["status"] for r in summary["stages"]}

    first, _ = job()
    assert "The reader: trained here" not in (out / "results.md").read_text()  # the default's report as before
    # (here the stand-in data's "embedded" model is the tiny BERT)
    assert first["config"]["encoder"] == first["config"]["reader_encoder"] == "trained here from embedded:all-MiniLM-L6-v2"
    summary, ran = job(reader_model=mpnet)
    assert [s for s, status in ran.items() if status == "ran"] == ["train-reader", "tune-reader", "qa-set-a", "report"]
    assert ran["reader-data"] == "skipped" and ran["train-round2"] == "skipped" and "fetch-mpnet" not in ran
    reader_cfg = read_json(out / "models" / "reader" / "config.json")
    assert reader_cfg["init"] == mpnet and reader_cfg["precision"] == "bf16"
    assert isinstance(Reader.load(out / "reader", "cpu").model, SpanReader)  # the shipped reader/ is the MPNet one
    assert summary["config"]["reader_encoder"] == f"trained here from {mpnet}" and summary["config"]["reader"]["model"] == mpnet
    assert summary["results"] == first["results"]  # the retrieval figures are the resumed ones
    assert f"The reader: trained here from {mpnet} (new heads)." in (out / "results.md").read_text()
    _, ran = job(reader_model=mpnet)  # and then current
    assert {s for s, status in ran.items() if status == "ran"} == set()


def test_the_summary_names_the_real_starting_model():
    from densepr.reproduce.profiles import model_label

    assert model_label("embedded") == "embedded:all-MiniLM-L6-v2"
    assert model_label("mpnet") == "mpnet:all-mpnet-base-v2"
    assert model_label("/models/x") == "/models/x"
