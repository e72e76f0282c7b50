"""Two-tower inputs from other tools: separate question/passage encoders, DPR's context encoder kept off
questions, Haystack's and Tevatron's folders, pytorch_model.bin checkpoints (tensors only) and
Tevatron's JSON-lines training data."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from densepr.errors import DenseprError, InputError
from densepr.fileio import MANIFEST, read_json
from densepr.models.encoder import Encoder, load_biencoder
from tests.support.cli import run
from tests.support.tiny import PASSAGES, make_tiny_bert

Q = ["who created python", "when did apollo 11 land on the moon"]


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("vocab"), pooling="cls")


def tiny_dpr(path: Path, arch: str, vocab_dir: Path, seed: int = 0, bin_only: bool = False, tokenizer: bool = True) -> Path:
    """A random DPRQuestionEncoder / DPRContextEncoder with the tiny BERT's tokenizer."""
    import transformers
    from transformers import DPRConfig

    tok = transformers.AutoTokenizer.from_pretrained(vocab_dir)
    cfg = DPRConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(cfg).eval()
    model.save_pretrained(path)
    if bin_only:  # as older checkpoints (and Haystack's) ship
        (path / "model.safetensors").unlink()
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    if tokenizer:
        tok.save_pretrained(path)
    return path


def bert_bin_only(src: Path, dst: Path) -> Path:
    """A copy of a tiny BERT whose weights are only a pytorch_model.bin."""
    from transformers import BertModel

    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    torch.save(BertModel.from_pretrained(src).state_dict(), dst / "pytorch_model.bin")
    return dst


# -- DPR's context encoder never encodes questions ------------------------------------------------


def test_encode_refuses_a_context_encoder_alone(tmp_path, capsys, passages_tsv, vocab_dir):
    ctx = tiny_dpr(tmp_path / "ctx", "DPRContextEncoder", vocab_dir)
    code, _, err = run(capsys, "encode", str(passages_tsv), str(tmp_path / "emb"), "--encoder", str(ctx), "--device", "cpu")
    assert code == 1 and "DPRContextEncoder encodes passages only" in err and "--question-encoder" in err
    assert not (tmp_path / "emb" / MANIFEST).exists()
    with pytest.raises(DenseprError, match="DPRContextEncoder"):
        load_biencoder(ctx, device="cpu")


def test_encode_with_two_towers_records_the_question_tower(tmp_path, capsys, passages_tsv, qa_tsv, vocab_dir, corpus):
    ctx = tiny_dpr(tmp_path / "ctx", "DPRContextEncoder", vocab_dir, seed=1)
    qenc = tiny_dpr(tmp_path / "q", "DPRQuestionEncoder", vocab_dir, seed=2)
    idx = tmp_path / "index"
    idx.mkdir()
    shutil.copyfile(passages_tsv, idx / "passages.tsv")
    code, _, err = run(capsys, "encode", str(passages_tsv), str(tmp_path / "emb"), "--encoder", str(ctx), "--question-encoder", str(qenc),
                       "--device", "cpu")  # fmt: skip
    assert code == 0, err
    m = read_json(tmp_path / "emb" / MANIFEST)
    assert m["question_encoder"] == str(qenc.resolve()) and m["encoder"]["path"] == str(ctx.resolve())
    # the passages were encoded by the context encoder
    from densepr.index.embeddings import Embeddings

    vecs = np.concatenate([v for _, v in Embeddings.open(tmp_path / "emb").parts()])
    want = Encoder.load(ctx, device="cpu").encode_passages(corpus.titles, corpus.texts)
    np.testing.assert_allclose(vecs, want, rtol=1e-4, atol=1e-5)
    assert run(capsys, "index", "dense", str(tmp_path / "emb"), str(idx / "dense"))[0] == 0
    from densepr.retrieve.retriever import Retriever

    r = Retriever.load(idx, device="cpu")
    assert type(r.question_encoder.model).__name__ == "DPRQuestionEncoder" and r.question_encoder.name == str(qenc.resolve())
    # --passage-encoder + --question-encoder, without --encoder: the same
    code, _, err = run(capsys, "encode", str(passages_tsv), str(tmp_path / "emb2"), "--passage-encoder", str(ctx),
                       "--question-encoder", str(qenc), "--device", "cpu")  # fmt: skip
    assert code == 0, err
    assert read_json(tmp_path / "emb2" / MANIFEST)["question_encoder"] == str(qenc.resolve())


