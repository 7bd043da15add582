"""Which examples each rank sees: global batches, cut into per-rank micro-batches, resumable.

    --batch-size B          examples per optimizer step, over all ranks and accumulation steps
    --micro-batch-size m    examples per rank per forward (default B / world_size)
    accumulation steps      B / (world_size * m), which must be a whole number

Global batch k of epoch e is `epoch_order(n, seed, e)[k*B : (k+1)*B]`, whatever the number of
ranks. Rank r takes its consecutive slice of B / world_size examples and walks it in m-sized
micro-batches, so gathering the ranks' rows in rank order rebuilds the global batch in order.
A run is therefore defined by (seed, B) alone: 1 process taking B at once, or 8 ranks with
accumulation, see the same global batches; and its position is counted in global batches, so a
run can resume on another number of ranks or another micro-batch size.

Bucketing by length, so little of a forward is padding (audio clips of 1 to 30 s):

- `lengths` (--bucket-by-length, on by default for audio): each global batch is sorted by length
  before it is cut into micro-batches, and the micro-batches are dealt to the ranks in turn (rank r
  takes micro-batches r, r + N, ...), so every rank gets short and long ones. The global batch, and
  so a contrastive loss's set of negatives, is the same random sample as without bucketing: only
  how it is split changes. It saves padding when there are several micro-batches a step.
- `across_batches` (--bucket-across-batches, off by default): global batches themselves are drawn
  from length-sorted windows: the epoch order is cut into windows of BUCKET_WINDOW global batches,
  each window is sorted by length and cut into global batches, and those are shuffled within their
  window. Padding almost vanishes even with one micro-batch a step, but a batch then holds clips of
  one length, whose captions are alike: for contrastive training that changes the negatives, and
  it cost the offline demo a third of its recall (README, "Speed"), so it is opt-in.

All of it is a function of (seed, epoch), so bucketing stays deterministic and resumable, and
composes with the sharding above.

Another example order (`order`, default None: `epoch_order`, unchanged): a function
`order(seed, epoch) -> list[int]`, a permutation of range(n) and a pure function of its arguments,
replaces `epoch_order` as the sequence the global batches are cut from; everything after it (the
dropped tail, bucketing, the split over ranks, resume) is as above. WebDataset tar shards use it
(data/shards.py `ShardOrder`: the shards shuffled, then a shuffle within a buffer of examples), so
reading stays near-sequential in each shard while ranks and workers still never overlap, the global
batch still does not depend on the number of processes, and a resume at (epoch, batches_done) still
takes exactly the remaining batches.

The last partial global batch of an epoch is dropped, so every step has exactly B examples (for
a contrastive loss the batch is the set of negatives); each epoch reshuffles, so no example is
left out for good.
"""

import math
from typing import Callable

import torch
from torch.utils.data import Sampler

