"""The question encoder E_Q as an ONNX Runtime model, for CPU serving (extra ``densepr[onnx]``).

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
from densepr.fileio import read_json, write_json, write_manifest
from densepr.models.encoder import EncoderConfig

CONFIG_NAME = "densepr_onnx.json"
KIND = "onnx-question-encoder"


def is_onnx_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def export_question_encoder(encoder_path: str | os.PathLike[str], out: str | os.PathLike[str], int8: bool = False) -> dict:
    """Export E_Q of ``encoder_path`` to ``out`` (see module docstring); returns the written config."""
    import torch

    from densepr.fileio import remove_tree
    from densepr.models.encoder import load_biencoder

    q_enc, _ = load_biencoder(encoder_path, device="cpu")
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    remove_tree(tmp)
    tmp.mkdir(parents=True)
    q_enc.tokenizer.save_pretrained(tmp)
    sample = q_enc.collate(q_enc.tokenize_questions(["who wrote the first dense passage retrieval paper", "why"]))
    with torch.inference_mode():
        torch.onnx.export(q_enc, (sample["input_ids"], sample["attention_mask"]), str(tmp / "model.onnx"),
                          input_names=["input_ids", "attention_mask"], output_names=["vector"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "vector": {0: "batch"}},
                          opset_version=17, dynamo=False)  # fmt: skip
    files = ["model.onnx"]
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(tmp / "model.onnx"), str(tmp / "model.int8.onnx"), weight_type=QuantType.QInt8, per_channel=True)  # per-channel scales: closer to float32
        files.append("model.int8.onnx")
    cfg = {"config": asdict(q_enc.config), "dim": q_enc.dim, "source": q_enc.name, "files": files}
    write_json(tmp / CONFIG_NAME, cfg)
    write_manifest(tmp, KIND, [*files, CONFIG_NAME], source=q_enc.name)
    remove_tree(out)
    tmp.rename(out)
    return cfg


class OnnxQuestionEncoder:
    """E_Q on ONNX Runtime (CPU): ``encode_questions`` as :class:`~densepr.models.encoder.Encoder`'s.

    Args:
        path: an ``export-onnx`` output directory.
        int8: run the int8-quantised model (``--int8`` at export).
        threads: ONNX Runtime intra-op threads (default: its own choice).
    """

    def __init__(self, path: str | os.PathLike[str], int8: bool = False, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise DenseprError("an ONNX question encoder needs onnxruntime: pip install 'densepr[onnx]'") from None
        from transformers import AutoTokenizer

        path = Path(path)
        if not is_onnx_dir(path):
            raise DenseprError(f"{path}: not an ONNX question encoder (no {CONFIG_NAME}); make one with `densepr export-onnx`")
        from densepr.fileio import read_manifest

        read_manifest(path, KIND)  # sizes and hashes: a damaged export is refused
        cfg = read_json(path / CONFIG_NAME)
        model = "model.int8.onnx" if int8 else "model.onnx"
        if model not in cfg["files"]:
            raise DenseprError(f"{path}: has no int8 model; export it with --int8")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path / model), opts, providers=["CPUExecutionProvider"])
        self.tokenizer = AutoTokenizer.from_pretrained(path)
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
