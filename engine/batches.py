"""The training data, a global batch at a time: this rank's micro-batches of each global batch, epoch after
epoch, from a position a resume can restore exactly.

    GlobalBatchSampler (data/sampling.py)   global batch k of epoch e -> this rank's micro-batches (indices)
    DataLoader workers                      decode, log-mel or pixels, collate (the task's)
    GlobalBatches.next()                    the micro-batches of the next global batch, and the wait for them

The workers are forked once and kept (a fork of the training process at every epoch costs a step's worth of
copy-on-write page faults); each index carries its epoch instead (data/sampling.py WithEpoch). Worker seeds
come from a generator seeded by (seed, epoch), never from the global RNG.
"""

import itertools
import time

import torch
from torch.utils.data import DataLoader

from common.distributed import Distributed, host_all_gather_object, host_sum
from common.run_config import RunConfig
from data.sampling import GlobalBatchSampler, WithEpoch
from engine.graceful_stop import ignore_in_worker
from engine.training import TrainingError


class GlobalBatches:
    def __init__(self, task, config: RunConfig, env: Distributed):
        data, optim = config.data, config.optim
        try:
            bucket = data.bucket_by_length or data.bucket_across_batches
            self.lengths = task.lengths() if bucket else None  # None too when the task has no lengths
            self.sampler = GlobalBatchSampler(len(task.dataset), optim.batch_size, optim.micro_batch_size,
                                              env.world_size, env.rank, seed=optim.seed, lengths=self.lengths,
                                              across_batches=data.bucket_across_batches and self.lengths is not None,
                                              order=task.order)  # WebDataset shards: their shard-aware order
        except ValueError as error:
            raise TrainingError(f"{config.sources.train_data}: {error}") from error
        self.seed = optim.seed
        self.generator = torch.Generator()
        self.loader = DataLoader(task.dataset, batch_sampler=WithEpoch(self.sampler), num_workers=data.workers,
                                 generator=self.generator, collate_fn=task.collate,
                                 pin_memory=env.device.type == "cuda", persistent_workers=data.workers > 0,
                                 worker_init_fn=ignore_in_worker)
        self.iterator = None
        self.cache_counts = dict(hit=0, miss=0, recomputed=0)

    def next(self, state, say) -> tuple[list[dict], float]:
        """This rank's micro-batches of the next global batch (starting a new epoch when one ends, which
        advances state.epoch and state.batches_done), and the seconds spent waiting for them."""
        while True:
            if self.iterator is None:  # a new epoch (or a resume): the sampler starts at its position
                self.sampler.set_state(state.epoch, state.batches_done)
                self.generator.manual_seed(self.seed * 1_000_003 + state.epoch)
                self.iterator = iter(self.loader)
            wait = time.perf_counter()
            micro_batches = list(itertools.islice(self.iterator, self.sampler.accumulation))
            if micro_batches:
                state.batches_done += 1
                for batch in micro_batches:
                    for key, count in (batch.get("cache") or {}).items():
                        self.cache_counts[key] += count
                return micro_batches, time.perf_counter() - wait
            self.end_of_epoch(state.epoch, say)
            state.epoch, state.batches_done, self.iterator = state.epoch + 1, 0, None

    def end_of_epoch(self, epoch: int, say):
        hits, misses, recomputed = (host_sum(self.cache_counts[k]) for k in ("hit", "miss", "recomputed"))
        if misses + recomputed or (hits and epoch == 0):  # once a warm cache is plain, say so only once
            say(f"epoch {epoch} done; feature cache: {hits} hits, {misses} computed, "
                f"{recomputed} damaged entries recomputed")
        self.cache_counts = dict(hit=0, miss=0, recomputed=0)

    def close(self):
        """Let go of the DataLoader workers."""
        self.iterator = self.loader = None


def record_skipped(micro_batches: list[dict], skipped: dict, manifest: str, say):
    """Bad files met while decoding, on any rank (a collective): each distinct file is counted and listed
    once in `skipped` ({path: {"manifest", "line", "reason"}}), and said once."""
    local = [tuple(s) for batch in micro_batches for s in batch["skipped"]]
    for path, line, reason in [s for part in host_all_gather_object(local) for s in part]:
        if path not in skipped:
            skipped[path] = dict(manifest=manifest, line=line, reason=reason)
            say(f"skipped {path} (manifest line {line}): {reason}")