BUCKET_WINDOW = 50  # global batches sorted together: similar lengths, yet batches far apart in the epoch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch, a function of (seed, epoch) only."""
    # the prime stride keeps (seed, epoch) pairs apart for any epoch below 1_000_003
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def bucketed(order: list[int], lengths: list[float], global_batch: int, seed: int, epoch: int) -> list[int]:
    """`order` (a whole number of global batches) regrouped so each global batch holds examples of
    similar length; see the module docstring."""
    window = BUCKET_WINDOW * global_batch
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 7919 + 1)  # apart from epoch_order's
    regrouped = []
    for start in range(0, len(order), window):
        part = sorted(order[start : start + window], key=lambda i: lengths[i])  # stable: ties keep the shuffled order
        batches = [part[b : b + global_batch] for b in range(0, len(part), global_batch)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            regrouped += batches[b]
    return regrouped


def accumulation_steps(global_batch: int, world_size: int, micro_batch: int) -> int:
    """global_batch / (world_size * micro_batch), refusing sizes that do not divide."""
    if global_batch < 1 or micro_batch < 1:
        raise ValueError(f"--batch-size and --micro-batch-size must be >= 1, got {global_batch} and {micro_batch}")
    per_rank, rest = divmod(global_batch, world_size)
    if rest:
        below = global_batch - rest
        near = [b for b in (below, below + world_size) if b > 0]
        raise ValueError(f"--batch-size {global_batch} does not split over {world_size} processes; "
                         f"use a multiple of {world_size}, e.g. {' or '.join(map(str, near))}")
    if per_rank % micro_batch:
        divisors = [d for d in range(1, per_rank + 1) if per_rank % d == 0]
        raise ValueError(f"--micro-batch-size {micro_batch} does not divide the {per_rank} examples each of the "
                         f"{world_size} process(es) takes per step (--batch-size {global_batch}); use one of "
                         f"{', '.join(map(str, divisors))}")
    return per_rank // micro_batch


class GlobalBatchSampler(Sampler):
    """This rank's micro-batches, global batch after global batch, from position `batches_done` of
    `epoch` (see the module docstring). Use as a DataLoader's `batch_sampler`; call set_state
    before every epoch. Each global batch yields exactly `accumulation` micro-batches."""

    def __init__(self, n: int, global_batch: int, micro_batch: int | None = None, world_size: int = 1, rank: int = 0,
                 seed: int = 0, lengths: list[float] | None = None, across_batches: bool = False,
                 order: Callable[[int, int], list[int]] | None = None):
        micro_batch = micro_batch or global_batch // world_size
        self.accumulation = accumulation_steps(global_batch, world_size, micro_batch)
        if n < global_batch:
            raise ValueError(f"the training set has {n} examples, fewer than one global batch of {global_batch}; "
                             "lower --batch-size or add data")
        self.n, self.global_batch, self.micro_batch = n, global_batch, micro_batch
        self.world_size, self.rank, self.seed = world_size, rank, seed
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"{len(lengths)} lengths for {n} examples")
        if across_batches and lengths is None:
            raise ValueError("bucketing across batches needs the examples' lengths")
        self.lengths = lengths  # None: no bucketing
        self.across_batches = across_batches
        self.example_order = order  # None: epoch_order
        self.epoch, self.batches_done = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        """Global batches (optimizer steps) per epoch; the partial last one is dropped."""
        return self.n // self.global_batch

    @property
    def dropped_per_epoch(self) -> int:
        return self.n - self.batches_per_epoch * self.global_batch

    def set_state(self, epoch: int, batches_done: int = 0) -> None:
        if not 0 <= batches_done <= self.batches_per_epoch:
            raise ValueError(f"batches_done={batches_done} is outside 0..{self.batches_per_epoch}, the global batches "
                             f"in one epoch of {self.n} examples at batch size {self.global_batch}; "
                             "was the state saved with another data set or batch size?")
        self.epoch, self.batches_done = epoch, batches_done

    def shuffled(self) -> list[int]:
        """This epoch's permutation of the examples: `epoch_order`, or the `order` hook's, checked."""
        if self.example_order is None:
            return epoch_order(self.n, self.seed, self.epoch)
        order = list(self.example_order(self.seed, self.epoch))
        if len(order) != self.n or set(order) != set(range(self.n)):
            # an overlap or a gap here would show some examples twice and others never, silently
            raise ValueError(f"the example order of epoch {self.epoch} is not a permutation of the {self.n} examples "
                             f"({len(order)} indices, {len(set(order))} distinct); was it built for another data set?")
        return order

    def order(self) -> list[int]:
        """This epoch's examples, a whole number of global batches, in the order they are taken."""
        order = self.shuffled()[: self.batches_per_epoch * self.global_batch]
        return bucketed(order, self.lengths, self.global_batch, self.seed, self.epoch) if self.across_batches else order

    def micro_batches(self, global_batch: list[int]) -> list[list[int]]:
        """This rank's micro-batches of one global batch, in the order it runs them."""
        m, per_rank = self.micro_batch, self.global_batch // self.world_size
        if self.lengths is None:  # rank r: the r-th consecutive slice, in m-sized pieces
            mine = global_batch[self.rank * per_rank : (self.rank + 1) * per_rank]
            return [mine[i * m : (i + 1) * m] for i in range(self.accumulation)]
        ordered = sorted(global_batch, key=lambda i: self.lengths[i])  # stable: ties keep the shuffled order
        micro = [ordered[j * m : (j + 1) * m] for j in range(len(ordered) // m)]
        return micro[self.rank :: self.world_size]  # dealt in turn: short and long ones on every rank

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.batches_done) * self.accumulation

    def __iter__(self):
        order = self.order()
        for k in range(self.batches_done, self.batches_per_epoch):
            yield from self.micro_batches(order[k * self.global_batch : (k + 1) * self.global_batch])


class WithEpoch(Sampler):
    """A batch sampler whose indices carry its epoch, [(epoch, index), ...]: DataLoader workers that
    persist across epochs (forked once) still know which epoch an item belongs to."""

    def __init__(self, sampler: GlobalBatchSampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        epoch = self.sampler.epoch
        return ([(epoch, index) for index in batch] for batch in self.sampler)


def steps_for_epochs(epochs: float, batches_per_epoch: int) -> int:
    return max(1, math.ceil(epochs * batches_per_epoch))
