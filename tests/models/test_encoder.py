"""The dual encoder: DPR's passage input, pooling settings, batching, DPR checkpoints, loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from densepr.errors import DenseprError
from densepr.models.encoder import BiEncoder, Encoder, EncoderConfig, load_biencoder
from tests.support.tiny import PASSAGES, make_tiny_bert


def test_config_precedence(tmp_path, tiny_bert):
    assert EncoderConfig.from_dir(tiny_bert).pooling == "cls"  # densepr_encoder.json
    st_dir = tmp_path / "st"
    (st_dir / "1_Pooling").mkdir(parents=True)
    (st_dir / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}))
    (st_dir / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.Normalize"}]))
    (st_dir / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
    assert EncoderConfig.from_dir(st_dir) == EncoderConfig("mean", True, 128)  # sentence-transformers' files
    assert EncoderConfig.from_dir(tmp_path) == EncoderConfig("cls", False, 256)  # DPR's default
    with pytest.raises(DenseprError, match="pooling must be one of"):
        EncoderConfig("max")


def test_passage_is_title_sep_text_with_zero_segments(tiny_bert):
    enc = Encoder.load(tiny_bert, device="cpu")
    title, text = PASSAGES[0]
    (ids,) = enc.tokenize_passages([title], [text])
    tok = enc.tokenizer
    sep = ids.index(tok.sep_token_id)
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.decode(ids[1:sep]) == tok.decode(tok(title, add_special_tokens=False)["input_ids"])
    vec = enc.encode_passages([title], [text])[0]
    with torch.no_grad():
        x = torch.tensor([ids])
        zero = enc.model(input_ids=x, attention_mask=torch.ones_like(x), token_type_ids=torch.zeros_like(x)).last_hidden_state[0, 0]
        pair = tok(title, text, return_tensors="pt")  # segment ids 1 for the text: not what DPR feeds
        segs = enc.model(**pair).last_hidden_state[0, 0]
    np.testing.assert_allclose(vec, zero.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(vec, segs.numpy(), atol=1e-4)


def test_length_sorted_batches_return_input_order(tiny_bert):
    enc = Encoder.load(tiny_bert, device="cpu")
    titles, texts = [t for t, _ in PASSAGES], [x for _, x in PASSAGES]
    batched = enc.encode_passages(titles, texts, batch_size=5)
    single = np.stack([enc.encode_passages([t], [x], batch_size=1)[0] for t, x in zip(titles, texts)])
    np.testing.assert_allclose(batched, single, rtol=1e-4, atol=1e-5)
    seen = []
    enc.encode_questions(["a b c", "a", "a b"], batch_size=2, progress=seen.append)
    assert seen == [2, 1]


def test_mean_pooling_and_normalisation(tmp_path):
    path = make_tiny_bert(tmp_path / "mean", seed=1, pooling="mean", normalize=True)
    enc = Encoder.load(path, device="cpu")
    qs = ["who created python", "a much longer question about the eiffel tower in paris"]
    vecs = enc.encode_questions(qs)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    batch = enc.tokenizer(qs, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = enc.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    mean = (h * m).sum(1) / m.sum(1)
    np.testing.assert_allclose(vecs, torch.nn.functional.normalize(mean, dim=-1).numpy(), rtol=1e-4, atol=1e-5)


SMALL_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]


def _tiny_dpr(path, arch: str, weights_from: str | None = None, vocab: list[str] = SMALL_VOCAB):
    """A random DPR checkpoint (config, safetensors, WordPiece vocab), optionally mislabelled."""
    from transformers import DPRConfig, DPRContextEncoder, DPRQuestionEncoder

    cfg = DPRConfig(vocab_size=len(SMALL_VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    cls = {"DPRContextEncoder": DPRContextEncoder, "DPRQuestionEncoder": DPRQuestionEncoder}[weights_from or arch]
    torch.manual_seed(0)
    model = cls(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    if weights_from:  # weights of one class under the other's architecture name
        data = json.loads((path / "config.json").read_text())
        data["architectures"] = [arch]
        (path / "config.json").write_text(json.dumps(data))
    return model


def test_dpr_context_encoder_checkpoint_loads_as_itself(tmp_path):
    path = tmp_path / "dpr-ctx"
    model = _tiny_dpr(path, "DPRContextEncoder")
    enc = Encoder.load(path, device="cpu")
    # AutoModel alone would build a DPRQuestionEncoder and silently drop these weights.
    assert type(enc.model).__name__ == "DPRContextEncoder"
    ids = enc.tokenize_passages(["hello"], ["world"])
    assert ids == [[2, 5, 3, 6, 3]]  # [CLS] hello [SEP] world [SEP]
    with torch.no_grad():
        x = torch.tensor(ids)
        expected = model(input_ids=x, attention_mask=torch.ones_like(x)).pooler_output[0].numpy()
    np.testing.assert_allclose(enc.encode_passages(["hello"], ["world"])[0], expected, rtol=1e-5, atol=1e-6)


def test_tokenizer_from_another_model_is_refused(tmp_path):
    path = tmp_path / "dpr-q"
    _tiny_dpr(path, "DPRQuestionEncoder", vocab=SMALL_VOCAB + [f"extra{i}" for i in range(20)])
    with pytest.raises(DenseprError, match="does not belong to this model"):
        Encoder.load(path, device="cpu")


def test_checkpoint_that_does_not_match_its_model_is_refused(tmp_path):
    path = tmp_path / "wrong"
    _tiny_dpr(path, "DPRContextEncoder", weights_from="DPRQuestionEncoder")
    with pytest.raises(DenseprError, match="weights do not match the model"):
        Encoder.load(path, device="cpu")


def test_not_a_model_directory(tmp_path):
    with pytest.raises(DenseprError, match="not a Hugging Face model directory"):
        Encoder.load(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DenseprError, match="cannot load the encoder"):
        Encoder.load(tmp_path)


def test_save_is_loadable_by_automodel_and_densepr(tmp_path, tiny_bert):
    from transformers import AutoModel

    enc = Encoder.load(tiny_bert, device="cpu")
    enc.save(tmp_path / "copy")
    assert (tmp_path / "copy" / "model.safetensors").is_file()
    AutoModel.from_pretrained(tmp_path / "copy")
    again = Encoder.load(tmp_path / "copy", device="cpu")
    assert again.config == enc.config
    np.testing.assert_allclose(again.encode_questions(["who created python"]), enc.encode_questions(["who created python"]), rtol=1e-6)


def test_biencoder_loss_is_nll_over_all_batch_passages(tiny_bert, tmp_path):
    q_enc = Encoder.load(tiny_bert, device="cpu")
    model = BiEncoder(q_enc, Encoder.load(make_tiny_bert(tmp_path / "p", seed=3, pooling="cls"), device="cpu"))
    assert model.passage is not model.question and BiEncoder(q_enc).passage is q_enc
    q = torch.randn(3, 8)
    p = torch.randn(6, 8)  # 3 positives + 3 hard negatives, shared by every question
    pos = torch.tensor([0, 2, 4])
    logits = q @ p.T
    manual = -torch.stack([torch.log_softmax(logits[i], 0)[pos[i]] for i in range(3)]).mean()
    torch.testing.assert_close(model.loss(q, p, pos), manual)
    scaled = -torch.stack([torch.log_softmax(20 * logits[i], 0)[pos[i]] for i in range(3)]).mean()
    torch.testing.assert_close(BiEncoder(q_enc, scale=20.0).loss(q, p, pos), scaled)  # cosine models' temperature


def test_load_biencoder_checkpoint_layout(tmp_path):
    ckpt = tmp_path / "ckpt"
    make_tiny_bert(ckpt / "question_encoder", seed=1, pooling="cls")
    make_tiny_bert(ckpt / "passage_encoder", seed=2, pooling="cls")
    q, p = load_biencoder(ckpt, device="cpu")
    assert q.name.endswith("question_encoder") and p.name.endswith("passage_encoder")
    q2, p2 = load_biencoder(ckpt / "question_encoder", device="cpu")
    assert q2 is p2


@pytest.mark.model
def test_mean_pooling_matches_sentence_transformers(embedded):
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers not installed (pip install -e .[compare])")
    from densepr.data import load_wiki_summaries

    corpus = load_wiki_summaries(embedded.summaries)
    enc = Encoder.load(embedded.model_dir, device="cpu")
    assert enc.config == EncoderConfig("mean", True, 256)
    ref = st.SentenceTransformer(str(embedded.model_dir), device="cpu")
    rows = list(range(0, len(corpus), len(corpus) // 64))[:64]
    titles, texts = [corpus.titles[i] for i in rows], [corpus.texts[i] for i in rows]
    ours = enc.encode_passages(titles, texts, batch_size=16)
    theirs = ref.encode([f"{t} [SEP] {x}" for t, x in zip(titles, texts)], batch_size=16)
    cos = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cos.min() >= 0.9999
    qs = embedded.load_qa("nq-test", limit=64).questions
    a, b = enc.encode_questions(qs), ref.encode(qs)
    assert ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min() >= 0.9999
