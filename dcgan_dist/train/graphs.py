"""A training step replayed as one CUDA graph (`train.cuda_graphs`).

At a small per-GPU batch a DCGAN step is launch-bound: ~300 small kernels against a few milliseconds of GPU
work, and the host's time to issue them is the step's time. A CUDA graph records the kernels of one step
once and replays them with a single launch. What that asks of the step, and how the trainer meets it:

- static shapes and addresses: every batch is copied into the same input buffers before a replay, and the
  step's report (one tensor) is copied out after it; the optimizers' step counters live on the device
  (`capturable` Adam), the EMA's weight is a device scalar filled before each replay;
- no host synchronisation inside: the non-finite skip is fused Adam's `found_inf` flag, computed on the device;
  fp16's gradient scaler, which reads its flag on the host, is refused (config.validate);
- random numbers from a generator the graph knows: the noise and augmentation generator is registered with
  the graph, so each replay draws the next numbers of the same Philox stream as an eager step, and its
  state, saved in checkpoints, continues exactly on resume;
- one process: DDP's reductions are not captured (config.validate_world refuses more than one process).

The first `warmup` calls run eagerly on a side stream (they create the optimizers' state and let cuDNN choose
its algorithms, as torch asks before a capture); they are ordinary training steps. Then one capture, and
every later call is a replay.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class GraphedStep:
    """`step(*inputs) -> Tensor` called as itself for `warmup` calls, then captured once and replayed.

    `inputs`: tensors on the CUDA device, or None, of the same shapes at every call; `generators`: the CUDA
    generators the step draws from (besides the default one)."""

    def __init__(self, step: Callable[..., torch.Tensor], generators: Sequence[torch.Generator] = (),
                 warmup: int = 3):
        self.step, self.generators, self.warmup = step, list(generators), warmup
        self.calls, self.graph = 0, None
        self.inputs: list[torch.Tensor | None] = []
        self.output: torch.Tensor | None = None

    def __call__(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        if self.graph is None and self.calls < self.warmup:
            self.calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            self._capture(inputs)
        for buffer, x in zip(self.inputs, inputs):
            if buffer is not None:
                buffer.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.output.clone()

    def _capture(self, inputs: Sequence[torch.Tensor | None]) -> None:
        self.inputs = [None if x is None else x.clone() for x in inputs]
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:
            graph.register_generator_state(generator)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):  # records, runs nothing: the first replay is this call's step
            self.output = self.step(*self.inputs)
        self.graph = graph
