"""DPR training: gradient caching, multi-process equality, resume, checkpoints, and hard-negative mining."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from densepr.data import Passage, QASet, TrainRecord, load_qa, write_train_records
from densepr.errors import DenseprError
from densepr.evaluate.answers import has_answer
from densepr.models.encoder import BiEncoder, Encoder, EncoderConfig
from densepr.retrieve.bm25 import BM25Index
from densepr.train.config import TrainConfig
from densepr.train.distributed import Dist
from densepr.train.gradcache import chunks, loss_and_backward
from densepr.train.mining import MiningStats, mine, split_holdout
from densepr.train.retriever import load_examples, train, validate
from tests.support.tiny import PASSAGES, make_tiny_bert


def _records(n: int = 12) -> list[TrainRecord]:
    """Question i asks about passage i % 6; passages 6..11 are the hard and random negatives, so a
    batch never holds a question's positive twice."""
    ps = [Passage(str(i), t, x) for i, (t, x) in enumerate(PASSAGES)]
    recs = []
    for i in range(n):
        j = i % 6
        words = ps[j].text.split()
        recs.append(TrainRecord(f"tell me about {ps[j].title.lower()} {words[2].lower()}", [ps[j].title], [ps[j]],
                                negative_ctxs=[ps[6 + (j + 3) % 6]],
                                hard_negative_ctxs=[ps[6 + (j + k) % 6] for k in (0, 1, 2)]))  # fmt: skip
    return recs


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("train") / "train.json"
    write_train_records(_records(12), path)
    return path


@pytest.fixture(scope="module")
def no_dropout_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("nodrop"), seed=5, pooling="cls", dropout=0.0)


def _batch(model: BiEncoder, n: int = 4):
    ex = load_examples_from(_records(n))
    qs = [e.question for e in ex]
    ps = [p for e in ex for p in (e.positives[0], e.hard[0])]
    q_in = model.question.collate(model.question.tokenize_questions(qs))
    p_in = model.passage.collate(model.passage.tokenize_passages([p.title for p in ps], [p.text for p in ps]))
    return q_in, p_in, torch.arange(0, 2 * n, 2)


def load_examples_from(records):
    from densepr.train.retriever import Example

    return [Example(r.question, r.answers, r.positive_ctxs, r.hard_negative_ctxs, r.negative_ctxs) for r in records]


def _grads(model: BiEncoder) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        out[name] = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
    model.zero_grad(set_to_none=True)
    return out


def _two_towers(tmp_path) -> BiEncoder:
    q = Encoder.load(make_tiny_bert(tmp_path / "q", seed=1, pooling="mean"), device="cpu")
    p = Encoder.load(make_tiny_bert(tmp_path / "p", seed=2, pooling="cls"), device="cpu")
    return BiEncoder(q, p)


def test_grad_cache_equals_full_graph_step_dropout_included(tmp_path):
    model = _two_towers(tmp_path).train()  # dropout 0.1 active
    q_in, p_in, pos = _batch(model, 6)
    # Reference: the same chunked forward passes, but with the whole graph kept, one backward.
    torch.manual_seed(0)
    (q_chunks, q_inv), (p_chunks, p_inv) = chunks(q_in, 4), chunks(p_in, 4)
    q = torch.cat([model.encode_query(**c) for c in q_chunks])[q_inv]
    p = torch.cat([model.encode_passage(**c) for c in p_chunks])[p_inv]
    ref_loss = model.loss(q, p, pos)
    ref_loss.backward()
    ref = _grads(model)
    torch.manual_seed(0)
    loss, _ = loss_and_backward(model, q_in, p_in, pos, Dist(), chunk=4)
    got = _grads(model)
    assert loss == pytest.approx(float(ref_loss.detach()), rel=1e-6)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(float(g.abs().sum()) > 0 for g in got.values())
    # Different dropout masks would give different gradients: the replay is what makes them equal.
    torch.manual_seed(1)
    loss_and_backward(model, q_in, p_in, pos, Dist(), chunk=4)
    other = _grads(model)
    assert any(not torch.allclose(other[n], ref[n], atol=1e-6) for n in ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grad_cache_equals_plain_full_batch_without_dropout(tmp_path, dtype):
    model = _two_towers(tmp_path).eval().to(dtype)
    q_in, p_in, pos = _batch(model, 6)
    plain_loss, plain_acc = loss_and_backward(model, q_in, p_in, pos, Dist(), chunk=0)
    plain = _grads(model)
    for chunk in (1, 5):
        loss, acc = loss_and_backward(model, q_in, p_in, pos, Dist(), chunk=chunk)
        got = _grads(model)
        assert loss == pytest.approx(plain_loss, rel=1e-5) and acc == plain_acc
        # float64: the same gradient; float32: up to the order in which token gradients are summed.
        scale = max(float(g.abs().max()) for g in plain.values())
        tol = dict(rtol=1e-9, atol=1e-12 * scale) if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-3 * scale)
        for name in plain:
            torch.testing.assert_close(got[name], plain[name], **tol, msg=name)


