"""One reader network for any encoder: MPNet (no token_type_ids) next to BERT/MiniLM and ``facebook/dpr-reader-*``
directories, which load and save as before; and the retriever side on MPNet (mean pooling, normalised)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from densepr.errors import DenseprError
from densepr.models.reader import Reader, ReaderConfig
from densepr.models.reader_model import HEADS_FILE, SpanReader
from densepr.train.reader import train_reader
from tests.models.test_reader import _cfg, _dpr_results
from tests.support.tiny import PASSAGES, QUESTIONS, make_tiny_bert, make_tiny_mpnet

SMALL = ReaderConfig(max_length=96, stride=16, max_answer_length=10, top_k=3)


@pytest.fixture(scope="module")
def mpnet_dir(tmp_path_factory):
    return make_tiny_mpnet(tmp_path_factory.mktemp("tiny-mpnet"), seed=5)


def _logits(reader: Reader, n: int = 3):
    q = reader.question_ids("who created python")
    texts = reader.tokenize_texts([x for _, x in PASSAGES[:n]])
    wins = [reader.windows(q, [], t, i)[0] for i, t in enumerate(texts)]
    inputs, _ = reader.collate(wins)
    with torch.no_grad():
        return [x.clone() for x in reader(**inputs)]


def test_an_mpnet_encoder_reads_saves_and_loads_back(tmp_path, mpnet_dir):
    reader = Reader.load(mpnet_dir, "cpu", SMALL)
    assert isinstance(reader.model, SpanReader) and reader.model.config.model_type == "mpnet"
    assert "token_type_ids" not in reader.tokenizer.model_input_names  # MPNet has none; the reader never passes them
    start, end, rel = _logits(reader)
    assert start.shape == end.shape and start.shape[0] == 3 and rel.shape == (3,)
    readings = reader.read([q for q, _ in QUESTIONS[:2]], [PASSAGES[:3], PASSAGES[3:5]])
    assert [len(r) for r in readings] == [3, 2] and all(r.has_span for rs in readings for r in rs)
    reader.save(tmp_path / "r")
    names = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert {"config.json", "model.safetensors", HEADS_FILE, "densepr_reader.json", "manifest.json", "tokenizer.json"} <= set(names)
    assert not [n for n in names if n.endswith((".bin", ".pt"))]
    again = Reader.load(tmp_path / "r", "cpu")
    for a, b in zip(_logits(reader), _logits(again)):
        # the trained heads come back (not new random ones); bitwise equality is not promised: a reloaded
        # tensor may sit at another alignment and take another SIMD path (seen once in CI: last-bit differences)
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
    assert again.fingerprint() == reader.fingerprint()


def test_mpnet_positions_and_foreign_heads_are_refused_clearly(tmp_path, mpnet_dir):
    # MPNet's positions start after the padding index: 130 embeddings hold windows of 128 tokens
    assert Reader.load(mpnet_dir, "cpu", ReaderConfig(max_length=128)).config.max_length == 128
    with pytest.raises(DenseprError, match="exceeds the model's 128 positions"):
        Reader.load(mpnet_dir, "cpu", ReaderConfig(max_length=130))
    reader = Reader.load(mpnet_dir, "cpu", SMALL)
    reader.save(tmp_path / "r")
    wide = make_tiny_mpnet(tmp_path / "wide", hidden=48)
    (wide / HEADS_FILE).write_bytes((tmp_path / "r" / HEADS_FILE).read_bytes())  # 32-wide heads on a 48-wide encoder
    with pytest.raises(DenseprError, match="heads do not fit this encoder"):
        Reader.load(wide, "cpu", SMALL)


def test_train_reader_from_mpnet_learns_and_resumes(tmp_path, mpnet_dir):
    train = _dpr_results(tmp_path / "r.json")
    kw = dict(epochs=12, batch_size=5, lr=1e-2)
    full = train_reader(_cfg(tmp_path / "a", train, mpnet_dir, **kw), device="cpu", show_progress=False)
    metrics = [json.loads(x) for x in (tmp_path / "a/run/metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if m["kind"] == "train"]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]) and full["questions"] == len(QUESTIONS)
    best = Reader.load(tmp_path / "a/run/best", "cpu")
    assert isinstance(best.model, SpanReader) and (tmp_path / "a/run/best" / HEADS_FILE).is_file()
    # killed after 4 steps, resumed: the same weights, heads included, as the run that was never stopped
    cfg = _cfg(tmp_path / "b", train, mpnet_dir, **kw)
    assert train_reader(cfg, device="cpu", show_progress=False, stop_after=4) == {"stopped_at": 4}
    train_reader(cfg, resume=True, device="cpu", show_progress=False)
    for name in ("model.safetensors", HEADS_FILE):
        a = load_file(str(tmp_path / "a/run/checkpoint/reader" / name))
        b = load_file(str(tmp_path / "b/run/checkpoint/reader" / name))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_bert_and_minilm_readers_keep_the_dpr_reader_layout(tmp_path):
    import transformers

    reader = Reader.load(make_tiny_bert(tmp_path / "bert", seed=3, dropout=0.0), "cpu", SMALL)
    assert isinstance(reader.model, transformers.DPRReader)
    reader.save(tmp_path / "r")
    assert json.loads((tmp_path / "r/config.json").read_text())["architectures"] == ["DPRReader"]
    keys = load_file(str(tmp_path / "r/model.safetensors")).keys()
    assert all(k.startswith("span_predictor.") for k in keys) and "span_predictor.qa_classifier.weight" in keys
    assert not (tmp_path / "r" / HEADS_FILE).exists()
    again = Reader.load(tmp_path / "r", "cpu")
    for a, b in zip(_logits(reader), _logits(again)):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)  # the same outputs (to the last bits: see above)
    assert again.fingerprint() == reader.fingerprint()  # and bit for bit the same weights


def test_a_dpr_reader_checkpoint_loads_as_transformers_reads_it(tmp_path):
    """A ``facebook/dpr-reader-*``-style directory (transformers' DPRReader, saved by transformers) is read unchanged."""
    import transformers

    from tests.support.tiny import _vocab

    tok = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(dict.fromkeys(_vocab()))}, do_lower_case=True)
    torch.manual_seed(7)
    cfg = transformers.DPRConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    hf = transformers.DPRReader(cfg).eval()
    hf.save_pretrained(tmp_path / "dpr", safe_serialization=True)
    tok.save_pretrained(tmp_path / "dpr")
    reader = Reader.load(tmp_path / "dpr", "cpu", SMALL)
    assert isinstance(reader.model, transformers.DPRReader)
    q = reader.question_ids("who created python")
    inputs, _ = reader.collate([reader.windows(q, [], reader.tokenize_texts([PASSAGES[7][1]])[0], 0)[0]])
    with torch.no_grad():
        want = hf(**inputs)
    start, end, rel = reader(**inputs)
    assert torch.equal(start, want.start_logits) and torch.equal(end, want.end_logits) and torch.equal(rel, want.relevance_logits)
    reader.save(tmp_path / "again")
    assert isinstance(transformers.DPRReader.from_pretrained(tmp_path / "again"), transformers.DPRReader)


