"""densepr's reader against the standard Hugging Face extractive-QA recipe, at equal compute.

Both start from the same initial weights (the embedded all-MiniLM-L6-v2, new heads) and train on the
same questions of a `densepr reproduce --profile dpr` run's reader data (``<run>/reader-data/``: the
trained retriever's top passages for nq-dev + trivia-dev, held-out questions removed):

* densepr: :func:`densepr.train.reader.train_reader` with the run's reader settings (per step, per
  question one answer-bearing passage and M-1 answerless ones: selection + span loss), ``--steps`` steps;
* Hugging Face: ``AutoModelForQuestionAnswering`` trained by ``transformers.Trainer`` on the answer-bearing
  passages (SQuAD's recipe, as in transformers' ``run_qa.py``: context windows of the same length with a
  stride, padded to it, the answer's first occurrence as the label, [CLS] when a window misses it), for the
  same wall time densepr took.

Then both read, for the same held-out questions, only the best-ranked answer-bearing passage of the
retriever's list (``<run>/reader-data/heldout.json``) and the exact match (DPR's normalisation) and F1
of their best span are reported. Prints a table; writes ``benchmarks/reader/results/reader-peer.json``.

    python benchmarks/reader/reader_peer.py --run runs/dpr [--steps 60] [--eval 500] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, shared by every group
from common import gold_passages, machine_info, reader_recipe, span_scores

from densepr.data import EmbeddedData
from densepr.errors import DenseprError
from densepr.fileio.atomic import write_json
from densepr.models.reader import Reader
from densepr.train.config import ReaderTrainConfig
from densepr.train.reader import load_reader_examples, train_reader

RESULTS = Path(__file__).resolve().parent / "results"


def hf_features(tok, questions, contexts, max_length: int, stride: int):
    return tok(questions, contexts, truncation="only_second", max_length=max_length, stride=stride,
               return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length")  # fmt: skip


def hf_train_set(tok, examples, max_length: int, stride: int) -> list[dict]:
    """run_qa.py's prepare_train_features on every answer-bearing passage: one labelled row per window."""
    qs, ctxs, starts, answers = [], [], [], []
    for ex in examples:
        for _, text in ex.positives:
            low = text.lower()
            hits = [(low.find(a.lower()), a) for a in ex.answers if a and low.find(a.lower()) >= 0]
            if not hits:
                continue  # matched under DPR's token rule only (e.g. punctuation): no character label
            start, ans = min(hits)
            qs.append(ex.question), ctxs.append(text), starts.append(start), answers.append(len(ans))
    enc = hf_features(tok, qs, ctxs, max_length, stride)
    rows = []
    for i, offsets in enumerate(enc["offset_mapping"]):
        j = enc["overflow_to_sample_mapping"][i]
        s_char, e_char = starts[j], starts[j] + answers[j]
        seq = enc.sequence_ids(i)
        ctx = [t for t, s in enumerate(seq) if s == 1]
        s_tok = e_tok = 0  # [CLS]: the answer is not in this window
        if ctx and offsets[ctx[0]][0] <= s_char and offsets[ctx[-1]][1] >= e_char:
            s_tok = next(t for t in ctx if offsets[t][1] > s_char)
            e_tok = next(t for t in reversed(ctx) if offsets[t][0] < e_char)
        rows.append({"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                     "token_type_ids": enc["token_type_ids"][i], "start_positions": s_tok, "end_positions": e_tok})  # fmt: skip
    return rows


def hf_predict(model, tok, gold, max_length: int, stride: int, max_answer_tokens: int, device) -> list[str]:
    """run_qa.py's postprocessing: the best (start + end logit) context span over a passage's windows."""
    enc = hf_features(tok, [g[0] for g in gold], [g[3] for g in gold], max_length, stride)
    best: dict[int, tuple[float, str]] = {}
    model.eval()
    for b in range(0, len(enc["input_ids"]), 64):
        batch = {k: torch.tensor(enc[k][b : b + 64], device=device) for k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.inference_mode():
            out = model(**batch)
        for r, (s_log, e_log) in enumerate(zip(out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy())):
            i = b + r
            seq, offsets, j = enc.sequence_ids(i), enc["offset_mapping"][i], enc["overflow_to_sample_mapping"][i]
            ctx = np.array([s == 1 for s in seq])
            s_log, e_log = np.where(ctx, s_log, -1e9), np.where(ctx, e_log, -1e9)
            for s in np.argsort(s_log)[::-1][:20]:
                for e in np.argsort(e_log)[::-1][:20]:
                    if ctx[s] and ctx[e] and s <= e < s + max_answer_tokens:
                        score = float(s_log[s] + e_log[e])
                        if j not in best or score > best[j][0]:
                            best[j] = (score, gold[j][3][offsets[s][0] : offsets[e][1]])
    return [best.get(j, (0.0, ""))[1] for j in range(len(gold))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/dpr"), help="a `densepr reproduce --profile dpr` output directory")
    ap.add_argument("--init", type=Path, default=None, help="initial weights (default: the embedded all-MiniLM-L6-v2)")
    ap.add_argument("--steps", type=int, default=60, help="densepr's training steps; Hugging Face gets the same wall time")
    ap.add_argument("--eval", type=int, default=500, help="held-out questions read")
    ap.add_argument("--hf-lr", type=float, default=5e-5, help="the Trainer's learning rate (its default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workdir", type=Path, default=Path("runs/reader-peer"))
    ap.add_argument("--out", default="reader-peer.json", help="file name under benchmarks/reader/results/")
    args = ap.parse_args()
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    data_dir = args.run / "reader-data"
    heldout = data_dir / "heldout.json"
    train_files = sorted(str(p) for p in data_dir.glob("*.json") if p.name != "heldout.json")
    if not heldout.is_file() or not train_files:
        raise SystemExit(f"{data_dir}: no reader data; run `densepr reproduce --profile dpr -o {args.run}` first")
    init = args.init or EmbeddedData().model_dir
    rp = reader_recipe(args.run)  # densepr's side trains as the run's reader did (M, loss, learning rates), for --steps
    gold = gold_passages(heldout, args.eval)

    from densepr.fileio.dirs import remove_tree, writable_dir

    writable_dir(args.workdir, "reader_peer work directory", ("densepr/", "hf/"))  # anything else there: refused, not deleted
    remove_tree(args.workdir)  # a fresh run each time: both sides start from the initial weights
    # densepr
    from densepr.train.mining import heldout_path

    held_qa = heldout_path(args.run / "train-data" / "train-dev.json")  # the held-out questions, never trained on
    cfg = ReaderTrainConfig(train_files=train_files, output_dir=str(args.workdir / "densepr"), init=str(init),
                            holdout=[str(held_qa)], max_steps=args.steps, save_every=10**9, epochs=100, **rp)  # fmt: skip
    t0 = time.perf_counter()
    train_reader(cfg, device=args.device, show_progress=False, log=print)
    budget = time.perf_counter() - t0
    ours = Reader.load(args.workdir / "densepr" / "final", args.device)
    ours.eval()
    readings = ours.read([g[0] for g in gold], [[(g[2], g[3])] for g in gold])
    densepr_scores = span_scores([r[0].text for r in readings], gold)
    n_questions = args.steps * cfg.batch_size

    # Hugging Face, for the same wall time (data preparation included, as densepr's)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(init), trust_remote_code=False)
    examples, _ = load_reader_examples(cfg, ours)  # the same questions and answer-bearing passages
    rows = hf_train_set(tok, examples, cfg.max_length, stride=64)
    model = AutoModelForQuestionAnswering.from_pretrained(str(init), use_safetensors=True, trust_remote_code=False)

    class WallClock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if time.perf_counter() - t0 >= budget:
                control.should_training_stop = True

    targs = TrainingArguments(output_dir=str(args.workdir / "hf"), per_device_train_batch_size=cfg.batch_size,
                              learning_rate=args.hf_lr, warmup_steps=cfg.warmup_steps, max_steps=10**6, save_strategy="no",
                              logging_strategy="no", report_to=[], use_cpu=args.device == "cpu", seed=cfg.seed,
                              dataloader_num_workers=0, disable_tqdm=True)  # fmt: skip
    trainer = Trainer(model=model, args=targs, train_dataset=rows, callbacks=[WallClock()])
    trainer.train()
    hf_seconds = time.perf_counter() - t0
    hf_steps = trainer.state.global_step
    hf_preds = hf_predict(model, tok, gold, cfg.max_length, 64, ours.config.max_answer_length, torch.device(args.device))
    hf_scores = span_scores(hf_preds, gold)

    result = {
        "machine": machine_info(),
        "run": str(args.run),
        "held_out_questions": len(gold),
        "densepr": {"seconds": round(budget, 1), "steps": args.steps, "questions_trained": n_questions,
                    "passages_per_question": cfg.passages, "lr": cfg.lr, "head_lr": cfg.head_lr, "span_loss": cfg.span_loss, **densepr_scores},
        "huggingface": {"seconds": round(hf_seconds, 1), "steps": hf_steps, "windows_trained": hf_steps * cfg.batch_size,
                        "answer_bearing_windows": len(rows), "lr": args.hf_lr, **hf_scores},
        "command": f"python benchmarks/reader/reader_peer.py --run {args.run} --steps {args.steps} --eval {args.eval}",
    }  # fmt: skip
    print(f"\nEM / F1 given the answer-bearing passage, {len(gold)} held-out questions ({args.run}), equal wall time")
    print("| reader | train s | steps | EM | F1 |\n|---|---:|---:|---:|---:|")
    for name, r in (("densepr (selection + span, M passages)", result["densepr"]), ("HF Trainer, AutoModelForQuestionAnswering", result["huggingface"])):
        print(f"| {name} | {r['seconds']} | {r['steps']} | {r['em']} | {r['f1']} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / args.out, result)


if __name__ == "__main__":
    try:
        main()
    except DenseprError as e:
        raise SystemExit(f"error: {e}") from None
