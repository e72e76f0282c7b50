"""The question encoder E_Q, and the reader, as ONNX Runtime models for CPU serving (extra ``densepr[onnx]``).

``densepr export-onnx ENCODER OUT [--int8]`` exports any encoder directory (or a bi-encoder
checkpoint's ``question_encoder/``): tokenizer files, ``model.onnx`` (float32: the transformer,
pooling and normalisation in one graph) and, with ``--int8``, ``model.int8.onnx`` (ONNX Runtime's
dynamic int8 quantisation of the weights), plus ``densepr_onnx.json`` (pooling settings, dimension,
source encoder, which file to run) and a manifest. :class:`OnnxQuestionEncoder` has the question side
of :class:`densepr.models.encoder.Encoder`'s interface, so a Retriever, ``densepr serve`` and
``densepr retrieve`` take such a directory as ``--question-encoder``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from densepr.errors import DenseprError
from densepr.fileio.atomic import read_json, write_json
from densepr.fileio.dirs import atomic_dir
from densepr.fileio.manifest import write_dir_manifest
from densepr.models.encoder import EncoderConfig
from densepr.models.hf import load_errors

CONFIG_NAME = "densepr_onnx.json"
KIND = "onnx-question-encoder"


READER_KIND = "onnx-reader"
# what an export holds besides its manifest: an interrupted export's leftovers may be replaced, nothing else
OWN_FILES = ("model.onnx", "model.int8.onnx", "*.onnx.data", CONFIG_NAME, "densepr_reader.json", "config.json", "vocab.txt",
             "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def is_onnx_dir(path: str | os.PathLike[str], kind: str = KIND) -> bool:
    """An ``export-onnx`` directory of that kind (question encoder exports before readers existed have no kind)."""
    f = Path(path) / CONFIG_NAME
    return f.is_file() and read_json(f).get("kind", KIND) == kind


def _quantize(tmp: Path) -> str:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(tmp / "model.onnx"), str(tmp / "model.int8.onnx"), weight_type=QuantType.QInt8, per_channel=True)  # per-channel scales: closer to float32
    return "model.int8.onnx"


def write_export(out: str | os.PathLike[str], kind: str, int8: bool, source: str, write: Callable[[Path], None], **meta) -> dict:
    """Build an export beside ``out`` and swap it in whole (``fileio.atomic_dir``: an export of the same
    kind is replaced, anything else at ``out``, or where a symlinked ``out`` points, is refused untouched):
    ``write(tmp)`` puts the tokenizer, settings and ``model.onnx``; then the int8 model (``int8``),
    ``densepr_onnx.json`` (``kind``, ``meta``, ``source``, files) and the manifest, which lists every file
    (the tokenizer's too, so an altered one is refused on load). Returns the config."""
    with atomic_dir(out, kind, OWN_FILES) as tmp:
        write(tmp)
        files = ["model.onnx", *([_quantize(tmp)] if int8 else [])]
        cfg = {"kind": kind, **meta, "source": source, "files": files}
        write_json(tmp / CONFIG_NAME, cfg)
        write_dir_manifest(tmp, kind, source=source)
    return cfg


def _session(path: Path, kind: str, int8: bool, threads: int | None):
    """ONNX Runtime session over an export's float32 or int8 model, after checking its manifest."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise DenseprError("ONNX models need onnxruntime: pip install 'densepr[onnx]'") from None
    from densepr.fileio.manifest import read_manifest

    read_manifest(path, kind)  # sizes and hashes: a damaged export is refused
    cfg = read_json(path / CONFIG_NAME)
    model = "model.int8.onnx" if int8 else "model.onnx"
    if model not in cfg["files"]:
        raise DenseprError(f"{path}: has no int8 model; export it with --int8")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path / model), opts, providers=["CPUExecutionProvider"]), cfg


def export_question_encoder(encoder_path: str | os.PathLike[str], out: str | os.PathLike[str], int8: bool = False) -> dict:
    """Export E_Q of ``encoder_path`` to ``out`` (see module docstring); returns the written config."""
    import torch

    from densepr.models.encoder import load_biencoder

    q_enc, _ = load_biencoder(encoder_path, device="cpu")

    def write(tmp: Path) -> None:
        q_enc.tokenizer.save_pretrained(tmp)
        sample = q_enc.collate(q_enc.tokenize_questions(["who wrote the first dense passage retrieval paper", "why"]))
        with torch.inference_mode():
            torch.onnx.export(q_enc, (sample["input_ids"], sample["attention_mask"]), str(tmp / "model.onnx"),
                              input_names=["input_ids", "attention_mask"], output_names=["vector"],
                              dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "vector": {0: "batch"}},
                              opset_version=17, dynamo=False)  # fmt: skip

    return write_export(out, KIND, int8, q_enc.name, write, config=asdict(q_enc.config), dim=q_enc.dim)


class OnnxQuestionEncoder:
    """E_Q on ONNX Runtime (CPU): ``encode_questions`` as :class:`~densepr.models.encoder.Encoder`'s.

    Args:
        path: an ``export-onnx`` output directory.
        int8: run the int8-quantised model (``--int8`` at export).
        threads: ONNX Runtime intra-op threads (default: its own choice).
    """

    def __init__(self, path: str | os.PathLike[str], int8: bool = False, threads: int | None = None) -> None:
        from transformers import AutoTokenizer

        path = Path(path)
        if not is_onnx_dir(path):
            raise DenseprError(f"{path}: not an ONNX question encoder (no {CONFIG_NAME} of that kind); make one with `densepr export-onnx`")
        self.session, cfg = _session(path, KIND, int8, threads)  # checks the manifest, tokenizer files included
        with load_errors(path, "ONNX question encoder's tokenizer"):
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)  # never the folder's code
        self.config = EncoderConfig(**cfg["config"])
        self.dim, self.name, self.int8 = int(cfg["dim"]), str(path.resolve()) + ("#int8" if int8 else ""), int8
        self.device = "cpu"

    def tokenize_questions(self, questions: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(questions), truncation=True, max_length=self.config.max_length)["input_ids"]

    def encode_ids(self, ids: Sequence[Sequence[int]], batch_size: int = 64, progress: Callable[[int], None] | None = None) -> np.ndarray:
        order = np.argsort([-len(x) for x in ids], kind="stable")
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for start in range(0, len(ids), batch_size):
            idx = order[start : start + batch_size]
            batch = self.tokenizer.pad({"input_ids": [ids[i] for i in idx]}, padding=True, return_tensors="np")
            out[idx] = self.session.run(None, {"input_ids": batch["input_ids"].astype(np.int64),
                                               "attention_mask": batch["attention_mask"].astype(np.int64)})[0]  # fmt: skip
            if progress is not None:
                progress(len(idx))
        return out

    def encode_questions(self, questions: Sequence[str], batch_size: int = 128, **kw) -> np.ndarray:
        return self.encode_ids(self.tokenize_questions(questions), batch_size, **kw)


def load_question_encoder(path: str | os.PathLike[str], device: str | None = None):
    """An encoder directory (torch) or an ONNX export (``path`` ending in ``#int8``: its int8 model)."""
    p = str(path)
    int8 = p.endswith("#int8")
    base = p[: -len("#int8")] if int8 else p
    if is_onnx_dir(base):
        return OnnxQuestionEncoder(base, int8=int8)
    from densepr.models.encoder import Encoder

    return Encoder.load(path, device=device)


def question_encoder_dim(path: str | os.PathLike[str]) -> int:
    """The vector size a question encoder (as :func:`load_question_encoder` takes it) gives, read from
    its config alone (no weights loaded): what a server checks against its index before starting replicas."""
    base = str(path)[: -len("#int8")] if str(path).endswith("#int8") else str(path)
    if is_onnx_dir(base):
        return int(read_json(Path(base) / CONFIG_NAME)["dim"])
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(base, trust_remote_code=False)  # never the folder's code
    except (OSError, ValueError) as e:
        raise DenseprError(f"{base}: not a question encoder directory ({e})") from None
    return int(getattr(cfg, "projection_dim", 0) or cfg.hidden_size)  # as Encoder.dim


# -- the reader -------------------------------------------------------------------------------------
class OnnxReaderModel:
    """DPRReader's forward on ONNX Runtime (CPU, inference only): called as the transformers model is,
    it returns the same three logits as torch tensors. :meth:`densepr.models.reader.Reader.load` uses it
    for an ``export-onnx`` reader directory."""

    def __init__(self, path: str | os.PathLike[str], int8: bool = False, threads: int | None = None) -> None:
        import types

        self.session, cfg = _session(Path(path), READER_KIND, int8, threads)
        self.config = types.SimpleNamespace(max_position_embeddings=int(cfg["max_position_embeddings"]))
        self.int8 = int8

    def __call__(self, input_ids, attention_mask, return_dict: bool = True):
        import types

        import torch

        s, e, r = self.session.run(None, {"input_ids": input_ids.cpu().numpy().astype(np.int64),
                                          "attention_mask": attention_mask.cpu().numpy().astype(np.int64)})  # fmt: skip
        return types.SimpleNamespace(start_logits=torch.from_numpy(s), end_logits=torch.from_numpy(e), relevance_logits=torch.from_numpy(r))