def test_bf16_autocast_step_is_close_to_float32_and_grad_cache_still_equals_the_plain_step(tmp_path):
    """``precision="bf16"``: the towers run under bf16 autocast (the gradient differs from float32's, within
    bf16's precision; weights stay float32) and gradient caching replays the same autocast forward."""
    model = _two_towers(tmp_path).eval()
    q_in, p_in, pos = _batch(model, 6)
    loss32, _ = loss_and_backward(model, q_in, p_in, pos, Dist(), chunk=0)
    g32 = _grads(model)
    loss16, _ = loss_and_backward(model, q_in, p_in, pos, Dist(), chunk=0, precision="bf16")
    g16 = _grads(model)
    cached, _ = loss_and_backward(model, q_in, p_in, pos, Dist(), chunk=4, precision="bf16")
    gc = _grads(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert loss16 == pytest.approx(loss32, rel=0.05) and loss16 != loss32  # autocast did run in bf16
    assert cached == pytest.approx(loss16, rel=1e-3)

    def flat(g: dict) -> torch.Tensor:
        return torch.cat([g[n].flatten() for n in sorted(g32)])

    # both bf16 gradients (one graph, or cached in chunks of other padding widths) are bf16 approximations of float32's
    for got in (g16, gc):
        rel = float((flat(got) - flat(g32)).norm() / flat(g32).norm())
        assert 0 < rel < 0.05, rel
    with pytest.raises(DenseprError, match="--precision"):
        train(TrainConfig(train_file="x", output_dir=str(tmp_path / "r"), init="y", precision="fp16"), device="cpu", show_progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg_json: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(TrainConfig(**json.loads(cfg_json)), device="cpu", show_progress=False, log=lambda m: None)
    torch.distributed.destroy_process_group()


def _grad_step(model: BiEncoder, ids: list[int], d: Dist, chunk: int) -> tuple[float, dict[str, torch.Tensor]]:
    from densepr.train.distributed import sum_gradients
    from densepr.train.retriever import _params, build_batch

    cfg = TrainConfig(train_file="", output_dir="", init="", hard_negatives=1, random_negatives=1)
    qs, ps, pos = build_batch(load_examples_from(_records(12)), ids, 0, cfg)
    q_in = model.question.collate(model.question.tokenize_questions(qs))
    p_in = model.passage.collate(model.passage.tokenize_passages([p.title for p in ps], [p.text for p in ps]))
    loss, _ = loss_and_backward(model, q_in, p_in, torch.tensor(pos), d, chunk)
    sum_gradients(_params(model), d)
    return loss, {n: p.grad.detach().clone().contiguous() for n, p in model.named_parameters() if p.grad is not None}


def _grad_worker(rank: int, world: int, port: int, root: str, chunk: int) -> None:
    from safetensors.torch import save_file

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = BiEncoder(Encoder.load(Path(root) / "q", device="cpu"), Encoder.load(Path(root) / "p", device="cpu")).double().eval()
    loss, grads = _grad_step(model, [0, 1, 2, 3][2 * rank : 2 * rank + 2], Dist(rank, world), chunk)
    if rank == 0:
        save_file({**grads, "loss": torch.tensor(loss)}, f"{root}/multi.safetensors")
    # Both leave together: a process tearing down gloo while its peer is still busy can abort the peer.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("chunk", [0, 3])
def test_two_gloo_processes_give_the_single_process_gradient(tmp_path, chunk):
    """Each process holds 2 of the 4 questions; gathered embeddings + summed gradients = one process, 4 questions."""
    make_tiny_bert(tmp_path / "q", seed=1, pooling="mean")
    make_tiny_bert(tmp_path / "p", seed=2, pooling="cls")
    model = BiEncoder(Encoder.load(tmp_path / "q", device="cpu"), Encoder.load(tmp_path / "p", device="cpu")).double().eval()
    loss, grads = _grad_step(model, [0, 1, 2, 3], Dist(), chunk)
    torch.multiprocessing.spawn(_grad_worker, args=(2, _free_port(), str(tmp_path), chunk), nprocs=2, join=True)
    multi = load_file(str(tmp_path / "multi.safetensors"))
    assert float(multi.pop("loss")) == pytest.approx(loss, rel=1e-12)
    assert set(multi) == set(grads)
    scale = max(float(g.abs().max()) for g in grads.values())
    for name, g in grads.items():
        torch.testing.assert_close(multi[name], g, rtol=1e-9, atol=1e-12 * scale, msg=name)


def test_two_process_training_run_matches_one_process(tmp_path, train_file, no_dropout_bert):
    # adam_eps=1 makes Adam's step proportional to the gradient (lr * g / (|g| + 1)), so float
    # rounding is not magnified into whole steps as Adam does for near-zero gradients; the whole
    # pipeline (data slicing, gathering, summing, clipping, schedule) can then be compared tightly.
    base = dict(train_file=str(train_file), init=str(no_dropout_bert), batch_size=4, hard_negatives=1, random_negatives=1,
                epochs=1, max_steps=2, lr=0.1, adam_eps=1.0, warmup_steps=0, save_every=100, grad_cache_chunk=3)  # fmt: skip
    train(TrainConfig(output_dir=str(tmp_path / "one"), **base), device="cpu", show_progress=False)
    multi = TrainConfig(output_dir=str(tmp_path / "two"), **base)
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), json.dumps(vars(multi))), nprocs=2, join=True)
    one, two = _weights(tmp_path / "one" / "final"), _weights(tmp_path / "two" / "final")
    np.testing.assert_allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one"), rtol=1e-5)
    start = _weights_from_init(no_dropout_bert)
    moved = [float((one[k] - start[k.split(".", 1)[1]]).abs().max()) for k in one]
    assert np.median(moved) > 2e-5  # the two steps moved the weights far beyond the tolerance below
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-6, msg=k)


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return {f"{tower}.{k}": v for tower in ("question_encoder", "passage_encoder")
            for k, v in load_file(str(directory / tower / "model.safetensors")).items()}  # fmt: skip


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in line]


