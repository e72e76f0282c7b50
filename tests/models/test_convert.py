"""``densepr convert``: a pytorch_model.bin checkpoint rewritten with model.safetensors, the same vectors after."""

from __future__ import annotations

import numpy as np
import torch

from densepr.models.encoder import Encoder, load_biencoder
from tests.models.test_two_tower import Q, _Payload, bert_bin_only, tiny_dpr
from tests.support.cli import run
from tests.support.tiny import PASSAGES, make_tiny_bert


def _same_vectors(a: Encoder, b: Encoder) -> None:
    np.testing.assert_array_equal(a.encode_questions(Q), b.encode_questions(Q))
    t, x = zip(*PASSAGES[:3])
    np.testing.assert_array_equal(a.encode_passages(t, x), b.encode_passages(t, x))


def test_convert_writes_safetensors_with_the_same_vectors(tmp_path, capsys, tiny_bert):
    """Was: no `convert` command (a .bin-only checkpoint could only be read as a pickle at every load)."""
    import transformers

    binned = bert_bin_only(tiny_bert, tmp_path / "bin")
    (binned / "training_args.bin").write_bytes(b"not read")  # training state: left out, never unpickled
    before = {p.name: p.read_bytes() for p in binned.iterdir()}
    code, out, err = run(capsys, "convert", str(binned), "-o", str(tmp_path / "st"))
    assert code == 0, err
    st = tmp_path / "st"
    assert (st / "model.safetensors").is_file() and not list(st.glob("*.bin")) and "training_args.bin" in out
    assert {p.name for p in binned.iterdir()} - {"pytorch_model.bin", "training_args.bin"} <= {p.name for p in st.iterdir()}
    _same_vectors(Encoder.load(tiny_bert, device="cpu"), Encoder.load(st, device="cpu"))
    _, info = transformers.AutoModel.from_pretrained(st, use_safetensors=True, output_loading_info=True)  # no pickle read
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert {p.name: p.read_bytes() for p in binned.iterdir()} == before  # the input as it was

    code, _, err = run(capsys, "convert", str(binned), "-o", str(tmp_path / "st"))  # an existing output is never replaced
    assert code == 1 and "already exists" in err
    code, _, err = run(capsys, "convert", str(binned))  # default: beside it
    assert code == 0 and (tmp_path / "bin-safetensors" / "model.safetensors").is_file(), err
    code, _, err = run(capsys, "convert", str(tiny_bert), "-o", str(tmp_path / "again"))
    assert code == 1 and "nothing to convert (it already has safetensors weights)" in err and not (tmp_path / "again").exists()


def test_convert_refuses_a_pickle_payload_unread(tmp_path, capsys, tiny_bert):
    binned = bert_bin_only(tiny_bert, tmp_path / "bin")
    state = torch.load(binned / "pytorch_model.bin", weights_only=True)
    marker = tmp_path / "payload-ran"
    torch.save({**state, "extra": _Payload(marker)}, binned / "pytorch_model.bin")
    code, _, err = run(capsys, "convert", str(binned), "-o", str(tmp_path / "st"))
    assert code == 1 and "holds Python objects besides tensors" in err and err.count("\n") == 1
    assert not marker.exists() and not (tmp_path / "st").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bin"]

    pooled = make_tiny_bert(tmp_path / "tev", seed=8)  # another pickle (Tevatron's pooler): refused, naming it
    (pooled / "model.safetensors").unlink()
    torch.save({}, pooled / "pytorch_model.bin")
    torch.save({}, pooled / "pooler.pt")
    code, _, err = run(capsys, "convert", str(pooled), "-o", str(tmp_path / "st"))
    assert code == 1 and "pooler.pt: not converted" in err


def test_convert_two_tower_folders(tmp_path, capsys, tiny_bert):
    """Haystack's query_encoder/ + passage_encoder/, both .bin: each tower converted, the pair loads the same."""
    ckpt = tmp_path / "haystack"
    tiny_dpr(ckpt / "query_encoder", "DPRQuestionEncoder", tiny_bert, seed=4, bin_only=True)
    tiny_dpr(ckpt / "passage_encoder", "DPRContextEncoder", tiny_bert, seed=5, bin_only=True)
    code, out, err = run(capsys, "convert", str(ckpt), "-o", str(tmp_path / "st"))
    assert code == 0, err
    assert "passage_encoder, query_encoder" in out
    (q0, p0), (q1, p1) = load_biencoder(ckpt, device="cpu"), load_biencoder(tmp_path / "st", device="cpu")
    _same_vectors(q0, q1)
    _same_vectors(p0, p1)
