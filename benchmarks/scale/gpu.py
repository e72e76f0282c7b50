"""Every GPU measurement the project asks for (none recorded yet: no GPU was lent to a session), in one script (under 8 minutes on one H100/H200-class GPU), one JSON.

Models are BERT-base shaped (12 layers, 768 hidden, the paper's encoders) with random weights and a
synthetic 30,522-word vocabulary: speed does not depend on the weights, and the GPU machine has no model
hub. Every figure goes through densepr's own code:

* ``encode``: :meth:`Encoder.encode_passages` (length-sorted batches, bf16 autocast) on ``--passages``
  100-word passages with titles; passages/s, and the fraction of the GPU's dense bf16 peak that is
  (forward FLOPs: 2 x parameters x tokens + attention);
* ``search``: exact flat search (:func:`densepr.index.dense_search.torch_topk`, the ``--device cuda`` path) over
  1M and 10M x 768 float16 vectors, top-100, batches of 1,024 questions; questions/s;
* ``train``: one DPR step (:func:`densepr.train.gradcache.loss_and_backward` + AdamW) at batch 128, one
  hard negative per question, separate towers; questions/s over the median step;
* ``reader``: :meth:`Reader.read` of 100 passages for one question; median latency.

    python benchmarks/scale/gpu.py                 # on the GPU machine
    python benchmarks/scale/gpu.py --tiny          # the same code at toy sizes on a CPU (what the test runs)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, shared by every group
from common import machine_info

from densepr.fileio.atomic import write_json

RESULTS = Path(__file__).resolve().parent / "results"

# Dense bf16 tensor-core peak (TFLOP/s, without sparsity) by device name, from the vendors' data sheets.
BF16_PEAK = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "4090": 165.0}
VOCAB = 30_522


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def make_model(root: Path, layers: int, hidden: int, heads: int, intermediate: int, positions: int) -> Path:
    """A randomly initialised BERT with a synthetic word-level vocabulary ("w5" ... "w30521")."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(5, VOCAB)]
    (root / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(root / "vocab.txt"), do_lower_case=True).save_pretrained(root)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=intermediate, max_position_embeddings=positions)  # fmt: skip
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(root, safe_serialization=True)
    return root


def words(rng: np.random.Generator, n: int) -> str:
    return " ".join(f"w{i}" for i in rng.integers(5, VOCAB, n))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_encode(model: Path, device: str, n: int, batch: int, rng) -> dict:
    from densepr.models.encoder import Encoder, EncoderConfig

    enc = Encoder.load(model, EncoderConfig(pooling="cls", max_length=256), device=device)
    titles, texts = [words(rng, 3) for _ in range(n)], [words(rng, 100) for _ in range(n)]
    enc.encode_passages(titles[:batch], texts[:batch], batch)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    enc.encode_passages(titles, texts, batch)
    sync(device)
    dt = time.perf_counter() - t0
    tokens = 3 + 3 + 100  # [CLS] title [SEP] text [SEP]
    cfg = enc.model.config
    params = sum(p.numel() for name, p in enc.model.named_parameters() if "embeddings" not in name)
    flops = 2 * params * tokens + 4 * cfg.num_hidden_layers * tokens * tokens * cfg.hidden_size
    rate = n / dt
    peak = peak_tflops(torch.cuda.get_device_name() if device.startswith("cuda") else "")
    return {"passages": n, "batch_size": batch, "seconds": round(dt, 2), "passages_per_s": round(rate, 1),
            "tflops": round(rate * flops / 1e12, 2), "bf16_peak_tflops": peak,
            "fraction_of_peak": round(rate * flops / 1e12 / peak, 3) if peak else None}  # fmt: skip


