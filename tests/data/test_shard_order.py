"""The `order` hook of data/sampling.py GlobalBatchSampler with data/shards.py ShardOrder: one seeded
sequence per epoch, cut into global batches whatever the number of ranks, read by 2 ranks x 2 DataLoader
workers without overlap, resumed exactly from (epoch, batches_done); and no hook, today's order."""

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from data.sampling import GlobalBatchSampler, WithEpoch, epoch_order
from data.shards import ShardOrder
from data.sources import read_source
from tests.data.source_fixtures import audio_samples, write_clips, write_shard

SIZES = [5, 3, 6, 4]  # examples per shard


def batches(n, batch, world, micro, order, epoch=1, seed=7, done=0):
    """Every rank's micro-batches, regrouped into global batches in rank order (as a gather rebuilds them)."""
    per_rank = []
    for rank in range(world):
        sampler = GlobalBatchSampler(n, batch, micro, world, rank, seed=seed, order=order)
        sampler.set_state(epoch, done)
        per_rank.append(list(sampler))
    steps = batch // (world * micro)
    return [[i for r in range(world) for m in per_rank[r][k * steps : (k + 1) * steps] for i in m]
            for k in range(len(per_rank[0]) // steps)]


def test_the_order_is_a_seeded_permutation_that_keeps_shards_together():
    order = ShardOrder(SIZES, buffer=4)
    first = order(seed=7, epoch=1)
    assert sorted(first) == list(range(sum(SIZES))) and first == order(7, 1)
    assert first != order(7, 2) and first != order(8, 1)
    # a buffer of one: whole shards, in a shuffled shard order, each in its tar order
    whole = ShardOrder(SIZES, buffer=1)(7, 1)
    shards = {start: list(range(start, start + n)) for start, n in zip([0, 5, 8, 14], SIZES)}
    rebuilt = []
    while len(rebuilt) < len(whole):
        rebuilt += shards.pop(whole[len(rebuilt)])  # the next shard must start here and run whole
    assert rebuilt == whole and whole[:5] != list(range(5))
    # built from examples: each run of one source is a shard
    fake = [type("E", (), {"source": s})() for s in "aaabbcccc"]
    assert ShardOrder.of(fake).shard_sizes == [3, 2, 4]


def test_global_batches_do_not_depend_on_the_number_of_ranks_and_resume_exactly():
    n, order = sum(SIZES), ShardOrder(SIZES, buffer=4)
    whole = batches(n, 8, world=1, micro=8, order=order)
    assert whole == [order(7, 1)[k * 8 : (k + 1) * 8] for k in range(n // 8)]
    assert batches(n, 8, world=2, micro=2, order=order) == whole
    for done in range(len(whole) + 1):
        assert batches(n, 8, world=2, micro=4, order=order, done=done) == whole[done:]


def test_no_hook_is_todays_order_bit_for_bit():
    n = 37
    generator = torch.Generator().manual_seed(7 * 1_000_003 + 1)  # epoch_order's derivation, written out
    expected = torch.randperm(n, generator=generator).tolist()[:32]
    assert sum(batches(n, 8, 1, 8, order=None), []) == expected
    assert batches(n, 8, 2, 2, order=lambda seed, epoch: epoch_order(n, seed, epoch)) == batches(n, 8, 2, 2, None)
    with pytest.raises(ValueError, match="not a permutation of the 37 examples"):
        list(GlobalBatchSampler(n, 8, order=lambda seed, epoch: list(range(36)) + [0]))


class MemberBytes(Dataset):
    """Reads each example's audio member in the worker: (index, worker id, its bytes' length)."""

    def __init__(self, clips):
        self.clips = clips

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, key):
        epoch, index = key
        return index, get_worker_info().id, len(self.clips[index].audio.read_bytes())


def test_two_ranks_with_two_workers_each_read_every_example_of_the_epoch_once(tmp_path):
    paths = write_clips(tmp_path)
    samples = audio_samples(paths)
    shards = [write_shard(tmp_path / f"{k:06d}.tar", [(f"{k}-{j}", members) for j, (_, members) in
                                                      enumerate((samples * 2)[:size])]) for k, size in enumerate(SIZES)]
    source = read_source(str(tmp_path / "{000000..000003}.tar"), "audio-text")
    clips = source.examples
    order = source.order_for(clips, buffer=4)
    assert [c.source for c in clips] == [str(s) for s, n in zip(shards, SIZES) for _ in range(n)]
    seen = {}
    for rank in range(2):
        sampler = GlobalBatchSampler(len(clips), 8, 2, world_size=2, rank=rank, seed=7, order=order)
        sampler.set_state(1, 0)
        loader = DataLoader(MemberBytes(clips), batch_sampler=WithEpoch(sampler), num_workers=2,
                            collate_fn=lambda items: items)
        for batch in loader:
            for index, worker, size in batch:
                assert index not in seen and size == clips[index].audio.size
                seen[index] = (rank, worker)
    assert sorted(seen) == sorted(order(7, 1)[:16])  # the epoch's two global batches, the tail dropped
    assert {place for place in seen.values()} == {(0, 0), (0, 1), (1, 0), (1, 1)}
