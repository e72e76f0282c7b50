"""DPR's dual encoder: E_Q for questions, E_P for passages, sim(q, p) = E_Q(q) . E_P(p).

Each tower is any Hugging Face BERT-family directory (bert-base-uncased, facebook/dpr-*,
all-MiniLM-L6-v2, ...). Passages are encoded as the pair ``title [SEP] text`` with
token_type_ids all 0, exactly as DPR's ``BiEncoder`` feeds them; questions as plain text.

Pooling is a setting stored with the model in ``densepr_encoder.json``:

* ``cls``: the [CLS] vector (DPR). For ``facebook/dpr-*`` checkpoints it is their
  ``pooler_output`` (the [CLS] vector, projected when the checkpoint has a projection).
* ``mean``: attention-masked mean of the last hidden states (what sentence-transformers
  models such as all-MiniLM-L6-v2 were trained with), optionally L2-normalised.

Without that file the setting is read from sentence-transformers' own files
(``modules.json``, ``1_Pooling/config.json``) when present, else DPR's ``cls``. ``Encoder.save`` writes
those files too, so ``SentenceTransformer(dir).encode`` gives densepr's vectors; a passage is then the one
string ``title [SEP] text`` (:mod:`densepr.models.st_files`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from densepr.errors import DenseprError
from densepr.fileio.atomic import write_json
from densepr.models.hf import (
    autocast,
    bin_state_dict,
    check_model_dir,
    check_vocab,
    default_device,
    load_errors,
    quiet_transformers,
    save_model_dir,
)
from densepr.models.st_files import write_st_files

CONFIG_NAME = "densepr_encoder.json"
POOLINGS = ("cls", "mean")


@dataclass
class EncoderConfig:
    """How a tower turns hidden states into one vector. Stored beside the weights."""

    pooling: str = "cls"
    normalize: bool = False
    max_length: int = 256

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise DenseprError(f"pooling must be one of {POOLINGS}, not {self.pooling!r}")

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> EncoderConfig:
        """densepr's file, else sentence-transformers' pooling files, else DPR's defaults."""
        path = Path(path)
        own = path / CONFIG_NAME
        if own.is_file():
            data = json.loads(own.read_text(encoding="utf-8"))
            return cls(**{k: data[k] for k in ("pooling", "normalize", "max_length") if k in data})
        st_pool = path / "1_Pooling" / "config.json"
        if st_pool.is_file():
            pool = json.loads(st_pool.read_text(encoding="utf-8"))
            modules = json.loads((path / "modules.json").read_text(encoding="utf-8")) if (path / "modules.json").is_file() else []
            st_cfg = path / "sentence_bert_config.json"
            max_len = json.loads(st_cfg.read_text(encoding="utf-8")).get("max_seq_length", 256) if st_cfg.is_file() else 256
            return cls(
                pooling="cls" if pool.get("pooling_mode_cls_token") else "mean",
                normalize=any(m.get("type", "").endswith("Normalize") for m in modules),
                max_length=int(max_len),
            )
        return cls()

    def save(self, path: str | os.PathLike[str]) -> None:
        write_json(Path(path) / CONFIG_NAME, asdict(self))


