"""DPR's extractive reader (Karpukhin et al., 2020, Section 6.1): pick a passage, then a span in it.

Each of a question's passages is read as ``[CLS] question [SEP] title [SEP] text`` (no final [SEP]:
``DPRReaderTokenizer``'s layout, which ``facebook/dpr-reader-*`` checkpoints were trained on)
(token_type_ids all 0) by one encoder (BERT, MiniLM, MPNet, ...) with two heads, as Hugging Face's
:class:`transformers.DPRReader` (so ``facebook/dpr-reader-*`` checkpoints load as they are;
:mod:`densepr.models.reader_model`):

* ``qa_classifier`` on [CLS]: the passage-selection (relevance) logit;
* ``qa_outputs`` on every token: span start and end logits. A span's score is
  ``start[i] + end[j]`` with ``i <= j < i + max_answer_length`` (default 10 tokens), taken
  only inside the passage text (never the question or the title), then widened to whole words.

Inference follows DPR: the answer for top-k passages is the best span of the passage with
the highest selection logit among the first k. A passage longer than the window is read in
overlapping windows (stride ``stride`` tokens); it scores as its best window.

Training loss (DPR ``reader.py``): for each question, M passages (the positive first) ->
cross-entropy of the positive's selection logit among the M, plus the marginal
log-likelihood of all occurrences of any answer in the positive passage,
``-log sum_(s,e) P_start(s) P_end(e)``. Optionally (``shared``) P_start and P_end are normalised
over the text of all M passages (Clark & Gardner, 2018), so span scores compare across passages.

Saved as a Hugging Face ``DPRReader`` directory (config.json, model.safetensors, tokenizer) for BERT-type
encoders, else the encoder's directory plus ``reader_heads.safetensors``; either with ``densepr_reader.json``
(the window settings and the top-k tuned on validation). Answer selection: :mod:`densepr.models.selection`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from densepr.errors import DenseprError
from densepr.fileio.atomic import write_json
from densepr.fileio.identity import file_identity
from densepr.models.hf import (
    autocast,
    check_model_dir,
    check_precision,
    check_vocab,
    default_device,
    inference_dtype,
    load_errors,
    quiet_transformers,
    save_model_dir,
)
from densepr.models.reader_model import load_reader_model, max_positions
from densepr.models.selection import PAPER_SELECTION as PAPER_SELECTION  # re-exported: their home before the split
from densepr.models.selection import Reading as Reading
from densepr.models.selection import Selection as Selection
from densepr.models.selection import best_reading as best_reading

CONFIG_NAME = "densepr_reader.json"
MAX_TITLE_TOKENS = 32  # titles are short; capping them keeps room for the text
MIN_TEXT_TOKENS = 16  # a window must hold at least this much passage text
CPU_BATCH_TOKENS = 2048  # padded tokens per inference batch on CPU (benchmarks/reader/reader_speed.py)



@dataclass
class ReaderConfig:
    """Window and span settings, stored beside the weights."""

    max_length: int = 256  # tokens per window (DPR: 350)
    stride: int = 64  # tokens shared by consecutive windows of a long passage
    max_answer_length: int = 10  # span cap in tokens (DPR's default)
    top_k: int = 20  # passages read per question unless told otherwise (tuned on validation)
    tuned: dict = field(default_factory=dict)  # how top_k was chosen (EM per k on validation)
    # per retrieval mode, the passage selection tuned on held-out questions (`densepr tune-reader`):
    # {mode: {"relevance": w, "span": w, "retriever": w, "aggregate": t, "k": passages, "em": ..., "paper_em": ...}}
    selection: dict = field(default_factory=dict)

    def selection_for(self, mode: str) -> tuple[Selection, int | None]:
        """The tuned :class:`Selection` and k for a retrieval mode; DPR's rule (and no k) when untuned."""
        entry = self.selection.get(str(mode))
        if not entry:
            return PAPER_SELECTION, None
        return Selection(entry["relevance"], entry["span"], entry["retriever"], entry.get("aggregate", 0.0)), entry.get("k")

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> ReaderConfig:
        f = Path(path) / CONFIG_NAME
        if not f.is_file():
            return cls()
        data = json.loads(f.read_text(encoding="utf-8"))
        return cls(**{k: data[k] for k in asdict(cls()) if k in data})

    def save(self, path: str | os.PathLike[str]) -> None:
        write_json(Path(path) / CONFIG_NAME, asdict(self))


