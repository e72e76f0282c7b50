"""The reader's network: one encoder, a span head on every token and a relevance head on the first token.

Whatever the encoder, the reader is the same three parts (DPR, Section 6.1): the encoder's last hidden
states ``h``; ``qa_outputs`` (hidden -> 2) on every token: start and end logits; ``qa_classifier``
(hidden -> 1) on ``h[:, 0]``: the passage-selection logit. Inputs are ``input_ids`` and
``attention_mask`` only (token_type_ids stay 0: DPR's layout; MPNet and RoBERTa have none).
Two containers hold those parts, chosen by the checkpoint, so each saves as it always did:

* BERT-type encoders (BERT, all-MiniLM-L6-v2, ``facebook/dpr-reader-*``): Hugging Face's
  :class:`transformers.DPRReader` (``span_predictor.encoder.bert_model`` + ``span_predictor.qa_outputs``
  + ``span_predictor.qa_classifier``), saved as a ``DPRReader`` directory, loadable by transformers.
* any other encoder ``AutoModel`` loads (MPNet's all-mpnet-base-v2, ...): :class:`SpanReader`, saved as
  the encoder's own directory (``config.json``, ``model.safetensors``) plus ``reader_heads.safetensors``
  (the two heads); without that file (an encoder straight from its authors) the heads start new.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from densepr.errors import DenseprError

HEADS_FILE = "reader_heads.safetensors"
# encoders whose positions start after the padding index (RoBERTa's scheme): two of their positions are never used
_POSITION_OFFSET = {"mpnet": 2, "roberta": 2, "xlm-roberta": 2, "camembert": 2}


@dataclass
class ReaderOutput:
    """What both containers return (DPRReader's names): ``[n, L]`` start and end logits, ``[n]`` selection logits."""

    start_logits: torch.Tensor
    end_logits: torch.Tensor
    relevance_logits: torch.Tensor


class SpanReader(nn.Module):
    """An encoder with DPR's reader heads, for encoders that are not BERT (see module docstring).

    Args:
        encoder: a Hugging Face encoder (``MPNetModel``, ...) returning ``last_hidden_state``.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.qa_outputs = nn.Linear(hidden, 2)
        self.qa_classifier = nn.Linear(hidden, 1)
        std = getattr(encoder.config, "initializer_range", 0.02)  # as DPRReader initialises its heads
        for head in (self.qa_outputs, self.qa_classifier):
            nn.init.normal_(head.weight, std=std)
            nn.init.zeros_(head.bias)

    @property
    def config(self):
        return self.encoder.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, return_dict: bool = True) -> ReaderOutput:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        start, end = self.qa_outputs(h).split(1, dim=-1)
        return ReaderOutput(start.squeeze(-1).contiguous(), end.squeeze(-1).contiguous(), self.qa_classifier(h[:, 0]).squeeze(-1))

    def heads(self) -> dict[str, nn.Module]:
        return {"qa_outputs": self.qa_outputs, "qa_classifier": self.qa_classifier}

    def save_pretrained(self, path: str | Path, safe_serialization: bool = True) -> None:
        """The encoder's directory, as transformers writes it, plus the heads in :data:`HEADS_FILE`."""
        from safetensors.torch import save_file

        self.encoder.save_pretrained(path, safe_serialization=True)
        tensors = {f"{name}.{k}": v.detach().cpu().contiguous() for name, m in self.heads().items() for k, v in m.state_dict().items()}
        save_file(tensors, str(Path(path) / HEADS_FILE), metadata={"format": "pt"})

    def load_heads(self, path: Path) -> None:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        want = {f"{name}.{k}" for name, m in self.heads().items() for k in m.state_dict()}
        if set(tensors) != want:
            raise DenseprError(f"{path}: expected the reader heads {sorted(want)}, found {sorted(tensors)}")
        for name, m in self.heads().items():
            try:
                m.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(name + ".")})
            except RuntimeError as e:  # shapes: heads of another encoder's width
                raise DenseprError(f"{path}: the heads do not fit this encoder: {str(e).splitlines()[-1].strip()}") from None


def reader_heads(model: nn.Module) -> list[nn.Module]:
    """The span and selection heads of either container (new, randomly initialised weights at the start)."""
    if isinstance(model, SpanReader):
        return list(model.heads().values())
    sp = model.span_predictor  # transformers.DPRReader
    return [sp.qa_outputs, sp.qa_classifier]


def max_positions(config) -> int:
    """Tokens one window may hold: ``max_position_embeddings``, less the positions RoBERTa-style encoders skip."""
    return int(config.max_position_embeddings) - _POSITION_OFFSET.get(getattr(config, "model_type", ""), 0)


def load_reader_model(path: Path, hf) -> nn.Module:
    """The reader network in ``path`` (its ``AutoConfig`` is ``hf``): a DPRReader checkpoint, a BERT encoder
    (into a DPRReader, new heads), or any other encoder (a :class:`SpanReader`, with its saved heads when
    ``reader_heads.safetensors`` is there). Safetensors only; remote code is never run."""
    import transformers

    if hf.model_type == "dpr":
        if "DPRReader" not in (hf.architectures or []):
            raise DenseprError(f"{path}: a DPR checkpoint but not a reader ({', '.join(hf.architectures or ['?'])})")
        model, info = transformers.DPRReader.from_pretrained(path, use_safetensors=True, output_loading_info=True, trust_remote_code=False)
        if info.get("missing_keys"):
            raise DenseprError(f"{path}: reader weights missing ({info['missing_keys'][0]!r}, ...); corrupt checkpoint")
        return model
    if hf.model_type == "bert":
        return _dpr_reader_from_bert(path, hf)
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    if hf.model_type not in MODEL_MAPPING_NAMES or getattr(hf, "is_encoder_decoder", False):
        raise DenseprError(f"{path}: model type {hf.model_type!r}; the reader starts from an encoder (BERT, MPNet, ...) "
                           "or a DPRReader checkpoint")  # fmt: skip
    model_cls = getattr(transformers, MODEL_MAPPING_NAMES[hf.model_type])
    # the pooler is unused (the heads read the hidden states): left out where the class allows
    kw = {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(model_cls.__init__).parameters else {}
    encoder, info = model_cls.from_pretrained(path, config=hf, use_safetensors=True, output_loading_info=True,
                                              trust_remote_code=False, **kw)  # fmt: skip
    missing = [k for k in info.get("missing_keys", []) if ".pooler." not in f".{k}"]
    if missing:
        raise DenseprError(f"{path}: encoder weights missing ({missing[0]!r}, ...); wrong or corrupt checkpoint")
    model = SpanReader(encoder)
    if (path / HEADS_FILE).is_file():
        model.load_heads(path / HEADS_FILE)
    return model


def _dpr_reader_from_bert(path: Path, hf) -> nn.Module:
    import transformers

    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
            "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id")  # fmt: skip
    cfg = transformers.DPRConfig(**{k: getattr(hf, k) for k in keys if hasattr(hf, k)})
    cfg.architectures = ["DPRReader"]
    model = transformers.DPRReader(cfg)
    bert = transformers.BertModel.from_pretrained(path, use_safetensors=True, add_pooling_layer=False, trust_remote_code=False)
    missing, unexpected = model.span_predictor.encoder.bert_model.load_state_dict(bert.state_dict(), strict=False)
    if missing:
        raise DenseprError(f"{path}: BERT weights do not fit the reader ({missing[0]!r} missing)")
    return model
