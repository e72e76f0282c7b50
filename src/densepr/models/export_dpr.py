"""``densepr export-model --format dpr``: densepr's models as Hugging Face's own DPR classes.

DPR's classes hold a BERT encoder and read its [CLS] vector (``pooler_output``, projected when the
checkpoint has a projection), unnormalised. So only what those classes compute exactly is exported:

* an encoder, or a bi-encoder checkpoint (``question_encoder/`` + ``passage_encoder/``), of model type
  ``bert`` with CLS pooling, or a ``dpr`` checkpoint, not normalised -> ``OUT/question_encoder`` (a
  ``DPRQuestionEncoder``) and ``OUT/ctx_encoder`` (a ``DPRContextEncoder``; a single encoder serves as
  both, as densepr uses it). Their ``pooler_output`` is densepr's question / passage vector. Mean
  pooling, normalisation or another model family (MPNet, RoBERTa, ...) is refused with the reason.
* a trained reader (a ``DPRReader`` directory) -> ``OUT`` itself, a ``DPRReader``: the same start,
  end and relevance logits. Its tokenizer loads as ``DPRReaderTokenizer``, whose
  ``(questions, titles, texts)`` layout is the reader's ``[CLS] question [SEP] title [SEP] text``.

The tokenizers are the model's own (``DPRQuestionEncoderTokenizer`` / ``DPRContextEncoderTokenizer`` /
``DPRReaderTokenizer`` by ``AutoTokenizer``). densepr's settings file (``densepr_encoder.json``, CLS and the
max length; ``densepr_reader.json``: windows, tuned k) goes along, so densepr loads an export back as it was
(transformers ignores it). Each export is
built beside ``OUT`` and reloaded there by transformers, which must report no missing or unexpected
weight, before it is moved into place (``fileio.atomic_dir``); an existing ``OUT`` is never replaced.
"""

from __future__ import annotations

import os
from pathlib import Path

from densepr.errors import DenseprError
from densepr.fileio import MANIFEST, atomic_dir, read_json, write_dir_manifest, write_json
from densepr.models.encoder import Encoder, EncoderConfig
from densepr.models.hf import check_model_dir, load_errors, quiet_transformers

KIND = "dpr-export"
FORMATS = ("dpr",)
# The BERT settings DPRConfig shares with BertConfig (the rest are DPR's own or transformers' bookkeeping).
BERT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
             "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
             "initializer_range", "layer_norm_eps", "pad_token_id", "position_embedding_type")  # fmt: skip
TOWERS = {"question_encoder": ("DPRQuestionEncoder", "question_encoder.", "DPRQuestionEncoderTokenizer"),
          "ctx_encoder": ("DPRContextEncoder", "ctx_encoder.", "DPRContextEncoderTokenizer")}  # fmt: skip