def bench_search(device: str, sizes: list[int], dim: int, queries: int, k: int = 100) -> list[dict]:
    from densepr.index.dense_search import torch_topk

    out = []
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    for n in sizes:
        gen = torch.Generator(device=device).manual_seed(0)
        vecs = torch.randn(n, dim, device=device, dtype=dtype, generator=gen)
        q = torch.randn(queries, dim, generator=torch.Generator().manual_seed(1)).numpy()
        torch_topk(q[:64], k, [vecs])  # warm-up
        sync(device)
        t0 = time.perf_counter()
        for s in range(0, queries, 1024):
            torch_topk(q[s : s + 1024], k, [vecs])
        sync(device)
        dt = time.perf_counter() - t0
        out.append({"vectors": n, "dim": dim, "dtype": str(dtype).replace("torch.", ""), "queries": queries, "k": k,
                    "questions_per_s": round(queries / dt, 1)})  # fmt: skip
        del vecs
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def bench_train(model: Path, device: str, batch: int, steps: int, rng) -> dict:
    from densepr.models.encoder import BiEncoder, Encoder, EncoderConfig
    from densepr.train.distributed import Dist
    from densepr.train.gradcache import loss_and_backward

    cfg = EncoderConfig(pooling="cls", max_length=256)
    bi = BiEncoder(Encoder.load(model, cfg, device=device), Encoder.load(model, cfg, device=device))
    bi.train()
    opt = torch.optim.AdamW(bi.parameters(), lr=1e-5)
    enc = bi.question
    times = []
    for step in range(steps + 1):
        qs = [words(rng, 12) for _ in range(batch)]
        ps = [(words(rng, 3), words(rng, 100)) for _ in range(2 * batch)]  # positive + hard negative per question
        sync(device)
        t0 = time.perf_counter()
        q_in = {k: v.to(device) for k, v in enc.collate(enc.tokenize_questions(qs)).items()}
        p_in = {k: v.to(device) for k, v in enc.collate(enc.tokenize_passages([t for t, _ in ps], [x for _, x in ps])).items()}
        loss_and_backward(bi, q_in, p_in, torch.arange(0, 2 * batch, 2, device=device), Dist())
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if step:  # the first step warms up
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {"batch_size": batch, "hard_negatives": 1, "steps": steps, "median_step_s": round(med, 3),
            "questions_per_s": round(batch / med, 1), "peak_gpu_gib": round(mem, 2) if mem else None}  # fmt: skip


def bench_reader(model: Path, device: str, passages: int, repeats: int, rng) -> dict:
    from densepr.models.reader import Reader, ReaderConfig

    reader = Reader.load(model, device, ReaderConfig(max_length=256))
    reader.eval()
    lat = []
    for r in range(repeats + 1):
        q, ps = words(rng, 12), [(words(rng, 3), words(rng, 100)) for _ in range(passages)]
        sync(device)
        t0 = time.perf_counter()
        reader.read([q], [ps])
        sync(device)
        if r:
            lat.append(time.perf_counter() - t0)
    return {"passages": passages, "repeats": repeats, "median_ms": round(1000 * statistics.median(lat), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (a 2-layer model, thousands of vectors): the CPU test")
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    t_start = time.perf_counter()
    if args.tiny:
        shape, n_enc, enc_batch, sizes, queries, train_batch, steps, read_n = (2, 64, 2, 128, 512), 64, 32, [2_000, 5_000], 256, 8, 2, 10
    else:
        shape, n_enc, enc_batch, sizes, queries, train_batch, steps, read_n = (12, 768, 12, 3072, 512), 50_000, 512, [1_000_000, 10_000_000], 8_192, 128, 5, 100
    result = {"machine": machine_info(), "device": args.device, "tiny": args.tiny,
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "model": {"layers": shape[0], "hidden": shape[1], "heads": shape[2], "weights": "random (speed only)"}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp) / "bert", *shape)
        for name, fn in (("encode", lambda: bench_encode(model, args.device, n_enc, enc_batch, rng)),
                         ("search", lambda: bench_search(args.device, sizes, 768, queries)),
                         ("train", lambda: bench_train(model, args.device, train_batch, steps, rng)),
                         ("reader", lambda: bench_reader(model, args.device, read_n, 5, rng))):  # fmt: skip
            t0 = time.perf_counter()
            result[name] = fn()
            print(f"{name:>7} ({time.perf_counter() - t0:.0f} s): {result[name]}", flush=True)
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    write_json(args.out, result)
    print(f"done in {result['seconds']} s; written to {args.out}")


if __name__ == "__main__":
    main()