def test_mpnet_retriever_mean_pools_normalises_and_encodes_from_the_cli(tmp_path, mpnet_dir, passages_tsv, capsys):
    from densepr.models.encoder import Encoder
    from tests.support.cli import run

    enc = Encoder.load(mpnet_dir, device="cpu")
    assert (enc.config.pooling, enc.config.normalize, enc.config.max_length) == ("mean", True, 128)  # from its sentence-transformers files
    titles, texts = [t for t, _ in PASSAGES[:4]], [x for _, x in PASSAGES[:4]]
    vec = enc.encode_passages(titles, texts, batch_size=2)
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-5)
    ids = enc.tokenize_passages(titles[:1], texts[:1])
    with torch.no_grad():
        h = enc.model(input_ids=torch.tensor(ids)).last_hidden_state[0]
    want = h.mean(0) / h.mean(0).norm()  # sentence-transformers: masked mean, then Normalize
    np.testing.assert_allclose(vec[0], want.numpy(), atol=1e-5)
    code, _, err = run(capsys, "encode", str(passages_tsv), str(tmp_path / "emb"), "--encoder", str(mpnet_dir), "--device", "cpu")
    assert code == 0, err
    code, _, err = run(capsys, "index", "dense", str(tmp_path / "emb"), str(tmp_path / "dense"))
    assert code == 0, err


def test_mpnet_question_encoder_and_reader_export_to_onnx(tmp_path, mpnet_dir, capsys):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'densepr[onnx]')")
    from densepr.models.encoder import Encoder
    from densepr.models.onnx import OnnxQuestionEncoder
    from tests.support.cli import run

    code, _, err = run(capsys, "export-onnx", str(mpnet_dir), str(tmp_path / "q"))
    assert code == 0, err
    questions = [q for q, _ in QUESTIONS]
    want = Encoder.load(mpnet_dir, device="cpu").encode_questions(questions, 4)
    np.testing.assert_allclose(OnnxQuestionEncoder(tmp_path / "q").encode_questions(questions, 4), want, atol=1e-5)
    Reader.load(mpnet_dir, "cpu", SMALL).save(tmp_path / "r")
    code, out, err = run(capsys, "export-onnx", str(tmp_path / "r"), str(tmp_path / "ro"))
    assert code == 0 and "reader exported" in out, err
    for a, b in zip(_logits(Reader.load(tmp_path / "r", "cpu")), _logits(Reader.load(tmp_path / "ro"))):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)
    code, _, err = run(capsys, "export-onnx", str(tmp_path / "ro"), str(tmp_path / "again"))  # an export is not exported again
    assert code == 1 and "not a Hugging Face model directory" in err and "Traceback" not in err
