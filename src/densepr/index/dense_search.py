"""Exact inner-product top-k as torch matrix products (the GPU path, and small flat indexes on a CPU)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

# Batched exact search on a CPU: one torch GEMM + top-k per block beats FAISS's blocked BLAS + heaps on
# small indexes (10k x 384, batch 256: 1.7x) but not on large ones (100k x 768: 0.85x; 1M x 768: 0.65x),
# measured on the 2-core benchmark machine (docs/speed-and-scale.md, Scale).
TORCH_CPU_MAX = 16_000_000  # vectors x dims


def torch_topk(q: np.ndarray, k: int, parts: Iterable, block: int = 262_144) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k over ``parts`` (torch ``[n_i, dim]`` tensors, in row order; any iterable,
    so parts may be made one at a time) as one matrix product per block of passages, keeping a running
    top-k, so the [queries x passages] score matrix never exists whole. Returns ``(scores, rows)`` as numpy arrays."""
    import torch

    qt = best_sc = best_ix = None
    offset = 0
    for vecs in parts:  # shards in row order
        if qt is None:  # the first part gives the device and dtype
            qt = torch.as_tensor(q).to(device=vecs.device, dtype=vecs.dtype)
            best_sc = torch.full((len(q), 0), -torch.inf, device=vecs.device)
            best_ix = torch.zeros((len(q), 0), dtype=torch.long, device=vecs.device)
        for start in range(0, len(vecs), block):
            sc = (qt @ vecs[start : start + block].T).float()
            sc, ix = torch.topk(sc, min(k, sc.shape[1]), dim=1)
            best_sc, order = torch.topk(torch.cat([best_sc, sc], 1), min(k, best_sc.shape[1] + sc.shape[1]), dim=1)
            best_ix = torch.gather(torch.cat([best_ix, ix + offset + start], 1), 1, order)
        offset += len(vecs)
    if qt is None:
        raise ValueError("torch_topk needs at least one part")
    return best_sc.cpu().numpy(), best_ix.cpu().numpy()