class Encoder(nn.Module):
    """One tower: tokenizer + transformer + pooling.

    Args:
        model: a Hugging Face encoder (``BertModel``, ``DPRQuestionEncoder``, ...).
        tokenizer: its tokenizer.
        config: pooling settings.
        name: where it was loaded from (recorded in index manifests).
    """

    def __init__(self, model: nn.Module, tokenizer, config: EncoderConfig, name: str = "") -> None:
        super().__init__()
        self.model, self.tokenizer, self.config, self.name = model, tokenizer, config, name
        # DPR checkpoints expose the [CLS] vector (plus optional projection) as pooler_output.
        self._dpr = getattr(model.config, "model_type", "") == "dpr"

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], config: EncoderConfig | None = None, device: str | torch.device | None = None
    ) -> Encoder:
        """Load a Hugging Face model directory (safetensors weights, or a pytorch_model.bin read as tensors only;
        remote code is never run)."""
        import transformers

        quiet_transformers()
        path = check_model_dir(path, "encoder")
        with load_errors(path, "encoder"):
            hf_config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
            pooler = [d / "pooler.pt" for d in (path, path.parent) if (d / "pooler.pt").is_file()]
            if pooler and (pooler[0].parent == path or path.name in ("query_model", "passage_model")):
                raise DenseprError(f"{pooler[0]}: a Tevatron checkpoint with a trained pooler, which densepr does not "
                                   "apply; its vectors would differ from Tevatron's")  # fmt: skip
            model_cls = transformers.AutoModel
            if hf_config.model_type == "dpr":
                # AutoModel maps every "dpr" config to DPRQuestionEncoder, which would load a
                # context encoder's weights under the wrong names: pick the class by architecture.
                arch = (hf_config.architectures or ["DPRQuestionEncoder"])[0]
                if arch not in ("DPRQuestionEncoder", "DPRContextEncoder"):
                    raise DenseprError(f"{path}: {arch} is not a DPR question or context encoder")
                model_cls = getattr(transformers, arch)
            tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir(path), trust_remote_code=False)
            state = bin_state_dict(path)  # a pytorch_model.bin checkpoint: its tensors, read without running code
            if state is not None and model_cls is transformers.AutoModel:  # weights given, not a folder: name the class
                model_cls = transformers.MODEL_MAPPING[type(hf_config)]
            model, info = model_cls.from_pretrained(None if state is not None else path, config=hf_config, state_dict=state,
                                                    trust_remote_code=False, use_safetensors=True, output_loading_info=True)  # fmt: skip
        # A pooler head absent from sentence-transformers checkpoints is harmless (unused);
        # any other missing weight means the checkpoint does not match the model.
        missing = [k for k in info.get("missing_keys", []) if ".pooler." not in f".{k}"]
        if missing:
            raise DenseprError(
                f"{path}: the weights do not match the model in config.json "
                f"({len(missing)} missing, e.g. {missing[0]!r}); wrong or corrupt checkpoint"
            )
        check_vocab(path, tokenizer, model)
        enc = cls(model, tokenizer, config or EncoderConfig.from_dir(path), name=str(path.resolve()))
        return enc.to(device or default_device()).eval()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write weights (safetensors), tokenizer, ``densepr_encoder.json`` and sentence-transformers' files
        (:mod:`densepr.models.st_files`): loadable by ``AutoModel`` and ``SentenceTransformer`` alike."""
        def settings(d: Path) -> None:
            self.config.save(d)
            c = self.config
            write_st_files(d, c.pooling, c.normalize, c.max_length, self.model.config.hidden_size, self.model.config.model_type)

        save_model_dir(path, self.model, self.tokenizer, settings, "encoder", name=self.name)

    @property
    def is_context_encoder(self) -> bool:
        """A DPR context (passage) encoder: trained for passages only, never for questions."""
        return type(self.model).__name__ == "DPRContextEncoder"

    @property
    def dim(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "projection_dim", 0) or cfg.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[batch, seq] token ids and mask -> [batch, dim] vectors (token_type_ids left at 0)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        if self._dpr:
            vec = out.pooler_output
        elif self.config.pooling == "cls":
            vec = out.last_hidden_state[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            vec = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(vec, p=2, dim=-1) if self.config.normalize else vec

    # -- tokenisation ---------------------------------------------------------------------
    def tokenize_questions(self, questions: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(questions), truncation=True, max_length=self.config.max_length)["input_ids"]

    def tokenize_passages(self, titles: Sequence[str], texts: Sequence[str]) -> list[list[int]]:
        """``[CLS] title [SEP] text [SEP]`` ids (truncated longest-first, as DPR's tensorizer)."""
        return self.tokenizer(list(titles), list(texts), truncation=True, max_length=self.config.max_length)["input_ids"]

    def collate(self, ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Pad a batch to its longest member and move it to the encoder's device."""
        batch = self.tokenizer.pad({"input_ids": list(ids)}, padding=True, return_tensors="pt")
        return {"input_ids": batch["input_ids"].to(self.device), "attention_mask": batch["attention_mask"].to(self.device)}

    # -- inference ------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_ids(
        self, ids: Sequence[Sequence[int]], batch_size: int = 64, progress: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """Encode tokenised inputs in length-sorted batches; returns float32 ``[n, dim]`` in input order.

        Sorting by length means each batch is padded only to its own longest member; the
        longest batch comes first, so running out of memory happens at once, not at the end.
        """
        order = np.argsort([-len(x) for x in ids], kind="stable")
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for start in range(0, len(ids), batch_size):
            idx = order[start : start + batch_size]
            batch = self.collate([ids[i] for i in idx])
            with autocast(self.device):
                vec = self(**batch)
            out[idx] = vec.float().cpu().numpy()
            if progress is not None:
                progress(len(idx))
        return out

    def encode_questions(self, questions: Sequence[str], batch_size: int = 128, **kw) -> np.ndarray:
        """Question vectors, float32 ``[n, dim]``."""
        return self.encode_ids(self.tokenize_questions(questions), batch_size, **kw)

    def encode_passages(self, titles: Sequence[str], texts: Sequence[str], batch_size: int = 64, **kw) -> np.ndarray:
        """Passage vectors (``title [SEP] text``), float32 ``[n, dim]``."""
        return self.encode_ids(self.tokenize_passages(titles, texts), batch_size, **kw)


class BiEncoder(nn.Module):
    """DPR's dual encoder (Karpukhin et al., 2020, Section 3): the whole model on one screen.

    Args:
        question: E_Q.
        passage: E_P; ``None`` shares E_Q's weights (the paper's single-encoder variant).
        scale: similarities are multiplied by this in the loss (a softmax temperature of 1/scale):
            1 for DPR's raw dot product; ~20 when the towers normalise (cosine), as
            sentence-transformers' MultipleNegativesRankingLoss.
    """

    def __init__(self, question: Encoder, passage: Encoder | None = None, scale: float = 1.0) -> None:
        super().__init__()
        self.question = question
        self.passage = passage if passage is not None else question
        self.scale = scale

    def encode_query(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.question(input_ids, attention_mask)

    def encode_passage(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.passage(input_ids, attention_mask)

    @staticmethod
    def similarity(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Dot product of every question with every passage: [nq, d] x [np, d] -> [nq, np]."""
        return q @ p.T

    def loss(self, q: torch.Tensor, p: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        """NLL of each question's positive among *all* passages of the batch (Eq. 2).

        ``p`` holds every question's positive and hard negatives, so each passage is a
        negative for every other question (in-batch negatives); ``positive[i]`` is the row
        of question i's positive in ``p``.
        """
        return F.cross_entropy(self.scale * self.similarity(q, p).float(), positive)


# Two-tower checkpoint layouts (question folder, passage folder): densepr's (what `densepr train` writes),
# Haystack's DensePassageRetriever.save, and Tevatron's with untied encoders (its tokenizer beside them).
TOWER_LAYOUTS = (("question_encoder", "passage_encoder"), ("query_encoder", "passage_encoder"), ("query_model", "passage_model"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


def tower_dirs(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(question_dir, passage_dir)`` of a two-tower checkpoint in any of :data:`TOWER_LAYOUTS`, else
    ``(path, path)``: one model for both."""
    path = Path(path)
    for q, p in TOWER_LAYOUTS:
        if (path / q).is_dir() and (path / p).is_dir():
            return path / q, path / p
    return path, path


def tokenizer_dir(path: Path) -> Path:
    """Where a tower's tokenizer is: its own folder, else (Tevatron) the checkpoint folder above it."""
    if any((path / f).is_file() for f in TOKENIZER_FILES):
        return path
    up = path.parent
    if path.name in {n for layout in TOWER_LAYOUTS for n in layout} and any((up / f).is_file() for f in TOKENIZER_FILES):
        return up
    return path


def check_question_encoder(encoder, where: str = "") -> None:
    """Refuse a DPR context encoder as the question tower: it was trained for passages, and questions
    encoded with it rank differently, silently."""
    if getattr(encoder, "is_context_encoder", False):
        raise DenseprError(f"{where or encoder.name}: a DPRContextEncoder encodes passages only, never questions; "
                           "give the matching question encoder with --question-encoder")  # fmt: skip


def load_biencoder(
    path: str | os.PathLike[str] | None = None, device: str | torch.device | None = None, *,
    question: str | os.PathLike[str] | None = None, passage: str | os.PathLike[str] | None = None,
) -> tuple[Encoder, Encoder]:  # fmt: skip
    """Load ``(question_encoder, passage_encoder)``.

    ``path``: a two-tower checkpoint (:data:`TOWER_LAYOUTS`: densepr's ``question_encoder/`` +
    ``passage_encoder/``, Haystack's ``query_encoder/`` + ``passage_encoder/``, Tevatron's
    ``query_model/`` + ``passage_model/``), or one model directory used for both. ``question`` /
    ``passage`` replace that tower (given alone, one is used for both). A DPR context encoder is
    refused as the question tower (:func:`check_question_encoder`).
    """
    if path is None and question is None and passage is None:
        raise DenseprError("no encoder given: a model directory, a two-tower checkpoint, or the question and passage encoders")
    q_dir, p_dir = tower_dirs(path) if path is not None else (None, None)
    q_dir, p_dir = Path(question or q_dir or passage), Path(passage or p_dir or question)
    q_enc = Encoder.load(q_dir, device=device)
    p_enc = q_enc if q_dir.resolve() == p_dir.resolve() else Encoder.load(p_dir, device=device)
    if q_enc.is_context_encoder:
        check_question_encoder(q_enc, f"{q_dir}{' (used for questions and passages)' if p_enc is q_enc else ''}")
    return q_enc, p_enc
