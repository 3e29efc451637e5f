"""The optimizer side of a step, on the device and without a host sync: the backward (scaled under fp16) and the
update that is skipped when a gradient is inf or NaN, with the gradient norm it logs."""

from __future__ import annotations

import torch


def grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """L2 norm of all gradients, on the device (no host sync)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())


def backward(loss: torch.Tensor, scaler) -> None:
    """`scaler`: accelerate's GradScaler under fp16, else None."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


def update(opt: torch.optim.Optimizer, module: torch.nn.Module, scaler) -> tuple[torch.Tensor, torch.Tensor]:
    """opt.step(), skipped when a gradient is inf or NaN; returns (gradient norm, skipped). No host sync.

    The gradients are already all-reduced, so every rank sees the same norm and skips the same steps.
    """
    if scaler is not None:
        scaler.unscale_(opt)
    norm = grad_norm(module)
    bad = ~torch.isfinite(norm)
    if scaler is not None:  # fp16: the scaler skips the step itself (and lowers its scale)
        scaler.step(opt)
        scaler.update()
    else:  # fused Adam takes the flag and skips the update on the device
        opt.found_inf = bad.float()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm, bad