def source_kind(path: str | os.PathLike[str]) -> str:
    """``bi-encoder`` (``question_encoder/`` + ``passage_encoder/``), ``reader`` or ``encoder``; a clear
    error for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise DenseprError(f"{path}: no such directory; give an encoder, a bi-encoder checkpoint or a reader directory")
    if (path / "question_encoder").is_dir() and (path / "passage_encoder").is_dir():
        return "bi-encoder"
    if not (path / "config.json").is_file():
        raise DenseprError(f"{path}: not a model directory (no config.json); give an encoder, a bi-encoder checkpoint "
                           "(question_encoder/ + passage_encoder/) or a reader directory")  # fmt: skip
    manifest = read_json(path / MANIFEST) if (path / MANIFEST).is_file() else {}
    config = read_json(path / "config.json")
    archs = (config.get("architectures") or []) if isinstance(config, dict) else []
    if (isinstance(manifest, dict) and manifest.get("kind") == "reader") or "DPRReader" in archs or (path / "densepr_reader.json").is_file():
        return "reader"
    return "encoder"


def _dpr_tower(path: Path, tower: str):
    """``(model, tokenizer)``: the encoder at ``path`` as a DPR ``tower``, or a one-line reason why it cannot be."""
    import transformers

    if source_kind(path) == "reader":
        raise DenseprError(f"{path}: a reader, not an encoder; export it on its own (densepr export-model {path} OUT --format dpr)")
    enc = Encoder.load(path, device="cpu")  # checks the manifest, the weights and the tokenizer
    cfg, model_type = enc.model.config, enc.model.config.model_type
    if model_type not in ("bert", "dpr"):
        raise DenseprError(f"{path}: model type {model_type!r}; DPR's classes hold a BERT encoder only "
                           "(use the folder as it is with transformers' AutoModel or sentence-transformers)")  # fmt: skip
    if model_type == "bert" and enc.config.pooling != "cls":
        raise DenseprError(f"{path}: {enc.config.pooling} pooling; DPR's classes read the [CLS] vector only "
                           "(use the folder as it is with sentence-transformers)")  # fmt: skip
    if enc.config.normalize:
        raise DenseprError(f"{path}: the encoder L2-normalises its vectors and DPR's classes do not; not exportable as DPR")
    if model_type == "dpr":  # DPR's own checkpoint, trained on: rename its tower
        own = next(p for _, p, _ in TOWERS.values() if any(k.startswith(p) for k in enc.model.state_dict()))
        weights = {k[len(own):]: v for k, v in enc.model.state_dict().items()}
        dpr_cfg = transformers.DPRConfig(**{k: getattr(cfg, k) for k in (*BERT_KEYS, "projection_dim") if hasattr(cfg, k)})
    else:
        weights = {f"bert_model.{k}": v for k, v in enc.model.state_dict().items() if not k.startswith("pooler.")}
        dpr_cfg = transformers.DPRConfig(**{k: getattr(cfg, k) for k in BERT_KEYS if hasattr(cfg, k)}, projection_dim=0)
    arch, prefix, _ = TOWERS[tower]
    dpr_cfg.architectures = [arch]
    model = getattr(transformers, arch)(dpr_cfg)
    missing, unexpected = model.load_state_dict({prefix + k: v for k, v in weights.items()}, strict=False)
    if missing or unexpected:
        raise DenseprError(f"{path}: the weights do not fill {arch} ({len(missing)} missing, e.g. "
                           f"{(missing or unexpected)[0]!r}; {len(unexpected)} unexpected)")  # fmt: skip
    return model.eval(), enc.tokenizer, EncoderConfig("cls", False, enc.config.max_length)


def _write(model, tokenizer, settings, tokenizer_class: str, directory: Path) -> None:
    """Save a DPR model directory, then reload it as transformers will: no weight may be missing or unexpected."""
    import transformers

    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    settings.save(directory)
    tc_path = directory / "tokenizer_config.json"  # AutoTokenizer then gives DPR's tokenizer, as for facebook/dpr-*
    write_json(tc_path, {**(read_json(tc_path) if tc_path.is_file() else {}), "tokenizer_class": tokenizer_class})
    arch = model.config.architectures[0]
    with load_errors(directory, arch):
        _, info = getattr(transformers, arch).from_pretrained(directory, use_safetensors=True, output_loading_info=True, trust_remote_code=False)
    bad = [*info.get("missing_keys", []), *info.get("unexpected_keys", []), *info.get("mismatched_keys", [])]
    if bad:
        raise DenseprError(f"{directory}: transformers reloads the {arch} with {len(bad)} weights missing or unexpected, e.g. {bad[0]!r}")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DenseprError(f"{out}: already exists; refusing to replace it (an export writes a new directory: give another, or delete it first)")


def export_dpr_encoders(source: str | os.PathLike[str], out: str | os.PathLike[str]) -> dict:
    """Write ``out/question_encoder`` and ``out/ctx_encoder`` from an encoder or bi-encoder checkpoint."""
    quiet_transformers()
    source, out = Path(source), Path(out)
    _check_out(out)
    kind = source_kind(source)
    if kind == "reader":
        raise DenseprError(f"{source}: a reader, not an encoder; export it with export_dpr_reader (the CLI picks it for you)")
    q_dir, p_dir = (source / "question_encoder", source / "passage_encoder") if kind == "bi-encoder" else (source, source)
    towers = {"question_encoder": _dpr_tower(q_dir, "question_encoder"), "ctx_encoder": _dpr_tower(p_dir, "ctx_encoder")}
    with atomic_dir(out, KIND) as tmp:
        for name, (model, tokenizer, settings) in towers.items():
            _write(model, tokenizer, settings, TOWERS[name][2], tmp / name)
        write_dir_manifest(tmp, KIND, source=str(source.resolve()), format="dpr")
    return {"format": "dpr", "source": kind, "dirs": [str(out / name) for name in towers]}


def export_dpr_reader(source: str | os.PathLike[str], out: str | os.PathLike[str]) -> dict:
    """Write ``out`` as a ``DPRReader`` directory from a trained densepr reader."""
    import transformers

    from densepr.models.reader import ReaderConfig

    quiet_transformers()
    source, out = Path(source), Path(out)
    _check_out(out)
    if source_kind(source) != "reader":
        raise DenseprError(f"{source}: an encoder, not a trained reader; export it with export_dpr_encoders")
    path = check_model_dir(source, "reader")
    config = read_json(path / "config.json")
    if "DPRReader" not in (config.get("architectures") or []):
        raise DenseprError(f"{path}: a reader of model type {config.get('model_type')!r}; DPRReader holds a BERT encoder only")
    with load_errors(path, "reader"):
        model, info = transformers.DPRReader.from_pretrained(path, use_safetensors=True, output_loading_info=True, trust_remote_code=False)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if info.get("missing_keys"):
        raise DenseprError(f"{path}: reader weights missing ({info['missing_keys'][0]!r}, ...); corrupt checkpoint")
    with atomic_dir(out, KIND) as tmp:
        _write(model.eval(), tokenizer, ReaderConfig.from_dir(path), "DPRReaderTokenizer", tmp)
        write_dir_manifest(tmp, KIND, source=str(source.resolve()), format="dpr")
    return {"format": "dpr", "source": "reader", "dirs": [str(out)]}


def export_model(source: str | os.PathLike[str], out: str | os.PathLike[str], fmt: str = "dpr") -> dict:
    """Export ``source`` (encoder, bi-encoder checkpoint or reader, told apart by its files) as ``fmt``."""
    if fmt not in FORMATS:
        raise DenseprError(f"--format {fmt!r}: use one of {', '.join(FORMATS)} (sentence-transformers needs no export: "
                           "every saved encoder already loads with SentenceTransformer(dir))")  # fmt: skip
    if source_kind(source) == "reader":
        return export_dpr_reader(source, out)
    return export_dpr_encoders(source, out)