def _weights_from_init(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_resume_after_a_kill_ends_with_the_same_weights(tmp_path, train_file, tiny_bert):
    base = dict(train_file=str(train_file), init=str(tiny_bert), batch_size=4, hard_negatives=2, epochs=2, lr=1e-3,
                warmup_steps=2, save_every=2, grad_cache_chunk=3)  # fmt: skip  # 3 steps/epoch, dropout on
    train(TrainConfig(output_dir=str(tmp_path / "straight"), **base), device="cpu", show_progress=False)
    cfg = TrainConfig(output_dir=str(tmp_path / "killed"), **base)
    assert train(cfg, device="cpu", show_progress=False, stop_after=5) == {"stopped_at": 5}  # "killed" after step 5
    state = json.loads((tmp_path / "killed" / "checkpoint" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch"]) == (4, 1, 1)  # the step-4 checkpoint survives
    with pytest.raises(DenseprError, match="already holds a run"):
        train(cfg, device="cpu", show_progress=False)
    train(cfg, resume=True, device="cpu", show_progress=False)
    a, b = _weights(tmp_path / "straight" / "final"), _weights(tmp_path / "killed" / "final")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=k)
    assert _losses(tmp_path / "killed")[-2:] == _losses(tmp_path / "straight")[-2:]


def test_a_run_killed_before_its_first_checkpoint_starts_over_on_resume(tmp_path, train_file, tiny_bert):
    """A run killed before its first checkpoint left config.json and nothing to resume: --resume (what a rerun
    of a killed job passes) starts it over and ends as an uninterrupted run; a foreign or other run is still refused."""
    base = dict(train_file=str(train_file), init=str(tiny_bert), batch_size=4, hard_negatives=1, epochs=1, lr=1e-3, save_every=2)
    train(TrainConfig(output_dir=str(tmp_path / "straight"), **base), device="cpu", show_progress=False)
    cfg = TrainConfig(output_dir=str(tmp_path / "killed"), **base)
    assert train(cfg, device="cpu", show_progress=False, stop_after=1) == {"stopped_at": 1}  # before the step-2 checkpoint
    assert (tmp_path / "killed" / "config.json").is_file() and not (tmp_path / "killed" / "checkpoint").exists()
    with pytest.raises(DenseprError, match=r"different configuration \(lr\)"):
        train(TrainConfig(**{**vars(cfg), "lr": 0.5}), resume=True, device="cpu", show_progress=False)
    logged: list[str] = []
    train(cfg, resume=True, device="cpu", show_progress=False, log=logged.append)
    assert any("stopped before its first checkpoint; starting it over" in m for m in logged), logged
    a, b = _weights(tmp_path / "straight" / "final"), _weights(tmp_path / "killed" / "final")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=k)
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "straight")
    # a directory that is not a run of ours (here a model directory, with its own config.json) is never trained into
    with pytest.raises(DenseprError, match="not a 'training run' artefact densepr wrote"):
        train(TrainConfig(**{**vars(cfg), "output_dir": str(tiny_bert)}), resume=True, device="cpu", show_progress=False)
    assert not (tiny_bert / "metrics.jsonl").exists()


