"""sentence-transformers' files beside every encoder densepr saves, so ``SentenceTransformer(dir)`` gives
densepr's vectors as they are (same pooling, normalisation, truncation and dot-product scale).

Written next to the weights (:func:`write_st_files`, called by ``Encoder.save``):

* ``modules.json``: Transformer -> Pooling (-> Normalize when densepr normalises), under the module
  names sentence-transformers has read since 2.0 (6.x maps them to its new ones);
* ``sentence_bert_config.json``: ``max_seq_length`` = densepr's ``max_length`` (256 by default; without
  it sentence-transformers would cut at 512 tokens and long passages would get other vectors);
  ``do_lower_case`` false, because the tokenizer already lowercases when its model does;
* ``1_Pooling/config.json``: CLS or masked mean, as ``densepr_encoder.json`` says;
* ``config_sentence_transformers.json``: similarity ``dot`` (DPR's score), ``cosine`` when normalised.

Questions: ``SentenceTransformer(dir).encode(questions)`` equals densepr's question vectors.

Passages: densepr encodes the pair ``(title, text)``, i.e. ``[CLS] title [SEP] text [SEP]`` with
token_type_ids all 0. sentence-transformers encodes one string per input; a literal ``[SEP]`` in it is
the tokenizer's separator token (special tokens are matched before the text is split into words), and a
single string gets token_type_ids 0, so the one string ``f"{title} [SEP] {text}"`` gives the same ids and
the same vector (:func:`passage_text` builds it from the tokenizer's own separator, doubled where the
tokenizer's pairs are, as MPNet's ``</s></s>``). Truncation agrees too: densepr cuts the longer of title
and text first, the single string is cut at its end, which is the same tokens while the title holds at
most half of ``max_length``.

A ``facebook/dpr-*`` checkpoint (model type ``dpr``) gets no such files: its vector is the model's
``pooler_output`` (with its projection, if any), which sentence-transformers' Transformer module does not read.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from densepr.fileio import write_json

TRANSFORMER = "sentence_transformers.models.Transformer"
POOLING = "sentence_transformers.models.Pooling"
NORMALIZE = "sentence_transformers.models.Normalize"
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
ST_DIRS = ("1_Pooling", "2_Normalize")


def write_st_files(path: str | os.PathLike[str], pooling: str, normalize: bool, max_length: int, dim: int, model_type: str) -> None:
    """Write sentence-transformers' module files for an encoder saved at ``path`` (see the module docstring);
    for a ``dpr`` model remove any left from an earlier save instead (they would give other vectors)."""
    path = Path(path)
    for name in ST_FILES:  # a directory saved over may hold another setting's files
        (path / name).unlink(missing_ok=True)
    for name in ST_DIRS:
        if (path / name).is_dir():
            shutil.rmtree(path / name)
    if model_type == "dpr":
        return
    modules = [{"idx": 0, "name": "0", "path": "", "type": TRANSFORMER}, {"idx": 1, "name": "1", "path": "1_Pooling", "type": POOLING}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": NORMALIZE})
        (path / "2_Normalize").mkdir()
    (path / "1_Pooling").mkdir()
    write_json(path / "modules.json", modules)
    write_json(path / "sentence_bert_config.json", {"max_seq_length": int(max_length), "do_lower_case": False})
    write_json(path / "1_Pooling" / "config.json", {
        "word_embedding_dimension": int(dim), "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False, "include_prompt": True,
    })  # fmt: skip
    write_json(path / "config_sentence_transformers.json", {"prompts": {}, "default_prompt_name": None,
                                                            "similarity_fn_name": "cosine" if normalize else "dot"})  # fmt: skip


def passage_text(tokenizer, title: str, text: str) -> str:
    """The one string whose tokens are densepr's passage input ``(title, text)``: ``title [SEP] text`` for BERT."""
    sep = tokenizer.sep_token
    pair = tokenizer("a", "b", add_special_tokens=True)["input_ids"]
    seps = sum(1 for i in pair if i == tokenizer.sep_token_id) - 1  # separators between the two texts
    return f"{title} {sep * max(seps, 1)} {text}"
