"""AdamW with BERT's weight-decay groups and the linear warm-up / decay schedule (as DPR)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


# -- the loop --------------------------------------------------------------------------------------
def linear_schedule(opt, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def adamw(params: Sequence[torch.nn.Parameter], lr: float, weight_decay: float, eps: float) -> torch.optim.AdamW:
    """AdamW; biases and LayerNorm weights (1-d parameters) take no weight decay, as usual for BERT."""
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}], lr=lr, eps=eps)  # fmt: skip


def optimizer_step(params: Sequence[torch.nn.Parameter], opt: torch.optim.Optimizer, sched, max_grad_norm: float) -> float:
    """Clip the gradient norm, step optimizer and schedule, clear gradients; returns the norm before clipping."""
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm
