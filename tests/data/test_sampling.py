"""data/sampling.py: global batches cut into per-rank micro-batches, bucketing, exact resume."""

import pytest

from data.sampling import BUCKET_WINDOW, GlobalBatchSampler, accumulation_steps, bucketed, epoch_order


def global_batches(n, batch, world, micro, seed=3, epoch=5, lengths=None, done=0, across=False):
    """What every rank yields, regrouped into global batches (rank-major, as a gather rebuilds them)."""
    per_rank = []
    for rank in range(world):
        sampler = GlobalBatchSampler(n, batch, micro, world, rank, seed=seed, lengths=lengths, across_batches=across)
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
    with pytest.raises(ValueError, match=r"--batch-size 30 does not split over 4 processes; "
                                         r"use a multiple of 4, e\.g\. 28 or 32"):
        accumulation_steps(30, 4, 1)
    with pytest.raises(ValueError,
                       match=r"--micro-batch-size 3 does not divide the 8 examples .* use one of 1, 2, 4, 8"):
        accumulation_steps(16, 2, 3)
    with pytest.raises(ValueError, match="fewer than one global batch of 32"):
        GlobalBatchSampler(20, 32)
    sampler = GlobalBatchSampler(40, 8)
    with pytest.raises(ValueError, match="outside 0..5"):
        sampler.set_state(0, batches_done=6)


LENGTHS = [((i * 7919) % 300) / 10 for i in range(2000)]  # 0 .. 30 s, scattered


def padding(batches):
    """The share of the frames of `batches` that padding each to its longest clip would add."""
    longest = sum(max(LENGTHS[i] for i in b) * len(b) for b in batches)
    return (longest - sum(LENGTHS[i] for b in batches for i in b)) / longest


def micro_batches(batch, world, micro, **kwargs):
    out = []
    for rank in range(world):
        sampler = GlobalBatchSampler(len(LENGTHS), batch, micro, world, rank, seed=3, **kwargs)
        sampler.set_state(5)
        out.append(list(sampler))
    return out


def test_bucketing_sorts_within_the_global_batch_and_keeps_its_examples():
    plain = global_batches(2000, 32, 1, 32)
    bucketed = global_batches(2000, 32, 2, 4, lengths=LENGTHS)
    # the same examples in every global batch (the negatives of a contrastive loss), split otherwise
    assert [sorted(b) for b in bucketed] == [sorted(b) for b in plain]
    assert (global_batches(2000, 32, 1, 4, lengths=LENGTHS, done=11)
            == global_batches(2000, 32, 1, 4, lengths=LENGTHS)[11:])
    # forwards pad little: micro-batches hold clips of similar length
    sorted_micro = [m for rank in micro_batches(32, 2, 4, lengths=LENGTHS) for m in rank]
    plain_micro = [m for rank in micro_batches(32, 2, 4) for m in rank]
    assert padding(sorted_micro) < 0.1 < padding(plain_micro)
    # micro-batches are dealt to the ranks in turn: each rank gets short and long clips
    ranks = micro_batches(32, 2, 4, lengths=LENGTHS)
    first_step = [[LENGTHS[i] for m in rank[:4] for i in m] for rank in ranks]
    assert max(first_step[0]) > 20 and max(first_step[1]) > 20 and min(first_step[0]) < 10 and min(first_step[1]) < 10
    # with one micro-batch a step there is nothing to sort between
    assert padding(global_batches(2000, 32, 1, 32, lengths=LENGTHS)) == pytest.approx(padding(plain))


def test_bucketing_across_batches_groups_similar_lengths_and_stays_a_permutation_of_the_epoch():
    n, batch = 2000, 8
    lengths = LENGTHS
    plain = global_batches(n, batch, 1, batch, lengths=None)
    buckets = global_batches(n, batch, 1, batch, lengths=lengths, across=True)
    assert sorted(i for b in buckets for i in b) == sorted(i for b in plain for i in b)  # the same examples this epoch
    assert padding(buckets) < 0.1 < padding(plain)
    # batches are shuffled within each window, not sorted long-to-short across the epoch
    maxima = [max(lengths[i] for i in b) for b in buckets[:BUCKET_WINDOW]]
    assert maxima != sorted(maxima)
    # deterministic, resumable and splittable like the plain order (within a batch, sorted by length)
    assert ([sorted(b) for b in global_batches(n, batch, 2, 2, lengths=lengths, across=True)]
            == [sorted(b) for b in buckets])
    assert (global_batches(n, batch, 2, 4, lengths=lengths, done=37, across=True)
            == global_batches(n, batch, 2, 4, lengths=lengths, across=True)[37:])
    assert bucketed(list(range(16)), [0.0] * 16, 8, seed=0, epoch=0) in ([*range(8), *range(8, 16)],
                                                                         [*range(8, 16), *range(8)])