def test_resume_refuses_another_configuration_or_model(tmp_path, train_file, tiny_bert):
    cfg = TrainConfig(train_file=str(train_file), output_dir=str(tmp_path / "run"), init=str(tiny_bert), batch_size=4, epochs=1, max_steps=1)
    train(cfg, device="cpu", show_progress=False)
    changed = TrainConfig(**{**vars(cfg), "lr": 1e-3})
    with pytest.raises(DenseprError, match="different configuration .*lr"):
        train(changed, resume=True, device="cpu", show_progress=False)
    with pytest.raises(DenseprError, match="no checkpoint to resume"):
        train(TrainConfig(**{**vars(cfg), "output_dir": str(tmp_path / "empty")}), resume=True, device="cpu")
    # A checkpoint whose weights are not this model's: one clear error.
    bad = tmp_path / "run" / "checkpoint" / "question_encoder"
    make_tiny_bert(bad, hidden=64, pooling="cls")
    with pytest.raises(DenseprError, match="cannot load checkpoint|sha256 differs|manifest says"):  # refused by its manifest
        train(cfg, resume=True, device="cpu", show_progress=False)


def test_checkpoints_are_hugging_face_and_safe(tmp_path, train_file, tiny_bert):
    from transformers import AutoModel

    out = tmp_path / "run"
    dev = tmp_path / "dev.json"
    write_train_records(_records(6), dev)
    train(TrainConfig(train_file=str(train_file), dev_file=str(dev), output_dir=str(out), init=str(tiny_bert), batch_size=4,
                      epochs=1, save_every=1), device="cpu", show_progress=False)  # fmt: skip
    for d in (out / "checkpoint", out / "best"):
        AutoModel.from_pretrained(d / "question_encoder")
        enc = Encoder.load(d / "passage_encoder", device="cpu")
        assert enc.config == EncoderConfig("cls", False, 256)
    assert json.loads((out / "best" / "validation.json").read_text())["questions"] == 6
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {e["kind"] for e in entries} == {"train", "validation"}
    assert [e["step"] for e in entries if e["kind"] == "validation"] == [0, 3]  # before training, and after the epoch
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.old"))


def test_training_learns_the_tiny_task(tmp_path, train_file):
    # Mean pooling: a random 2-layer model's [CLS] vector is too poor a start for 30 steps.
    init = make_tiny_bert(tmp_path / "init", pooling="mean")
    dev = load_examples(train_file)[:6]
    cfg = TrainConfig(train_file=str(train_file), output_dir=str(tmp_path / "run"), init=str(init), batch_size=6,
                      hard_negatives=1, epochs=15, lr=1e-3, warmup_steps=0, save_every=1000)  # fmt: skip
    before = validate(BiEncoder(Encoder.load(init, device="cpu"), Encoder.load(init, device="cpu")), dev, hard=3)
    train(cfg, device="cpu", show_progress=False)
    after_model = BiEncoder(Encoder.load(tmp_path / "run" / "final" / "question_encoder", device="cpu"),
                            Encoder.load(tmp_path / "run" / "final" / "passage_encoder", device="cpu"))  # fmt: skip
    after = validate(after_model, dev, hard=3)
    losses = _losses(tmp_path / "run")
    assert np.mean(losses[-4:]) < 0.6 * np.mean(losses[:4])
    assert after["avg_rank"] < before["avg_rank"] and after["top1"] > before["top1"]


