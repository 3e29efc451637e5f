"""One rank of the synchronized-BatchNorm tests; started by torch.distributed.run from tests/test_sync_bn.py.

    python -m torch.distributed.run --nproc_per_node N tests/dist/sync_bn_worker.py OUT CASE [CASE ...]

Each case writes `OUT/<case>.rank<r>.safetensors` (what this rank computed, distributed) and, from
rank 0, `OUT/<case>.ref.safetensors`: the same computation in this one process with plain
nn.BatchNorm on the concatenation of all ranks' batches. The test compares the two: tensors named
`batch.*` hold one row per sample (this rank's rows `rows[0]:rows[1]` of the reference's), the
others (parameters, buffers, summed gradients) are whole.
"""

import argparse
import inspect
import json
import os
import time
from contextlib import nullcontext
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dcgan_dist.train.sync_bn import check_consistency, convert_sync_batchnorm

UNEVEN = {2: [3, 5], 3: [0, 5, 2]}  # rows per rank; an empty rank still joins every collective
OFFSET = torch.tensor([5.0, -3.0, 0.5])  # per-channel mean and scale far from (0, 1): a test of stability
SCALE = torch.tensor([3.0, 0.5, 1.0])


def build_g() -> nn.Module:  # z [N, 8, 1, 1] -> [N, 3, 8, 8]
    return nn.Sequential(nn.ConvTranspose2d(8, 16, 4, 1, 0, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.ConvTranspose2d(16, 3, 4, 2, 1, bias=False), nn.Tanh())


def build_d() -> nn.Module:  # [N, 3, 8, 8] -> logits [N, 1, 1, 1]
    return nn.Sequential(nn.Conv2d(3, 16, 4, 2, 1, bias=False), nn.LeakyReLU(0.2),
                         nn.Conv2d(16, 32, 4, 2, 1, bias=False), nn.BatchNorm2d(32), nn.LeakyReLU(0.2),
                         nn.Conv2d(32, 1, 2, 1, 0, bias=False))


def build_layers() -> nn.ModuleDict:
    torch.manual_seed(0)
    layers = nn.ModuleDict({"bn2d": nn.BatchNorm2d(3), "cumulative": nn.BatchNorm2d(3, momentum=None),
                            "bn1d": nn.BatchNorm1d(3)})
    for bn in layers.values():  # affine parameters away from (1, 0), so their gradients matter
        nn.init.normal_(bn.weight, 1.0, 0.3)
        nn.init.normal_(bn.bias, 0.0, 0.3)
    return layers


def wrap_ddp(module: nn.Module) -> DDP:
    """DDP as the trainer runs it: no broadcast of rank 0's buffers at every forward (README: "Distributed training: what holds")."""
    if "forward_sync_buffers" in inspect.signature(DDP).parameters:  # torch >= 2.14 renamed the flag
        return DDP(module, forward_sync_buffers=False)
    return DDP(module, broadcast_buffers=False)


def rows(batches: list[int], rank: int) -> slice:
    return slice(sum(batches[:rank]), sum(batches[: rank + 1]))


def save(out: Path, case: str, tag: str, tensors: dict) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out / f"{case}.{tag}.safetensors"))


def layer_run(batches, part, sync, device, distributed, bf16=False) -> dict:
    """Two training steps then one eval forward of each BN layer on this rank's rows `part`.

    The loss is a weighted SUM over rows (a plain sum has zero gradient through BatchNorm), so the
    concatenated-batch loss is the sum of the ranks' losses with uneven batches too; weight and bias
    gradients are summed over ranks here to compare with the single process's. `bf16`: the inputs
    are rounded to bf16 and, when distributed, fed as bf16 under bf16 autocast (the reference
    normalizes the same rounded values in fp32).
    """
    layers = build_layers()
    if sync:
        layers = convert_sync_batchnorm(layers, device.type)
    layers.to(device)
    gen = torch.Generator().manual_seed(1)
    n = sum(batches)
    shapes = {"bn2d": (n, 3, 5, 4), "cumulative": (n, 3, 5, 4), "bn1d": (n, 3)}
    result = {"rows": torch.tensor([part.start, part.stop])}
    for step in range(2):
        for name, bn in layers.items():
            view = (1, 3) + (1,) * (len(shapes[name]) - 2)
            x = torch.randn(shapes[name], generator=gen) * SCALE.view(view) + OFFSET.view(view)
            weights = torch.randn(shapes[name], generator=gen)
            x = x[part].to(device)
            if bf16:
                x = x.bfloat16() if distributed else x.bfloat16().float()
            x.requires_grad_()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and distributed):
                y = bn(x)
            (y.float() * weights[part].to(device)).sum().backward()
            result[f"batch.{name}.y{step}"], result[f"batch.{name}.xgrad{step}"] = y, x.grad
    for name, bn in layers.items():
        if distributed:
            for p in bn.parameters():
                dist.all_reduce(p.grad)
        result.update({f"{name}.{k}": v for k, v in bn.state_dict().items()})
        result.update({f"{name}.{k}.grad": p.grad for k, p in bn.named_parameters()})
    layers.eval()
    x = torch.randn(n, 3, 5, 4, generator=gen)[part].to(device)
    result["batch.bn2d.eval"] = layers["bn2d"](x)
    if distributed and dist.get_rank() == 0:
        layers["bn2d"](x)  # an extra eval forward on one rank only: harmless, eval never communicates
    return result


