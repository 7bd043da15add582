"""data/sampling.py: global batches cut into per-rank micro-batches, bucketing, exact resume."""

import pytest

from data.sampling import BUCKET_WINDOW, GlobalBatchSampler, accumulation_steps, bucketed, epoch_order


def global_batches(n, batch, world, micro, seed=3, epoch=5, lengths=None, done=0):
    """What every rank yields, regrouped into global batches (rank-major, as a gather rebuilds them)."""
    per_rank = []
    for rank in range(world):
        sampler = GlobalBatchSampler(n, batch, micro, world, rank, seed=seed, lengths=lengths)
        sampler.set_state(epoch, done)
        per_rank.append(list(sampler))
        assert len(per_rank[-1]) == len(sampler)
    accumulation = batch // (world * micro)
    steps = len(per_rank[0]) // accumulation
    return [[i for rank in range(world) for m in per_rank[rank][k * accumulation : (k + 1) * accumulation] for i in m]
            for k in range(steps)]


def test_every_split_of_the_global_batch_sees_the_same_batches():
    whole = global_batches(103, 16, world=1, micro=16)
    assert len(whole) == 103 // 16 and all(len(b) == 16 for b in whole)
    assert whole == [epoch_order(103, 3, 5)[k * 16 : (k + 1) * 16] for k in range(6)]
    for world, micro in [(1, 4), (2, 8), (2, 2), (4, 4), (8, 1)]:
        assert global_batches(103, 16, world, micro) == whole, (world, micro)


def test_resume_in_global_batches_on_another_split():
    whole = global_batches(103, 16, world=1, micro=16)
    for done in range(7):
        assert global_batches(103, 16, world=2, micro=4, done=done) == whole[done:]
    assert global_batches(103, 16, 1, 16, epoch=6) != whole
    assert global_batches(103, 16, 1, 16, seed=4) != whole


def test_sizes_that_do_not_divide_name_the_numbers_that_would():
    assert accumulation_steps(32, 2, 4) == 4
    with pytest.raises(ValueError, match=r"--batch-size 30 does not split over 4 processes; use a multiple of 4, e\.g\. 28 or 32"):
        accumulation_steps(30, 4, 1)
    with pytest.raises(ValueError, match=r"--micro-batch-size 3 does not divide the 8 examples .* use one of 1, 2, 4, 8"):
        accumulation_steps(16, 2, 3)
    with pytest.raises(ValueError, match="fewer than one global batch of 32"):
        GlobalBatchSampler(20, 32)
    sampler = GlobalBatchSampler(40, 8)
    with pytest.raises(ValueError, match="outside 0..5"):
        sampler.set_state(0, batches_done=6)


def test_bucketing_groups_similar_lengths_and_stays_a_permutation_of_the_epoch():
    n, batch = 2000, 8
    lengths = [((i * 7919) % 300) / 10 for i in range(n)]  # 0 .. 30 s, scattered
    plain = global_batches(n, batch, 1, batch, lengths=None)
    buckets = global_batches(n, batch, 1, batch, lengths=lengths)
    assert sorted(i for b in buckets for i in b) == sorted(i for b in plain for i in b)  # the same examples this epoch

    def padding(batches):  # the share of each batch that padding to its longest clip would add
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches) / sum(
            max(lengths[i] for i in b) * len(b) for b in batches)

    assert padding(buckets) < 0.1 < padding(plain)
    # batches are shuffled within each window, not sorted long-to-short across the epoch
    maxima = [max(lengths[i] for i in b) for b in buckets[:BUCKET_WINDOW]]
    assert maxima != sorted(maxima)
    # deterministic, resumable and splittable like the plain order
    assert global_batches(n, batch, 2, 2, lengths=lengths) == buckets
    assert global_batches(n, batch, 2, 4, lengths=lengths, done=37) == buckets[37:]
    assert bucketed(list(range(16)), [0.0] * 16, 8, seed=0, epoch=0) in ([*range(8), *range(8, 16)], [*range(8, 16), *range(8)])