def test_bad_training_records(tmp_path, tiny_bert):
    recs = [r.to_json() for r in _records(8)]
    recs[3]["positive_ctxs"] = []
    path = tmp_path / "t.json"
    path.write_text(json.dumps(recs))
    cfg = TrainConfig(train_file=str(path), output_dir=str(tmp_path / "o"), init=str(tiny_bert), batch_size=4, epochs=1, max_steps=1)
    with pytest.raises(DenseprError, match="record 4: field 'positive_ctxs'"):
        train(cfg, device="cpu", show_progress=False)
    messages = []
    train(TrainConfig(**{**vars(cfg), "skip_bad": True}), device="cpu", show_progress=False, log=messages.append)
    assert any("skipped 1 invalid record" in m for m in messages)


def test_mining_positive_is_best_bm25_hit_and_negatives_have_no_answer(corpus, qa_tsv):
    qas = load_qa(qa_tsv)
    bm25 = BM25Index.build(corpus)
    stats = MiningStats()
    recs = list(mine([qas], corpus, bm25, depth=12, hard_negatives=3, random_negatives=2, stats=stats))
    res = bm25.search(qas.questions, 12)
    kept = {r.question for r in recs}
    for i, qa in enumerate(qas.items):
        first = next((int(r) for r in res.rows[i] if r >= 0 and has_answer(qa.answers, corpus.texts[r])), None)
        assert (qa.question in kept) == (first is not None)
    for r in recs:
        qa = next(q for q in qas.items if q.question == r.question)
        assert r.positive_ctxs[0].text == corpus.texts[next(int(x) for x in res.rows[qas.questions.index(r.question)] if x >= 0 and has_answer(qa.answers, corpus.texts[x]))]
        assert all(not has_answer(qa.answers, p.text) for p in r.hard_negative_ctxs + r.negative_ctxs)
        assert len(r.hard_negative_ctxs) <= 3 and len(r.negative_ctxs) <= 2
    assert stats.kept["qa.tsv"] == len(recs) and stats.kept["qa.tsv"] + stats.no_positive["qa.tsv"] == len(qas)
    assert stats.no_positive["qa.tsv"] >= 1  # "the capital of mars" has no answer anywhere


def test_holdout_split_is_disjoint_and_seeded(qa_tsv):
    qas = load_qa(qa_tsv)
    train_set, val = split_holdout(qas, 0.34, seed=3)
    assert len(val) == 2 and len(train_set) == 4
    assert {q.question for q in train_set.items}.isdisjoint(q.question for q in val.items)
    assert split_holdout(qas, 0.34, seed=3)[1].items == val.items
    assert isinstance(val, QASet) and val.name == "qa.tsv-heldout"


def test_length_sorted_chunks_round_trip(tiny_bert):
    enc = Encoder.load(tiny_bert, device="cpu")
    texts = ["a", "a much longer text about the great lakes and the ocean", "mid length text here", "b c"]
    batch = enc.collate(enc.tokenize_questions(texts))
    parts, inverse = chunks(batch, 3)
    assert [len(c["input_ids"]) for c in parts] == [3, 1]
    assert all(int(c["attention_mask"][:, -1].min()) == 1 for c in parts[1:]) and int(parts[0]["attention_mask"][0, -1]) == 1
    lengths = torch.cat([c["attention_mask"].sum(1) for c in parts])
    assert lengths.tolist() == sorted(lengths.tolist(), reverse=True)  # longest first
    assert lengths[inverse].tolist() == batch["attention_mask"].sum(1).tolist()  # inverse restores the order


def test_tensorboard_log_is_optional(tmp_path, train_file, tiny_bert):
    cfg = TrainConfig(train_file=str(train_file), output_dir=str(tmp_path / "tb"), init=str(tiny_bert), batch_size=4, epochs=1,
                      max_steps=1, tensorboard=True)  # fmt: skip
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(DenseprError, match="needs the tensorboard package"):
            train(cfg, device="cpu", show_progress=False)
        return
    train(cfg, device="cpu", show_progress=False)
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))
