"""Encoders and readers other tools reproduce exactly, through those tools' own loaders (issue 36, item 1):
sentence-transformers' ``SentenceTransformer(dir)`` on every saved encoder, and transformers' DPR classes on
``densepr export-model --format dpr``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from densepr.errors import DenseprError
from densepr.models.encoder import BiEncoder, Encoder, EncoderConfig
from densepr.models.export_dpr import export_dpr_encoders, export_dpr_reader
from densepr.models.st_files import passage_text
from tests.support.cli import run
from tests.support.tiny import PASSAGES, QUESTIONS, make_tiny_bert

st = pytest.importorskip("sentence_transformers", reason="sentence-transformers not installed (pip install -e .[compare])")
transformers = pytest.importorskip("transformers")

QS = [q for q, _ in QUESTIONS]
TITLES = [t for t, _ in PASSAGES]
LONG = [" ".join([x] * 4) for _, x in PASSAGES]  # past max_length: truncation must agree too


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("bert"), seed=5, dropout=0.0)


def _saved(src: Path, out: Path, pooling: str = "cls", normalize: bool = False, max_length: int = 64) -> Path:
    Encoder.load(src, EncoderConfig(pooling, normalize, max_length), device="cpu").save(out)
    return out


# -- sentence-transformers -----------------------------------------------------------------------
def _st_equals_densepr(path: Path, titles=TITLES, texts=LONG, qs=QS) -> None:
    enc = Encoder.load(path, device="cpu")
    model = st.SentenceTransformer(str(path), device="cpu")
    assert model.max_seq_length == enc.config.max_length
    np.testing.assert_allclose(model.encode(qs), enc.encode_questions(qs), atol=1e-5, rtol=1e-4)
    ours = enc.encode_passages(titles, texts)
    if enc.tokenizer.sep_token == "[SEP]":  # BERT's, as the docs write it
        np.testing.assert_allclose(model.encode([f"{t} [SEP] {x}" for t, x in zip(titles, texts)]), ours, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(model.encode([passage_text(enc.tokenizer, t, x) for t, x in zip(titles, texts)]), ours, atol=1e-5, rtol=1e-4)
    # DPR scores by dot product: sentence-transformers' similarity must be the same number
    want = "cosine" if enc.config.normalize else "dot"
    assert model.similarity_fn_name == want
    np.testing.assert_allclose(model.similarity(model.encode(qs[:2]), model.encode([passage_text(enc.tokenizer, "a", "b")])).numpy(),
                               enc.encode_questions(qs[:2]) @ enc.encode_passages(["a"], ["b"]).T, rtol=1e-4, atol=1e-4)  # fmt: skip


@pytest.mark.parametrize("pooling,normalize", [("cls", False), ("mean", True), ("mean", False), ("cls", True)])
def test_sentence_transformers_reproduces_saved_encoder(bert, tmp_path, pooling, normalize):
    path = _saved(bert, tmp_path / "enc", pooling, normalize)
    modules = json.loads((path / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", *(["2_Normalize"] if normalize else [])]
    assert json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"] == 64
    _st_equals_densepr(path)


def test_resaved_encoder_has_only_its_own_sentence_transformers_modules(bert, tmp_path):
    path = _saved(bert, tmp_path / "enc", "mean", True)
    Encoder.load(path, EncoderConfig("cls", False, 48), device="cpu").save(path)  # saved over, other settings
    assert not (path / "2_Normalize").exists()
    _st_equals_densepr(path)


def test_trained_towers_carry_sentence_transformers_files(tmp_path):
    from densepr.train.retriever import save_encoders

    q = Encoder.load(make_tiny_bert(tmp_path / "q", seed=1, dropout=0.0), EncoderConfig("cls", False, 256), device="cpu")
    p = Encoder.load(make_tiny_bert(tmp_path / "p", seed=2, dropout=0.0), EncoderConfig("cls", False, 256), device="cpu")
    save_encoders(BiEncoder(q, p), tmp_path / "best")
    for tower in ("question_encoder", "passage_encoder"):
        assert json.loads((tmp_path / "best" / tower / "sentence_bert_config.json").read_text())["max_seq_length"] == 256
        _st_equals_densepr(tmp_path / "best" / tower, texts=[x for _, x in PASSAGES])


def test_passage_string_is_densepr_pair_input(bert, tmp_path):
    enc = Encoder.load(_saved(bert, tmp_path / "enc"), device="cpu")
    model = st.SentenceTransformer(str(tmp_path / "enc"), device="cpu")
    for title, text in [("Python", "Python is a language"), ("", "no title at all"), (TITLES[0], LONG[0])]:
        feats = model.preprocess([f"{title} [SEP] {text}"])
        ids = feats["input_ids"][0][feats["attention_mask"][0].bool()].tolist()
        assert ids == enc.tokenize_passages([title], [text])[0]
        assert not feats["token_type_ids"].any()  # densepr feeds token_type_ids 0 too


@pytest.mark.model
def test_sentence_transformers_reproduces_saved_minilm(embedded, tmp_path):
    enc = Encoder.load(embedded.model_dir, device="cpu")
    enc.save(tmp_path / "minilm")
    assert json.loads((tmp_path / "minilm" / "sentence_bert_config.json").read_text())["max_seq_length"] == 256
    _st_equals_densepr(tmp_path / "minilm", texts=[" ".join([x] * 12) for _, x in PASSAGES])


# -- transformers' DPR classes ---------------------------------------------------------------------
def _load(cls_name: str, path: Path):
    model, info = getattr(transformers, cls_name).from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _dpr_vectors(model, tokenizer, *texts) -> np.ndarray:
    batch = tokenizer(*texts, padding=True, truncation=True, max_length=64, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        return model(**batch).pooler_output.numpy()


def test_dpr_encoders_from_a_biencoder_checkpoint(tmp_path):
    ckpt = tmp_path / "best"
    _saved(make_tiny_bert(tmp_path / "q", seed=1, dropout=0.0), ckpt / "question_encoder")
    _saved(make_tiny_bert(tmp_path / "p", seed=2, dropout=0.0), ckpt / "passage_encoder")
    export_dpr_encoders(ckpt, tmp_path / "dpr")
    q_enc, p_enc = Encoder.load(ckpt / "question_encoder", device="cpu"), Encoder.load(ckpt / "passage_encoder", device="cpu")
    q = _load("DPRQuestionEncoder", tmp_path / "dpr" / "question_encoder")
    c = _load("DPRContextEncoder", tmp_path / "dpr" / "ctx_encoder")
    q_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "dpr" / "question_encoder")
    c_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "dpr" / "ctx_encoder")
    assert type(q_tok).__name__.startswith("DPRQuestionEncoderTokenizer") and type(c_tok).__name__.startswith("DPRContextEncoderTokenizer")
    np.testing.assert_allclose(_dpr_vectors(q, q_tok, QS), q_enc.encode_questions(QS), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(_dpr_vectors(c, c_tok, TITLES, LONG), p_enc.encode_passages(TITLES, LONG), atol=1e-5, rtol=1e-4)


def test_dpr_checkpoint_round_trips(bert, tmp_path):
    """A DPR checkpoint densepr trained on (model type ``dpr``, one class for both towers) exports to the right classes."""
    export_dpr_encoders(_saved(bert, tmp_path / "enc"), tmp_path / "dpr1")
    enc = Encoder.load(tmp_path / "dpr1" / "question_encoder", device="cpu")
    enc.save(tmp_path / "trained")  # a DPRQuestionEncoder used as both towers
    assert not (tmp_path / "trained" / "modules.json").exists()  # its vector is pooler_output, which ST does not read
    export_dpr_encoders(tmp_path / "trained", tmp_path / "dpr2")
    c = _load("DPRContextEncoder", tmp_path / "dpr2" / "ctx_encoder")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "dpr2" / "ctx_encoder")
    np.testing.assert_allclose(_dpr_vectors(c, tok, TITLES, LONG), enc.encode_passages(TITLES, LONG), atol=1e-5, rtol=1e-4)


def test_dpr_reader(bert, tmp_path):
    from densepr.models.reader import Reader, ReaderConfig

    Reader.load(bert, "cpu", ReaderConfig(max_length=64)).save(tmp_path / "reader")
    reader = Reader.load(tmp_path / "reader", "cpu")
    export_dpr_reader(tmp_path / "reader", tmp_path / "dpr")
    model = _load("DPRReader", tmp_path / "dpr")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "dpr")
    assert type(tok).__name__.startswith("DPRReaderTokenizer")
    q, (title, text) = QS[4], PASSAGES[7]
    window = reader.windows(reader.question_ids(q), reader.tokenize_texts([title])[0].ids, reader.tokenize_texts([text])[0], 0)[0]
    theirs = tok(questions=q, titles=title, texts=text, return_tensors="pt")
    assert theirs["input_ids"][0].tolist() == window.ids  # DPRReaderTokenizer's layout is the reader's
    inputs, _ = reader.collate([window])
    with torch.no_grad():
        ours, got = reader(**inputs), model(input_ids=theirs["input_ids"], attention_mask=theirs["attention_mask"])
    for a, b in zip(ours, (got.start_logits, got.end_logits, got.relevance_logits)):
        np.testing.assert_allclose(b.numpy(), a.numpy(), atol=1e-5, rtol=1e-4)


# -- refusals and bad input --------------------------------------------------------------------------
def _tiny_mpnet(path: Path, pooling: str = "cls", normalize: bool = False) -> Path:
    """A random 1-layer MPNet with an MPNet tokenizer (pairs joined by ``</s></s>``)."""
    from transformers import MPNetConfig, MPNetModel, MPNetTokenizerFast

    from tests.support.tiny import _vocab

    tok = MPNetTokenizerFast(vocab={w: i for i, w in enumerate(dict.fromkeys(["<s>", "<pad>", "</s>", "<unk>", "<mask>", *_vocab()]))})
    torch.manual_seed(0)
    cfg = MPNetConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                      max_position_embeddings=130, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    MPNetModel(cfg).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    (path / "densepr_encoder.json").write_text(json.dumps({"pooling": pooling, "normalize": normalize, "max_length": 64}))
    return path


def test_sentence_transformers_reproduces_saved_mpnet(tmp_path):
    """Another pair template: MPNet joins title and text with ``</s></s>``, which :func:`passage_text` writes."""
    src = _tiny_mpnet(tmp_path / "src", "mean", True)
    Encoder.load(src, device="cpu").save(tmp_path / "enc")
    assert passage_text(Encoder.load(tmp_path / "enc", device="cpu").tokenizer, "T", "x") == "T </s></s> x"
    _st_equals_densepr(tmp_path / "enc")


@pytest.mark.parametrize("case,needle", [("mean", "mean pooling"), ("normalised", "L2-normalises"), ("mpnet", "'mpnet'")])
def test_dpr_export_refuses_what_dpr_cannot_compute(bert, tmp_path, capsys, case, needle):
    src = {"mean": lambda: _saved(bert, tmp_path / "enc", "mean"), "normalised": lambda: _saved(bert, tmp_path / "enc", "cls", True),
           "mpnet": lambda: _tiny_mpnet(tmp_path / "enc")}[case]()  # fmt: skip
    code, out, err = run(capsys, "export-model", str(src), str(tmp_path / "dpr"), "--format", "dpr")
    assert code == 1 and needle in err and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "dpr").exists() and not any(p.name.startswith(".dpr") for p in tmp_path.iterdir())


def test_export_model_cli_and_bad_inputs(bert, tmp_path, capsys):
    enc = _saved(bert, tmp_path / "enc")
    code, out, err = run(capsys, "export-model", str(enc), str(tmp_path / "dpr"))
    assert code == 0 and "question_encoder" in out and "ctx_encoder" in out
    _load("DPRQuestionEncoder", tmp_path / "dpr" / "question_encoder")
    before = sorted(p.relative_to(tmp_path / "dpr") for p in (tmp_path / "dpr").rglob("*"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    for args, needle in [
        ((str(enc), str(tmp_path / "dpr")), "already exists"),  # never replaced, even by the same export
        ((str(tmp_path / "notes"), str(tmp_path / "x")), "not a model directory (no config.json)"),
        ((str(tmp_path / "missing"), str(tmp_path / "x")), "no such directory"),
        ((str(enc), str(tmp_path / "x"), "--format", "onnx"), "--format 'onnx'"),
        ((str(enc), str(enc)), "is also an input"),
    ]:
        code, out, err = run(capsys, "export-model", *args)
        assert code == 1 and needle in err and len(err.strip().splitlines()) == 1, (args, err)
    assert sorted(p.relative_to(tmp_path / "dpr") for p in (tmp_path / "dpr").rglob("*")) == before
    assert not (tmp_path / "x").exists()


def test_reader_and_encoder_are_not_mixed_up(bert, tmp_path):
    from densepr.models.reader import Reader, ReaderConfig

    Reader.load(bert, "cpu", ReaderConfig(max_length=64)).save(tmp_path / "reader")
    with pytest.raises(DenseprError, match="a reader, not an encoder"):
        export_dpr_encoders(tmp_path / "reader", tmp_path / "out")
    with pytest.raises(DenseprError, match="an encoder, not a trained reader"):
        export_dpr_reader(_saved(bert, tmp_path / "enc"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failed_export_leaves_nothing(bert, tmp_path, monkeypatch):
    import densepr.models.export_dpr as export_dpr

    calls = []
    real = export_dpr._write

    def second_fails(*a):
        calls.append(a)
        real(*a)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_dpr, "_write", second_fails)
    with pytest.raises(DenseprError):
        export_dpr_encoders(_saved(bert, tmp_path / "enc"), tmp_path / "dpr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc"]
