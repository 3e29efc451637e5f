"""Synchronized BatchNorm on every device and backend, and a cross-rank consistency check.

torch's `nn.SyncBatchNorm` refuses CPU tensors, so CPU runs over gloo use `DistributedBatchNorm`:
in training mode it all-reduces the per-channel statistics of every rank's batch, and the
all-reduce is differentiable, so the outputs, input gradients, parameter gradients and running
statistics are those of one `nn.BatchNorm*d` applied to the concatenation of all ranks' batches.
`convert_sync_batchnorm` picks torch's kernel on CUDA and this one elsewhere.

THE RULE every caller must obey
-------------------------------
With synchronized BN every forward of a network in training mode is a collective (here two
all-reduces per BN layer, and two more in its backward; torch's CUDA kernel: one all-gather and
one all-reduce). Every rank must therefore run the same number of training-mode forwards (and
backwards) of each network, in the same order, under no_grad too. In a GAN
step that is: G's forward, D's forward on the real batch, D's forward on the fake batch, and D's
forward in the G phase, on every rank, every step, even when a rank has nothing left to learn
from (a rank whose batch is empty still calls forward: it contributes a count of zero). A rank
that skips or adds a forward makes the others wait in an all-reduce it never joins: the job
hangs until the process-group timeout (`init_process_group(timeout=...)`) and then fails. Worse,
a rank that skips one forward but goes on to the next collective of the same size pairs two
different all-reduces and computes wrong statistics silently until the counts drift apart.
Eval-mode forwards use the running statistics and communicate nothing; `check_consistency` is a
collective too and must be called at the same step on every rank.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: the gradient of a sum is the sum of the gradients.

    `torch.distributed.nn.functional.all_reduce` is this, but torch 2.14 deprecates it (FutureWarning)
    and its suggested replacement (`_functional_collectives.all_reduce`) is private and
    differentiable only in recent releases; these are the same few lines on public API.
    """

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce writes in place
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _world_size(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class DistributedBatchNorm(_BatchNorm):
    """BatchNorm over inputs [N, C, *] whose training statistics span all ranks of `process_group`.

    Not distributed (no process group, or one rank) or not training: exactly `nn.BatchNorm*d`.
    Mixed precision: statistics and normalisation run in fp32 with autocast off, and the output has
    the input's dtype, which is what `nn.BatchNorm2d` does under CPU bf16 and CUDA fp16 autocast
    (bf16 in, bf16 out, fp32 running statistics).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group  # None: the default (world) group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input [N, C, *] (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training or _world_size(self.process_group) < 2:
            return super().forward(x)  # eval mode never communicates, even without running stats
        with torch.autocast(x.device.type, enabled=False):
            y, mean, var, count = self._normalize(x)
        if self.track_running_stats:
            self._update_running_stats(mean, var, count)
        return y.to(x.dtype)

    def _normalize(self, x):
        shape = [1, -1] + [1] * (x.dim() - 2)  # broadcast per channel over [N, C, *]
        dims = [0] + list(range(2, x.dim()))
        x32 = x.float()
        # Two passes, two all-reduces: the global mean first, then the global sum of squares around it.
        # One pass (sum, sum of squares) loses about (mean/std)^2 ulps of the variance to cancellation
        # in fp32, and a shift needs a value every rank agrees on before any communication; the
        # centred pass is as stable as nn.BatchNorm's own, for one more all-reduce of C floats.
        local = torch.cat([x32.sum(dims), x32.new_full((1,), x.numel() // x.shape[1])])  # [C + 1]
        total = _AllReduceSum.apply(local, self.process_group)
        count = total[-1].detach()  # rows x pixels over all ranks; ranks may hold different batches
        mean = total[:-1] / count
        centred = x32 - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims), self.process_group) / count  # biased
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.float()
        y = centred * scale.view(shape)
        if self.bias is not None:
            y = y + self.bias.float().view(shape)
        return y, mean, var, count

    @torch.no_grad()
    def _update_running_stats(self, mean, var, count):
        # Same rule as nn.BatchNorm: unbiased variance (with the GLOBAL count), momentum or a
        # cumulative average when momentum is None.
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked)  # a device sync, as in nn.BatchNorm
        else:
            factor = self.momentum
        unbiased = var * (count / (count - 1))
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


def convert_sync_batchnorm(module: nn.Module, device_type: str, process_group=None) -> nn.Module:
    """Replace every BatchNorm{1,2,3}d in `module` by a synchronized one; returns the new module.

    `device_type == "cuda"`: torch's `nn.SyncBatchNorm` (its fused kernels); any other device:
    `DistributedBatchNorm` (for an `nn.SyncBatchNorm` too, which would refuse CPU tensors). The new
    layers take over the old layers' Parameter and buffer objects (values, requires_grad, device,
    dtype; an optimizer built earlier keeps working) under the same names, so state_dict keys do
    not change.
    """
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    if isinstance(module, _BatchNorm) and not isinstance(module, DistributedBatchNorm):  # SyncBatchNorm too
        group = process_group if process_group is not None else getattr(module, "process_group", None)
        bn = DistributedBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats, group)
        for name in ("weight", "bias"):
            setattr(bn, name, getattr(module, name))  # the same Parameter (or None: BatchNorm(bias=False))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(bn, name, getattr(module, name))  # the same buffer (or None)
        bn.train(module.training)
        return bn
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child, device_type, process_group))
    return module


def _checksums(t: torch.Tensor) -> torch.Tensor:
    """[3] float64: sum, position-weighted sum (catches swaps), and where the non-finite values are."""
    t = t.detach().flatten().double()
    w = torch.linspace(1.0, 2.0, t.numel(), dtype=torch.float64, device=t.device)
    finite = t.isfinite()
    code = torch.where(t.isnan(), 1.0, torch.where(t > 0, 2.0, 3.0))  # nan / +inf / -inf
    values = torch.where(finite, t, 0.0)
    return torch.stack([values.sum(), (values * w).sum(), (torch.where(finite, 0.0, code) * w).sum()])


def _max_and_min(v: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    both = torch.cat([v, -v])  # one all-reduce gives the max and the min over ranks
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    return both[: v.numel()], -both[v.numel():]


@torch.no_grad()
def check_consistency(module: nn.Module, name: str = "model", group=None) -> None:
    """Raise RuntimeError on every rank if any parameter or buffer of `module` differs across ranks.

    A collective: every rank must call it at the same point. Cheap when all agree (two small
    all-reduces of float64 checksums); on a checksum mismatch the differing tensors are compared
    exactly with rank 0's copies (a checksum that differs only by rounding is not an error). The
    error names the first differing tensors, the max |difference| against rank 0 and the ranks.
    A DDP (or torch.compile) wrapper is looked through. No-op without a process group of 2+ ranks.
    """
    world = _world_size(group)
    if world < 2:
        return
    if isinstance(module, nn.parallel.DistributedDataParallel):
        module = module.module
    module = getattr(module, "_orig_mod", module)  # torch.compile's wrapper
    tensors = list(module.named_parameters()) + [(n, b) for n, b in module.named_buffers() if b is not None]
    device = tensors[0][1].device if tensors else torch.device("cpu")
    if device.type == "cpu" and dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())

    # Structure first, so that the checksum all-reduce below has the same size on every rank.
    shape_sum = sum((i + 1) * t.numel() for i, (_, t) in enumerate(tensors))
    header = torch.tensor([len(tensors), shape_sum], dtype=torch.float64, device=device)
    high, low = _max_and_min(header, group)
    if not torch.equal(high, low):
        raise RuntimeError(f"{name}: ranks hold different sets of parameters/buffers "
                           f"({low[0]:.0f}..{high[0]:.0f} tensors, or different shapes)")

    sums = torch.stack([_checksums(t.to(device)) for _, t in tensors]) if tensors else torch.zeros(0, 3)
    high, low = _max_and_min(sums.flatten().to(device), group)
    suspects = (high != low).view(-1, 3).any(dim=1).nonzero().flatten().tolist()  # same list on every rank
    if not suspects:
        return

    # Exact comparison against rank 0's copies, then every rank learns every rank's differences.
    rank, src = dist.get_rank(group), dist.get_global_rank(group, 0) if group is not None else 0
    diffs = torch.zeros(len(suspects), world, dtype=torch.float64, device=device)
    for row, i in enumerate(suspects):
        mine = tensors[i][1].detach().to(device)
        ref = mine.clone()
        dist.broadcast(ref, src=src, group=group)
        a, b = mine.double(), ref.double()
        both_nan = a.isnan() & b.isnan()
        differ = (a != b) & ~both_nan
        if differ.any():
            gap = (a - b).abs().masked_fill(~differ, 0.0).max()
            diffs[row, rank] = gap if gap > 0 else float("inf")  # inf: a NaN or inf against a number
    dist.all_reduce(diffs, group=group)
    bad = [(tensors[i][0], d) for i, d in zip(suspects, diffs, strict=True) if d.any()]
    if not bad:
        return  # checksums differed by rounding only
    detail = "; ".join(f"{n}: max |x - x_rank0| = {d.max().item():.3g} on rank(s) "
                       f"{d.nonzero().flatten().tolist()}" for n, d in bad[:5])
    raise RuntimeError(f"{name}: {len(bad)} of {len(tensors)} parameters/buffers differ across ranks: "
                       f"{detail}")
