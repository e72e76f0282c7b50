"""Several training processes (torchrun): one global batch across them, exactly.

Embeddings are all-gathered so every question sees the passages of all processes; each process
puts its own, differentiable slice back in the gathered tensor, and gradients are summed across
processes, which gives exactly the single-process gradient of the global batch. Labels are
shifted by the passages of the processes before this one."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


# -- processes -------------------------------------------------------------------------------------
@dataclass
class Dist:
    """This process's place among ``world`` processes (world 1: no torch.distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device) -> Dist:
        """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR...), if any."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())


def _gather_rows(x: torch.Tensor, d: Dist) -> tuple[torch.Tensor, list[int]]:
    """All-gather a [n_r, ...] tensor whose n_r may differ per process; returns the concatenation
    (no gradient) and every process's row count."""
    n = torch.tensor([len(x)], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(d.world)]
    dist.all_gather(sizes, n)
    sizes_i = [int(s) for s in sizes]
    pad = torch.zeros((max(sizes_i), *x.shape[1:]), dtype=x.dtype, device=x.device)
    pad[: len(x)] = x
    parts = [torch.zeros_like(pad) for _ in range(d.world)]
    dist.all_gather(parts, pad.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes_i)]), sizes_i


def global_batch(q: torch.Tensor, p: torch.Tensor, positive: torch.Tensor, d: Dist) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, slice, slice]:
    """Questions and passages of all processes, this process's slices kept differentiable.

    Returns ``(Q, P, positive, my_q_rows, my_p_rows)`` where ``positive`` indexes ``P``
    (each process's positions shifted by the passages of the processes before it).
    """
    if d.world == 1:
        return q, p, positive, slice(0, len(q)), slice(0, len(p))
    q_all, q_sizes = _gather_rows(q.detach(), d)
    p_all, p_sizes = _gather_rows(p.detach(), d)
    pos_all, _ = _gather_rows(positive, d)
    q_off, p_off = sum(q_sizes[: d.rank]), sum(p_sizes[: d.rank])
    mine_q, mine_p = slice(q_off, q_off + len(q)), slice(p_off, p_off + len(p))
    # Put the local, differentiable embeddings back in place of their gathered copies.
    q_all = torch.cat([q_all[:q_off], q, q_all[mine_q.stop :]])
    p_all = torch.cat([p_all[:p_off], p, p_all[mine_p.stop :]])
    shift = torch.repeat_interleave(torch.tensor(np.cumsum([0, *p_sizes[:-1]]), device=q.device), torch.tensor(q_sizes, device=q.device))
    return q_all, p_all, pos_all + shift, mine_q, mine_p


def sum_gradients(params: Sequence[torch.nn.Parameter], d: Dist) -> None:
    """Sum gradients over processes: each holds the global loss's gradient through its own slice."""
    if d.world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
