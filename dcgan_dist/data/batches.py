"""Batch sources: what the training loop draws from. The loop asks for this rank's next batch and never
sees how the images are stored.

A batch source gives `next(source)` -> (images uint8 [B, C, S, S], labels int64 [B] or None), tells the
trainer `num_items`, `channels`, `image_size`, `num_classes`, `epoch` and `batches_per_epoch`, and saves
and restores its position with `state_dict()` / `load_state_dict()` for an exact resume.
`InMemoryBatches` holds the whole dataset in one tensor; `StoreBatches` reads a prepared store (`store.py`)
image by image from its shards. Both share `_IndexedBatches`: the order, the saved position, pinning.
"""

from __future__ import annotations

import torch

from dcgan_dist.errors import UserError


class ShardedBatches:
    """Per-rank index batches: each epoch one permutation seeded by (seed, epoch), identical on all ranks.

    Global batch i of an epoch is perm[i*W*B : (i+1)*W*B]; rank r takes its r-th slice of B. So ranks are
    disjoint, every rank gets the same number of full batches, the last N mod (W*B) images of the
    permutation are dropped, and W ranks with batch B see exactly what one process with batch W*B sees.
    """

    def __init__(self, num_items: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.num_items, self.batch_size, self.rank, self.world_size, self.seed = (
            num_items, batch_size, rank, world_size, seed)
        self.batches_per_epoch = num_items // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise UserError(f"train.batch_size = {batch_size} x {world_size} rank(s) is more than the "
                            f"{num_items} images of the dataset; use a smaller batch or more data")
        self.epoch, self.position = 0, 0  # the next batch to hand out
        self._perm: torch.Tensor | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_items, generator=g)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.position == self.batches_per_epoch:
            self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        if self._perm is None:
            self._perm = self.permutation(self.epoch)
        start = (self.position * self.world_size + self.rank) * self.batch_size
        self.position += 1
        return self._perm[start:start + self.batch_size]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, position = state["epoch"], state["position"]  # from a checkpoint's meta.json: checked, not trusted
        if not (type(epoch) is int and type(position) is int and epoch >= 0  # noqa: E721 (bool is not a position)
                and 0 <= position <= self.batches_per_epoch):
            raise ValueError(f"its data position (epoch {epoch!r}, batch {position!r}) is outside an epoch of "
                             f"{self.batches_per_epoch} batches of this data")
        self.epoch, self.position, self._perm = epoch, position, None


class _IndexedBatches:
    """What every batch source shares: `ShardedBatches`' order, the position saved and restored, pinning.

    A subclass fetches the rows of global indices (`_fetch`) and the first images (`first`).
    """

    def __init__(self, num_items: int, channels: int, image_size: int, num_classes: int, batch_size: int,
                 rank: int, world_size: int, seed: int, pin_memory: bool):
        self.order = ShardedBatches(num_items, batch_size, rank, world_size, seed)
        self.num_items, self.channels, self.image_size = num_items, channels, image_size
        self.num_classes, self.pin_memory = num_classes, pin_memory

    @property
    def epoch(self) -> int:
        return self.order.epoch

    @property
    def batches_per_epoch(self) -> int:
        return self.order.batches_per_epoch

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        images, labels = self._fetch(next(self.order))
        if self.pin_memory:
            images, labels = images.pin_memory(), None if labels is None else labels.pin_memory()
        return images, labels

    def _fetch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def first(self, n: int) -> torch.Tensor:
        """The first `n` images (a grid of what the data looks like)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, int]:
        o = self.order
        return {**o.state_dict(), "world_size": o.world_size, "batch_size": o.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> bool:
        """Continue where `state` left off. Returns whether that is exact: with another world size or batch
        size the epoch continues from the same share of its images, in another order."""
        o = self.order
        if state["world_size"] == o.world_size and state["batch_size"] == o.batch_size:
            o.load_state_dict(state)
            return True
        seen = state["position"] * state["world_size"] * state["batch_size"]  # images into the epoch
        position = min(seen // (o.world_size * o.batch_size), o.batches_per_epoch)
        o.load_state_dict({"epoch": state["epoch"], "position": position})
        return False


class InMemoryBatches(_IndexedBatches):
    """This rank's share of each global batch of one in-memory uint8 tensor [N, C, S, S] (and its labels).

    The order is `ShardedBatches`'; `pin_memory` pins each batch, so its copy to a CUDA device can run
    asynchronously with the step.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, num_classes: int = 0, pin_memory: bool = False):
        assert images.dtype == torch.uint8 and images.dim() == 4, (images.dtype, images.shape)
        assert labels is None or labels.shape == (len(images),), "one label per image"
        super().__init__(len(images), images.shape[1], images.shape[-1], num_classes if labels is not None else 0,
                         batch_size, rank, world_size, seed, pin_memory)
        self.images, self.labels = images, labels

    def _fetch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # index_select: the same rows as images[idx], several times faster (benchmarks/input_pipeline.py)
        images = self.images.index_select(0, idx)
        return images, None if self.labels is None else self.labels.index_select(0, idx)

    def first(self, n: int) -> torch.Tensor:
        return self.images[:n]


class StoreBatches(_IndexedBatches):
    """`InMemoryBatches` over a prepared store (`store.open_store`): the same batches, in the same order, but
    each one read from the shards through the page cache, so no rank holds the dataset.

    `subset`: the global store indices in use (data.num_images), sorted; None = every image. `labels` False:
    hand out no labels, as for a dataset the registry lists as unlabelled.
    """

    def __init__(self, store, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 subset: torch.Tensor | None = None, pin_memory: bool = False, labels: bool = True):
        num_items = store.count if subset is None else len(subset)
        super().__init__(num_items, store.channels, store.image_size, store.num_classes if labels else 0,
                         batch_size, rank, world_size, seed, pin_memory)
        self.store, self.subset, self.labels = store, subset, labels

    def _fetch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = idx if self.subset is None else self.subset[idx]
        return self.store.gather(rows), self.store.gather_labels(rows) if self.labels else None

    def first(self, n: int) -> torch.Tensor:
        rows = torch.arange(min(n, self.num_items))
        return self.store.gather(rows if self.subset is None else self.subset[rows])


def to_model_range(batch: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the seed's ToTensor + Normalize((0.5,), (0.5,))."""
    return batch.float().div_(127.5).sub_(1.0)