def test_index_dense_question_encoder_replaces_the_recorded_one(tmp_path, capsys, passages_tsv, vocab_dir, tiny_bert):
    other = make_tiny_bert(tmp_path / "other", seed=3, pooling="cls")
    assert run(capsys, "encode", str(passages_tsv), str(tmp_path / "emb"), "--encoder", str(tiny_bert), "--device", "cpu")[0] == 0
    code, _, err = run(capsys, "index", "dense", str(tmp_path / "emb"), str(tmp_path / "dense"), "--question-encoder", str(other))
    assert code == 0, err
    m = read_json(tmp_path / "dense" / MANIFEST)
    assert m["question_encoder"] == str(other.resolve())
    assert m["question_encoder_info"]["weights_id"] != m["encoder"]["weights_id"]
    ctx = tiny_dpr(tmp_path / "ctx", "DPRContextEncoder", vocab_dir)
    code, _, err = run(capsys, "index", "dense", str(tmp_path / "emb"), str(tmp_path / "dense2"), "--question-encoder", str(ctx))
    assert code == 1 and "DPRContextEncoder encodes passages only" in err


def test_retrieve_refuses_a_context_encoder_given_for_questions(index_dir, tmp_path, vocab_dir):
    from densepr.retrieve.retriever import Retriever

    ctx = tiny_dpr(tmp_path / "ctx", "DPRContextEncoder", vocab_dir)
    with pytest.raises(DenseprError, match="DPRContextEncoder encodes passages only"):
        Retriever.load(index_dir, question_encoder=str(ctx), device="cpu")


# -- other tools' folder layouts ---------------------------------------------------------------------


