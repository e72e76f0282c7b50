"""Training steps in bfloat16 autocast on the CPU against float32, side by side (``--precision bf16`` of
``train`` / ``train-reader``).

CPUs with native bf16 (AVX512-BF16, AMX) may run a bf16-autocast step faster. This times one forward +
backward of the two models the paper's experiment trains, at its shapes, in float32 and under the trainers'
own policy (``densepr.models.hf.autocast(..., precision="bf16")``), and reports the speed-up and how far
the loss and gradient move:

- the reader (DPRReader from the embedded MiniLM): ``--windows`` windows of ``--length`` tokens;
- one tower of the bi-encoder (the embedded MiniLM, [CLS]): ``--passages`` passages of ``--length`` tokens.

    python benchmarks/training/train_precision.py [--windows 64] [--passages 64] [--length 160] [--steps 3]

Timing only: whether bf16 training reaches the same accuracy needs a training run. Prints a table and writes
benchmarks/training/results/train-precision.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, shared by every group
from common import machine_info

from densepr.data import EmbeddedData
from densepr.fileio.atomic import write_json
from densepr.models.hf import autocast, cpu_has_bf16

RESULTS = Path(__file__).resolve().parent / "results"


def measure(model: torch.nn.Module, loss_fn, steps: int) -> dict:
    """Median seconds of a forward + backward, the loss and the gradient norm, per precision."""
    out = {}
    for name, precision in (("fp32", "fp32"), ("bf16-autocast", "bf16")):
        times, loss, norm = [], 0.0, 0.0
        for i in range(steps + 1):  # the first is a warm-up
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            with autocast(torch.device("cpu"), training=True, precision=precision):
                value = loss_fn(model)
            value.backward()
            if i:
                times.append(time.perf_counter() - t0)
            loss = float(value)
            norm = float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None)))
        out[name] = {"seconds": round(statistics.median(times), 3), "loss": loss, "grad_norm": norm}
    f, b = out["fp32"], out["bf16-autocast"]
    out["speedup"] = round(f["seconds"] / b["seconds"], 2)
    out["loss_rel_diff"] = round(abs(b["loss"] - f["loss"]) / max(abs(f["loss"]), 1e-12), 5)
    out["grad_norm_rel_diff"] = round(abs(b["grad_norm"] - f["grad_norm"]) / max(f["grad_norm"], 1e-12), 5)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=64, help="reader windows per step (32 questions x M = 2)")
    ap.add_argument("--passages", type=int, default=64, help="passages per bi-encoder step")
    ap.add_argument("--length", type=int, default=160, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("-o", "--json", type=Path, default=RESULTS / "train-precision.json")
    args = ap.parse_args()
    import transformers

    from densepr.models.reader import Reader, ReaderConfig

    torch.manual_seed(0)
    model_dir = EmbeddedData().model_dir
    rows = {}
    # eval(): dropout off, so both precisions compute the same function (the reader recipe trains without dropout)
    reader = Reader.load(model_dir, "cpu", ReaderConfig(max_length=192)).model.eval()
    ids = torch.randint(1000, 20000, (args.windows, args.length))
    ids[:, 0] = 101
    mask = torch.ones_like(ids)

    def reader_loss(m):
        o = m(input_ids=ids, attention_mask=mask)
        return o.start_logits.float().logsumexp(1).mean() + o.end_logits.float().logsumexp(1).mean() + o.relevance_logits.float().logsumexp(0)

    rows["reader"] = measure(reader, reader_loss, args.steps)
    encoder = transformers.AutoModel.from_pretrained(model_dir, use_safetensors=True, trust_remote_code=False).eval()
    pids = torch.randint(1000, 20000, (args.passages, args.length))
    pids[:, 0] = 101

    def encoder_loss(m):
        cls = m(input_ids=pids, attention_mask=torch.ones_like(pids)).last_hidden_state[:, 0].float()
        return torch.nn.functional.cross_entropy(cls @ cls.T, torch.arange(len(cls)))

    rows["bi-encoder tower"] = measure(encoder, encoder_loss, args.steps)
    print(f"\nforward + backward, median of {args.steps} steps, {torch.get_num_threads()} threads, CPU native bf16: {cpu_has_bf16()}")
    print("| model | shape | fp32 s | bf16 autocast s | speed-up | loss rel. diff | grad-norm rel. diff |\n|---|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        shape = f"{args.windows if name == 'reader' else args.passages} x {args.length}"
        print(f"| {name} | {shape} | {r['fp32']['seconds']} | {r['bf16-autocast']['seconds']} | {r['speedup']}x | {r['loss_rel_diff']} | {r['grad_norm_rel_diff']} |")
    write_json(args.json, {"command": f"python benchmarks/training/train_precision.py --windows {args.windows} --passages {args.passages} --length {args.length} --steps {args.steps}",
                           "date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "cpu_native_bf16": cpu_has_bf16(),
                           "threads": torch.get_num_threads(), "results": rows})  # fmt: skip
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