@dataclass
class Tokenized:
    """One passage's text tokens, their character offsets and word numbers (for whole-word spans)."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    words: list[int]


@dataclass
class Window:
    """One encoder input: ``[CLS] q [SEP] title [SEP] text[first:first+n]`` (DPRReaderTokenizer's layout)."""

    ids: list[int]
    passage: int  # which of the question's passages
    text_start: int  # position of the first text token in ``ids``
    first: int  # index of that token among the passage's text tokens
    n: int  # text tokens in this window


class ReadingStopped(Exception):
    """Raised by :meth:`Reader.read` when its ``stop()`` said, between two chunks, that nobody wants the readings."""


class Reader(nn.Module):
    """The DPR reader: its network (:mod:`densepr.models.reader_model`) plus its tokenizer and window settings."""

    def __init__(self, model: nn.Module, tokenizer, config: ReaderConfig, name: str = "") -> None:
        super().__init__()
        self.model, self.tokenizer, self.config, self.name = model, tokenizer, config, name
        if not getattr(tokenizer, "is_fast", False):
            raise DenseprError(f"{name}: the reader needs a fast tokenizer (tokenizer.json) for character offsets")

    # -- loading and saving ----------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str | torch.device | None = None,
             config: ReaderConfig | None = None, precision: str = "fp32") -> Reader:  # fmt: skip
        """Load a reader: a trained reader or ``DPRReader`` directory, an encoder (BERT, MiniLM, MPNet, ...: new,
        untrained heads; :mod:`densepr.models.reader_model`), or an
        ``export-onnx`` reader directory (ONNX Runtime on CPU, inference only; ``DIR#int8``: its int8 model).
        ``precision``: the weights for reading (:func:`~densepr.models.hf.inference_dtype`; ``bf16``/``auto``
        are for inference only, training loads float32).

        Weights are read from safetensors only; remote code is never run.
        """
        import transformers

        from densepr.models.onnx import READER_KIND, OnnxReaderModel, is_onnx_dir

        quiet_transformers()
        p = str(path)
        base = p[: -len("#int8")] if p.endswith("#int8") else p
        if is_onnx_dir(base, READER_KIND):
            if check_precision(precision) == "bf16":
                raise DenseprError(f"{base}: an ONNX reader runs as exported (float32, or DIR#int8), not in {precision}")
            model = OnnxReaderModel(base, int8=base != p)
            tokenizer = transformers.AutoTokenizer.from_pretrained(base, trust_remote_code=False)
            return cls(model, tokenizer, config or ReaderConfig.from_dir(base), name=str(Path(base).resolve()) + p[len(base):])
        path = check_model_dir(path, "reader")
        with load_errors(path, "reader"):
            hf = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
            model = load_reader_model(path, hf)  # DPRReader, or any other encoder with the same two heads
        check_vocab(path, tokenizer, model)
        cfg = config or ReaderConfig.from_dir(path)
        if cfg.max_length > max_positions(model.config):
            raise DenseprError(f"max_length {cfg.max_length} exceeds the model's {max_positions(model.config)} positions")
        dev = torch.device(device) if device is not None else default_device()
        reader = cls(model, tokenizer, cfg, name=str(path.resolve())).to(dev).eval()
        return reader.to(inference_dtype(dev, precision)) if precision != "fp32" else reader

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the network (a ``DPRReader`` directory for BERT-type encoders, else the encoder's directory plus
        ``reader_heads.safetensors``: :mod:`densepr.models.reader_model`) + tokenizer + ``densepr_reader.json``."""
        if not isinstance(self.model, nn.Module):
            raise DenseprError(f"{self.name}: an ONNX reader is not saved; tune and save the reader it came from, then export it again")
        save_model_dir(path, self.model, self.tokenizer, self.config.save, "reader")

    def fingerprint(self) -> str:
        """sha256 of what this reader's readings depend on besides their inputs: its weights as loaded
        (their precision included), its tokenizer and window settings; for an ONNX reader, its export's
        files and which model (``#int8``). Computed afresh each call (about a second for a BERT-base
        reader), so a reader replaced or changed in place has another fingerprint."""
        h = hashlib.sha256(json.dumps([self.config.max_length, self.config.stride, self.config.max_answer_length]).encode())
        h.update(self.tokenizer.backend_tokenizer.to_str().encode())
        if isinstance(self.model, nn.Module):
            for name, t in sorted(self.model.state_dict().items()):
                t = t.detach().cpu().contiguous()
                h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy())
        else:
            base = Path(self.name.removesuffix("#int8"))
            h.update(self.name[len(str(base)) :].encode())
            for name, sha in file_identity(base, [base], "sha256"):
                h.update(f"{name} {sha}".encode())
        return h.hexdigest()

    @property
    def device(self) -> torch.device:
        if not isinstance(self.model, nn.Module):  # ONNX Runtime, CPU
            return torch.device("cpu")
        return next(self.model.parameters()).device

    # -- the model ---------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[n, L] ids and mask -> start logits [n, L], end logits [n, L], selection logits [n]."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return out.start_logits, out.end_logits, out.relevance_logits

    @staticmethod
    def loss(start: torch.Tensor, end: torch.Tensor, relevance: torch.Tensor, text_mask: torch.Tensor,
             passage_mask: torch.Tensor, spans: Sequence[Sequence[tuple[int, int]]],
             shared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """DPR's reader loss for N questions x M passages (passage 0 of each question is the positive).

        Args:
            start, end: [N*M, L] logits; relevance: [N*M]; text_mask: [N*M, L] True on passage-text tokens;
            passage_mask: [N, M] True for real (not padding) passages; spans: per question, the
            (start, end) token positions of every answer occurrence in its positive window.
            shared: normalise start and end over the text of all M passages of a question, not the
                positive's alone (Clark & Gardner, 2018, "shared normalization"): the span head then
                also learns that negatives hold no answer, so span scores compare across passages.
        Returns:
            (selection loss, span loss), each averaged over the questions.
        """
        n, m = passage_mask.shape
        sel = relevance.view(n, m).masked_fill(~passage_mask, float("-inf"))
        selection = F.cross_entropy(sel, torch.zeros(n, dtype=torch.long, device=sel.device))
        if shared:  # [N, M*L]: the positive's positions are the first L, so the answer indices stay as they are
            width = start.shape[1]
            text = (text_mask.view(n, m, width) & passage_mask[:, :, None]).view(n, m * width)
            lp_start = start.reshape(n, m * width).masked_fill(~text, float("-inf")).log_softmax(-1)
            lp_end = end.reshape(n, m * width).masked_fill(~text, float("-inf")).log_softmax(-1)
        else:
            pos = torch.arange(n, device=start.device) * m
            lp_start = start[pos].masked_fill(~text_mask[pos], float("-inf")).log_softmax(-1)
            lp_end = end[pos].masked_fill(~text_mask[pos], float("-inf")).log_softmax(-1)
        span_terms = []
        for q, sp in enumerate(spans):
            s = torch.tensor([a for a, _ in sp], device=start.device)
            e = torch.tensor([b for _, b in sp], device=start.device)
            span_terms.append(-torch.logsumexp(lp_start[q, s] + lp_end[q, e], 0))
        return selection, torch.stack(span_terms).mean()

    # -- tokenisation ------------------------------------------------------------------------
    def question_ids(self, question: str) -> list[int]:
        """Token ids of a question; an empty or over-long question is an error."""
        if not isinstance(question, str) or not question.strip():
            raise DenseprError("empty question")
        ids = self.tokenizer(question, add_special_tokens=False)["input_ids"]
        room = self.config.max_length - 4 - MIN_TEXT_TOKENS
        if len(ids) > room:
            raise DenseprError(f"question is {len(ids)} tokens; with windows of {self.config.max_length} tokens "
                               f"the reader takes at most {room} (shorten it or raise max_length)")  # fmt: skip
        return ids

    def tokenize_texts(self, texts: Sequence[str]) -> list[Tokenized]:
        enc = self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
        return [Tokenized(enc["input_ids"][i], [tuple(o) for o in enc["offset_mapping"][i]],
                          [w if w is not None else -1 for w in enc.word_ids(i)]) for i in range(len(texts))]  # fmt: skip

    def windows(self, q_ids: list[int], title_ids: list[int], text: Tokenized, passage: int) -> list[Window]:
        """Cut one passage into windows that each hold the question and title (DPR's input layout)."""
        tok = self.tokenizer
        prefix = [tok.cls_token_id, *q_ids, tok.sep_token_id, *title_ids[:MAX_TITLE_TOKENS], tok.sep_token_id]
        room = self.config.max_length - len(prefix)
        if room < MIN_TEXT_TOKENS:  # a long title: shorten it rather than refuse
            prefix = [tok.cls_token_id, *q_ids, tok.sep_token_id, tok.sep_token_id]
            room = self.config.max_length - len(prefix)
        out, first, n_text = [], 0, len(text.ids)
        step = max(1, room - self.config.stride)
        while True:
            part = text.ids[first : first + room]
            out.append(Window([*prefix, *part], passage, len(prefix), first, len(part)))
            if first + room >= n_text:
                return out
            first += step

    def collate(self, windows: Sequence[Window]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Pad windows to the longest; also a mask of passage-text positions."""
        width = max(len(w.ids) for w in windows)
        ids = torch.full((len(windows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(windows), width), dtype=torch.long)
        text = torch.zeros((len(windows), width), dtype=torch.bool)
        for i, w in enumerate(windows):
            ids[i, : len(w.ids)] = torch.tensor(w.ids)
            att[i, : len(w.ids)] = 1
            text[i, w.text_start : w.text_start + w.n] = True
        dev = self.device
        return {"input_ids": ids.to(dev), "attention_mask": att.to(dev)}, text.to(dev)

    def forward_windows(self, windows: Sequence[Window], piece: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward many windows in length-sorted pieces, each padded only to its own longest window.

        Returns ``(start, end, relevance, text_mask)`` in the windows' order, logits padded to the
        longest window (padding positions are outside ``text_mask``, so the loss never sees them).
        The same logits as one padded forward, for less compute when lengths differ (training).
        """
        _, text_mask = self.collate(windows)
        width = text_mask.shape[1]
        order = sorted(range(len(windows)), key=lambda i: len(windows[i].ids))
        starts, ends, rels = [], [], []
        for b in range(0, len(order), piece):
            inputs, _ = self.collate([windows[i] for i in order[b : b + piece]])
            start, end, rel = self(**inputs)
            pad = width - start.shape[1]
            starts.append(F.pad(start, (0, pad), value=-1e4))
            ends.append(F.pad(end, (0, pad), value=-1e4))
            rels.append(rel)
        back = torch.empty(len(order), dtype=torch.long)
        back[torch.tensor(order)] = torch.arange(len(order))
        back = back.to(text_mask.device)
        return torch.cat(starts)[back], torch.cat(ends)[back], torch.cat(rels)[back], text_mask

    # -- inference ---------------------------------------------------------------------------
    def _best_span(self, start: np.ndarray, end: np.ndarray) -> tuple[float, int, int]:
        """Best (score, i, j) with i <= j < i + max_answer_length over one window's text logits."""
        n, cap = len(start), self.config.max_answer_length
        best = (float("-inf"), -1, -1)
        for length in range(min(cap, n)):
            cand = start[: n - length] + end[length:]
            i = int(cand.argmax())
            if cand[i] > best[0]:
                best = (float(cand[i]), i, i + length)
        return best

    @torch.inference_mode()
    def read(self, questions: Sequence[str], passages: Sequence[Sequence[tuple[str, str]]], batch_size: int = 64,
             progress=None, max_tokens: int | None = None, stop: Callable[[], bool] | None = None) -> list[list[Reading]]:  # fmt: skip
        """Read each question's passages ``(title, text)``; returns one :class:`Reading` per passage.

        All windows of all questions are batched together, longest first, each batch padded only to
        its own longest window and holding at most ``batch_size`` windows and ``max_tokens`` padded
        tokens (default: :data:`CPU_BATCH_TOKENS` on CPU, where small batches cost nothing and
        padding does; no limit on a GPU). ``stop``: asked before each batch; when it says True the
        reading ends with :class:`ReadingStopped` (a server whose clients have all gone stops there).
        """
        if len(questions) != len(passages):
            raise DenseprError(f"{len(questions)} questions but {len(passages)} passage lists")
        q_ids = [self.question_ids(q) for q in questions]
        flat = [(qi, pi, t, x) for qi, ps in enumerate(passages) for pi, (t, x) in enumerate(ps)]
        titles = self.tokenizer([f[2] for f in flat], add_special_tokens=False)["input_ids"] if flat else []
        texts = self.tokenize_texts([f[3] for f in flat]) if flat else []
        wins: list[tuple[int, Window]] = []
        for j, (qi, _, _, _) in enumerate(flat):
            wins += [(j, w) for w in self.windows(q_ids[qi], titles[j], texts[j], j)]
        readings = [Reading(float("-inf")) for _ in flat]
        order = sorted(range(len(wins)), key=lambda i: -len(wins[i][1].ids))
        budget = max_tokens or (CPU_BATCH_TOKENS if self.device.type == "cpu" else None)
        batches: list[list[int]] = []
        for i in order:  # longest first, so a batch's first window sets its padded width
            if not batches or len(batches[-1]) >= batch_size or (budget and (len(batches[-1]) + 1) * len(wins[batches[-1][0]][1].ids) > budget):
                batches.append([])
            batches[-1].append(i)
        for idx in batches:
            if stop is not None and stop():
                raise ReadingStopped(f"reading stopped with {len(idx)} windows of one chunk and more left")
            batch = [wins[i] for i in idx]
            inputs, _ = self.collate([w for _, w in batch])
            with autocast(self.device):
                start, end, rel = self(**inputs)
            start, end, rel = start.float().cpu().numpy(), end.float().cpu().numpy(), rel.float().cpu().numpy()
            for r, (j, w) in enumerate(batch):
                cur = readings[j]
                cur.relevance = max(cur.relevance, float(rel[r]))
                if w.n == 0:
                    continue
                s, i0, i1 = self._best_span(start[r, w.text_start : w.text_start + w.n], end[r, w.text_start : w.text_start + w.n])
                if s > cur.span_score:
                    tok = texts[j]
                    a, z = w.first + i0, w.first + i1
                    while a > 0 and tok.words[a - 1] == tok.words[a] >= 0:  # widen to whole words (DPR)
                        a -= 1
                    while z + 1 < len(tok.words) and tok.words[z + 1] == tok.words[z] >= 0:
                        z += 1
                    cur.span_score, cur.start, cur.end = s, tok.offsets[a][0], tok.offsets[z][1]
                    cur.text = flat[j][3][cur.start : cur.end]
            if progress:
                progress(len(batch))
        out: list[list[Reading]] = [[] for _ in questions]
        for (qi, _, _, _), r in zip(flat, readings):
            out[qi].append(r)
        return out


# -- distant supervision -----------------------------------------------------------------------
def find_answer_spans(reader: Reader, text: Tokenized, passage_text: str, answers: Sequence[str],
                      match: str = "string") -> list[tuple[int, int]]:  # fmt: skip
    """Every occurrence of any answer in a passage, as (first, last) text-token indices.

    ``string`` answers: the answer's word-piece ids as a contiguous subsequence of the
    passage's (DPR's ``_find_answer_positions``; the tokenizer lower-cases and strips accents
    as DPR's ``has_answer`` normalises). ``regex`` answers (CuratedTREC): each match of the
    pattern in the text, mapped to the tokens it covers.
    """
    spans: set[tuple[int, int]] = set()
    if match == "regex":
        for a in answers:
            try:
                pat = re.compile(a, flags=re.IGNORECASE | re.UNICODE | re.MULTILINE)
            except (re.error, OverflowError, RecursionError):
                continue
            for m in pat.finditer(passage_text):
                if m.end() <= m.start():
                    continue
                toks = [i for i, (s, e) in enumerate(text.offsets) if s < m.end() and e > m.start()]
                if toks:
                    spans.add((toks[0], toks[-1]))
        return sorted(spans)
    ids = text.ids
    for a in answers:
        a_ids = reader.tokenizer(a, add_special_tokens=False)["input_ids"]
        k = len(a_ids)
        if k == 0:
            continue
        for i in range(len(ids) - k + 1):
            if ids[i] == a_ids[0] and ids[i : i + k] == a_ids:
                spans.add((i, i + k - 1))
    return sorted(spans)


# -- ONNX export (here, not in models.onnx: that module runs exports and must not import the reader) --
def export_reader(reader_path: str | os.PathLike[str], out: str | os.PathLike[str], int8: bool = False) -> dict:
    """Export a trained reader (a ``DPRReader`` directory) to ``out``: ``model.onnx`` (input ids and
    mask -> start, end and selection logits), optionally ``model.int8.onnx``, the tokenizer and the
    reader's ``densepr_reader.json`` (windows, tuned k and selection). ``Reader.load(out)`` reads it."""
    from densepr.models.onnx import READER_KIND, write_export

    reader = Reader.load(reader_path, device="cpu")

    class Logits(torch.nn.Module):  # plain tensors out, in DPRReader's order
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            o = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
            return o.start_logits, o.end_logits, o.relevance_logits

    def write(tmp: Path) -> None:
        reader.tokenizer.save_pretrained(tmp)
        reader.config.save(tmp)
        q = reader.question_ids("who")  # any short input: the axes are dynamic
        t = reader.tokenize_texts(["Karpukhin and others wrote it in 2020, at Facebook AI."])[0]
        inputs, _ = reader.collate([w for i in range(2) for w in reader.windows(q, [], t, i)])
        axes = {0: "batch", 1: "seq"}
        with torch.inference_mode():
            torch.onnx.export(Logits(reader.model).eval(), (inputs["input_ids"], inputs["attention_mask"]), str(tmp / "model.onnx"),
                              input_names=["input_ids", "attention_mask"], output_names=["start", "end", "relevance"],
                              dynamic_axes={"input_ids": axes, "attention_mask": axes, "start": axes, "end": axes, "relevance": {0: "batch"}},
                              opset_version=17, dynamo=False)  # fmt: skip

    return write_export(out, READER_KIND, int8, reader.name, write,
                         max_position_embeddings=int(reader.model.config.max_position_embeddings))