def test_haystack_folders_with_pytorch_model_bin(tmp_path, capsys, passages_tsv, vocab_dir):
    ckpt = tmp_path / "haystack-dpr"  # DensePassageRetriever.save: query_encoder/ + passage_encoder/
    qd = tiny_dpr(ckpt / "query_encoder", "DPRQuestionEncoder", vocab_dir, seed=4, bin_only=True)
    pd = tiny_dpr(ckpt / "passage_encoder", "DPRContextEncoder", vocab_dir, seed=5, bin_only=True)
    q, p = load_biencoder(ckpt, device="cpu")
    assert type(q.model).__name__ == "DPRQuestionEncoder" and type(p.model).__name__ == "DPRContextEncoder"
    import transformers

    ref = transformers.DPRQuestionEncoder.from_pretrained(qd, use_safetensors=False, trust_remote_code=False).eval()
    batch = q.tokenizer(Q, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output.numpy()
    np.testing.assert_allclose(q.encode_questions(Q), want, rtol=1e-4, atol=1e-5)
    code, _, err = run(capsys, "encode", str(passages_tsv), str(tmp_path / "emb"), "--encoder", str(ckpt), "--device", "cpu")
    assert code == 0, err
    m = read_json(tmp_path / "emb" / MANIFEST)
    assert m["question_encoder"] == str(qd.resolve()) and m["encoder"]["path"] == str(pd.resolve())


def test_tevatron_folders_with_the_tokenizer_beside_them(tmp_path, vocab_dir):
    import transformers

    ckpt = tmp_path / "tevatron"  # untied encoders: query_model/ + passage_model/, tokenizer at the top
    make_tiny_bert(ckpt / "query_model", seed=6)
    make_tiny_bert(ckpt / "passage_model", seed=7)
    transformers.AutoTokenizer.from_pretrained(ckpt / "query_model").save_pretrained(ckpt)
    for d in ("query_model", "passage_model"):
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (ckpt / d / f).unlink()
    q, p = load_biencoder(ckpt, device="cpu")
    assert q.name == str((ckpt / "query_model").resolve()) and p.name == str((ckpt / "passage_model").resolve())
    assert q.config.pooling == "cls"  # Tevatron's DPR: the [CLS] vector
    assert not np.allclose(q.encode_questions(Q), p.encode_questions(Q))
    (ckpt / "pooler.pt").write_bytes(b"")  # a trained linear pooler densepr does not apply: refused, not ignored
    with pytest.raises(DenseprError, match="pooler"):
        load_biencoder(ckpt, device="cpu")
    tied = make_tiny_bert(tmp_path / "tied", seed=8)  # Tevatron's tied encoder: one folder, its pooler inside
    (tied / "pooler.pt").write_bytes(b"")
    with pytest.raises(DenseprError, match="pooler"):
        load_biencoder(tied, device="cpu")


# -- pytorch_model.bin: tensors only ----------------------------------------------------------------


def test_pytorch_model_bin_loads_with_the_same_vectors(tmp_path, tiny_bert):
    binned = bert_bin_only(tiny_bert, tmp_path / "bin")
    assert not list(binned.glob("*.safetensors"))
    a, b = Encoder.load(tiny_bert, device="cpu"), Encoder.load(binned, device="cpu")
    np.testing.assert_array_equal(a.encode_questions(Q), b.encode_questions(Q))
    t, x = zip(*PASSAGES[:3])
    np.testing.assert_array_equal(a.encode_passages(t, x), b.encode_passages(t, x))



def test_pytorch_model_bin_checkpoints_get_their_own_weights_id(tmp_path, tiny_bert):
    """A .bin-only checkpoint is identified by its .bin files (not the empty hash every such checkpoint would
    share), so a moved index refuses another .bin checkpoint; a safetensors checkpoint's id is unchanged."""
    from densepr.index.embeddings import weights_id

    binned = bert_bin_only(tiny_bert, tmp_path / "bin")
    other = tmp_path / "other"
    shutil.copytree(binned, other)
    state = torch.load(other / "pytorch_model.bin", weights_only=True)
    next(iter(state.values())).add_(1.0)
    torch.save(state, other / "pytorch_model.bin")
    empty = weights_id(tmp_path / "nothing-here")
    assert len({weights_id(binned), weights_id(other), empty}) == 3
    assert weights_id(binned) == weights_id(binned)
    assert weights_id(tiny_bert) != empty

class _Payload:
    """An object whose unpickling runs code (what a malicious checkpoint ships)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_in_pytorch_model_bin_is_refused_and_never_runs(tmp_path, tiny_bert):
    binned = bert_bin_only(tiny_bert, tmp_path / "bin")
    state = torch.load(binned / "pytorch_model.bin", weights_only=True)
    marker = tmp_path / "payload-ran"
    torch.save({**state, "extra": _Payload(marker)}, binned / "pytorch_model.bin")
    with pytest.raises(DenseprError, match="holds Python objects besides tensors"):
        Encoder.load(binned, device="cpu")
    assert not marker.exists()


# -- Tevatron's JSON-lines training data --------------------------------------------------------------


def _tevatron_line(i: int, **extra) -> str:
    (t1, x1), (t2, x2) = PASSAGES[i % 12], PASSAGES[(i + 5) % 12]
    return json.dumps({"query_id": str(i), "query": f"question about {t1.lower()}",
                       "positive_passages": [{"docid": f"d{i}", "title": t1, "text": x1}],
                       "negative_passages": [{"docid": f"n{i}", "title": t2, "text": x2}], **extra}) + "\n"  # fmt: skip


def test_tevatron_jsonl_training_records(tmp_path):
    from densepr.data.training import iter_train_records

    path = tmp_path / "train.jsonl"
    path.write_text("".join(_tevatron_line(i) for i in range(4)), encoding="utf-8")
    recs = list(iter_train_records(path))
    assert len(recs) == 4 and recs[0].question == "question about wilhelm röntgen"
    assert recs[0].positive_ctxs[0].id == "d0" and recs[0].positive_ctxs[0].title == "Wilhelm Röntgen"
    assert [p.id for p in recs[0].hard_negative_ctxs] == ["n0"] and recs[0].negative_ctxs == []
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_tevatron_line(0) + json.dumps({"query_id": "1", "query": "x", "positive_passages": [{"docid": "a", "text": ""}]}) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl, line 2: field 'text'"):
        list(iter_train_records(bad))
    stats: dict = {}
    assert len(list(iter_train_records(bad, skip_bad=True, stats=stats))) == 1 and stats["skipped"] == 1


def test_densepr_train_reads_tevatron_jsonl(tmp_path, capsys, tiny_bert):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(_tevatron_line(i) for i in range(8)), encoding="utf-8")
    code, out, err = run(capsys, "train", "--train", str(path), "-o", str(tmp_path / "run"), "--init", str(tiny_bert),
                         "--batch-size", "4", "--epochs", "1", "--max-steps", "1", "--device", "cpu")  # fmt: skip
    assert code == 0, err
    assert "trained 1 steps" in out and (tmp_path / "run" / "final" / "question_encoder" / "config.json").is_file()
