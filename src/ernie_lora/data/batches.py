"""Full batches of one aspect bucket, in an order fixed by (seed, epoch): the position is all resume needs."""

from __future__ import annotations

import torch

from ..errors import UserError


class BucketBatches:
    """Batches that share a bucket (samples with a ``bucket`` attribute), drawn epoch by epoch.

    Every batch holds exactly ``batch_size`` samples: a bucket's last, short batch is filled by going
    on through the same bucket's shuffled order from its start (a bucket smaller than a batch repeats
    its samples). A short batch would cost a GPU a full step's time for a noisier gradient, and with
    several processes (these are then global batches) each process gets its full share.
    """

    def __init__(self, samples: list, batch_size: int, seed: int, weights: list[float] | None = None):
        if batch_size < 1:
            raise UserError(f"train.batch_size: {batch_size} must be at least 1")
        self.samples, self.batch_size, self.seed = samples, batch_size, seed
        # hierarchical sampling: an epoch is len(samples) draws with replacement by these weights
        self.weights = torch.tensor(weights, dtype=torch.float64) if weights is not None else None
        self.epoch, self.index = 0, 0
        self._batches = self._epoch_batches(0)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        drawn = range(len(self.samples))
        if self.weights is not None:
            drawn = torch.multinomial(self.weights, len(self.samples), replacement=True, generator=g).tolist()
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i in drawn:
            s = self.samples[i]
            by_bucket.setdefault((s.bucket.width, s.bucket.height), []).append(i)
        if not by_bucket:
            raise UserError("no training samples: the dataset is empty")
        batches = []
        for key in sorted(by_bucket):
            idx = by_bucket[key]
            order = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
            count = -(-len(order) // self.batch_size)  # ceil: every sample once, the last batch filled
            cycled = [order[k % len(order)] for k in range(count * self.batch_size)]
            batches += [cycled[k : k + self.batch_size] for k in range(0, len(cycled), self.batch_size)]
        return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]

    def next(self) -> list:
        if self.index >= len(self._batches):
            self.epoch, self.index = self.epoch + 1, 0
            self._batches = self._epoch_batches(self.epoch)
        batch = self._batches[self.index]
        self.index += 1
        return [self.samples[i] for i in batch]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._batches = self._epoch_batches(self.epoch)