def case_layer(out, rank, world, device, name, uneven=False, sync=True, bf16=False):
    batches = UNEVEN[world] if uneven else [4] * world
    save(out, name, f"rank{rank}", layer_run(batches, rows(batches, rank), sync, device, True, bf16))
    if rank == 0:
        ref = layer_run(batches, slice(0, sum(batches)), False, torch.device("cpu"), False, bf16)
        save(out, name, "ref", ref)


def gan_run(world, rank, sync, device, ddp, autocast=False) -> dict:
    """Two DCGAN steps of a tiny G and D with SGD; DDP averages gradients over ranks.

    Every loss is a mean over this rank's rows; with equal batches the average over ranks of their
    gradients is the gradient of the mean over the concatenated batch, i.e. the single-process step.
    """
    torch.manual_seed(0)
    g, d = build_g(), build_d()
    if sync:
        g, d = convert_sync_batchnorm(g, device.type), convert_sync_batchnorm(d, device.type)
    g, d = g.to(device), d.to(device)
    if ddp:
        g, d = wrap_ddp(g), wrap_ddp(d)
    opt_g = torch.optim.SGD(g.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(d.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(2)
    b = 4
    part = slice(rank * b, (rank + 1) * b) if ddp else slice(None)  # the reference takes every rank's rows
    bce = F.binary_cross_entropy_with_logits
    result = {"rows": torch.tensor([rank * b, (rank + 1) * b])}
    amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast)
    # D's real-batch backward runs under no_sync so that DDP all-reduces D's gradients once, after
    # the fake batch; in the G phase D is frozen and called under no_sync so DDP waits for nothing.
    outside_ddp = lambda: d.no_sync() if ddp else nullcontext()
    for step in range(2):
        z = torch.randn(world * b, 8, 1, 1, generator=gen)[part].to(device)
        real = torch.rand(world * b, 3, 8, 8, generator=gen)[part].mul(2).sub(1).to(device).requires_grad_()
        with amp():
            fake = g(z)
        # D: real
        with outside_ddp():
            with amp():
                logits_real = d(real).float()
            bce(logits_real, torch.ones_like(logits_real)).backward()
        # D: fake
        with amp():
            logits_fake = d(fake.detach()).float()
        bce(logits_fake, torch.zeros_like(logits_fake)).backward()
        opt_d.step()
        opt_d.zero_grad()
        # G: fool D (its BN still synchronizes: one more collective forward of D)
        d.requires_grad_(False)
        with outside_ddp(), amp():
            logits_g = d(fake).float()
        bce(logits_g, torch.ones_like(logits_g)).backward()
        opt_g.step()
        opt_g.zero_grad()
        d.requires_grad_(True)
        result.update({f"batch.fake{step}": fake, f"batch.logits_real{step}": logits_real,
                       f"batch.logits_g{step}": logits_g,
                       # this rank's input gradient is of the SUM of the ranks' mean losses: world x that of
                       # the mean over the concatenated batch
                       f"batch.real_grad{step}": real.grad / (world if ddp else 1)})
    for prefix, net in (("g", g), ("d", d)):
        net = net.module if ddp else net
        result.update({f"{prefix}.{k}": v for k, v in net.state_dict().items()})
    return result


def case_gan(out, rank, world, device, name, sync=True, autocast=False):
    save(out, name, f"rank{rank}", gan_run(world, rank, sync, device, ddp=True, autocast=autocast))
    if rank == 0:
        save(out, name, "ref", gan_run(world, 0, sync=False, device=torch.device("cpu"), ddp=False))


def case_consistency(out, rank, world, device):
    torch.manual_seed(0)
    d = wrap_ddp(convert_sync_batchnorm(build_d(), device.type).to(device))
    d(torch.randn(4, 3, 8, 8, device=device)).sum().backward()  # the ranks' BN buffers stay equal: synced
    messages = {}

    def check(label):
        try:
            check_consistency(d, name="D")
            messages[label] = "ok"
        except RuntimeError as e:
            messages[label] = str(e)

    check("identical")
    weight = d.module[2].weight
    original = weight[3, 1, 0, 0].item()
    with torch.no_grad():
        if rank == 1:
            weight[3, 1, 0, 0] += 1e-3
        check("parameter")
        weight[3, 1, 0, 0] = original
        check("restored")
        if rank == world - 1:
            d.module[3].running_mean[5] += 0.25
        check("buffer")
    (out / f"consistency.rank{rank}.json").write_text(json.dumps(messages))


def case_one_fewer(out, rank, world, device, what):
    """Rank 1 runs one D forward fewer ("forward": the second one of step 0) or one step fewer ("step").

    One step fewer: rank 0 waits in an all-reduce that rank 1 never joins, and only the process-group
    timeout ends it. One forward fewer: the ranks' later collectives pair up wrongly (rank 1's
    backward all-reduce of C floats against rank 0's forward all-reduce of C + 1); gloo catches the
    size mismatch, but same-sized collectives would pair silently and compute garbage.
    """
    torch.manual_seed(0)
    d = convert_sync_batchnorm(build_d(), device.type).to(device)
    steps = 2 if rank == 1 and what == "step" else 3
    for step in range(steps):
        loss = d(torch.randn(4, 3, 8, 8, device=device)).mean()
        if not (rank == 1 and what == "forward" and step == 0):
            loss = loss + d(torch.randn(4, 3, 8, 8, device=device)).mean()
        loss.backward()
        print(f"rank {rank}: step {step} done", flush=True)
    time.sleep(120)  # a live job goes on (evaluates, checkpoints, loads data) instead of exiting


def case_torch_vs_own(out, rank, world, device):
    """CUDA only: torch's nn.SyncBatchNorm and DistributedBatchNorm on the same inputs, both synced."""
    batches = UNEVEN[world]
    result = {}
    for kind in ("cuda", "own"):
        torch.manual_seed(0)
        bn = nn.BatchNorm2d(3)
        nn.init.normal_(bn.weight, 1.0, 0.3)
        bn = convert_sync_batchnorm(bn, "cuda" if kind == "cuda" else "cpu").to(device)
        result[f"{kind}.type"] = torch.tensor(isinstance(bn, nn.SyncBatchNorm))
        gen = torch.Generator().manual_seed(1)
        for step in range(2):
            x = torch.randn(sum(batches), 3, 5, 4, generator=gen) * SCALE.view(1, 3, 1, 1)
            x = x + OFFSET.view(1, 3, 1, 1)
            w = torch.randn(x.shape, generator=gen)
            part = rows(batches, rank)
            x = x[part].to(device).requires_grad_()
            y = bn(x)
            (y * w[part].to(device)).sum().backward()
            result[f"{kind}.y{step}"], result[f"{kind}.xgrad{step}"] = y, x.grad
        result.update({f"{kind}.{k}": v for k, v in bn.state_dict().items()})
        result.update({f"{kind}.{k}.grad": p.grad for k, p in bn.named_parameters()})
    save(out, "torch_vs_own", f"rank{rank}", result)


CASES = {
    "layer": partial(case_layer, name="layer"),
    "layer_uneven": partial(case_layer, name="layer_uneven", uneven=True),
    "layer_nosync": partial(case_layer, name="layer_nosync", sync=False),
    "layer_bf16": partial(case_layer, name="layer_bf16", bf16=True),
    "gan": partial(case_gan, name="gan"),
    "gan_nosync": partial(case_gan, name="gan_nosync", sync=False),
    "gan_bf16": partial(case_gan, name="gan_bf16", autocast=True),
    "consistency": case_consistency,
    "one_step_fewer": partial(case_one_fewer, what="step"),
    "one_forward_fewer": partial(case_one_fewer, what="forward"),
    "torch_vs_own": case_torch_vs_own,
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("cases", nargs="+", choices=sorted(CASES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--timeout", type=float, default=120, help="process-group timeout, seconds")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    # gloo on CUDA too: it lets several ranks share one GPU, which NCCL refuses.
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    for case in args.cases:
        CASES[case](args.out, rank, world, device)
    dist.barrier()  # rank 0 writes the references last; nobody leaves before it is done
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
