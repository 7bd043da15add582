"""One run over many processes: where this process stands, and the few collectives training needs.

`torchrun --nproc_per_node N train.py ...` starts N processes with RANK, WORLD_SIZE and
LOCAL_RANK set; a plain `python train.py` is rank 0 of 1 and none of this communicates. The
engine is torch.distributed itself (DDP; NCCL between GPUs, gloo on CPUs): nothing here manages
processes. What it adds:

- `Distributed` and `init_distributed`: this rank, the world size, its device (one GPU per rank);
- host collectives on a gloo group (`host_sum`, `host_all_gather`): counts the host already knows
  (examples, answer tokens, row counts) are summed without an NCCL collective whose result would
  have to be read back from the GPU, a wait for everything queued before it;
- RNG states, per rank, for exact resumes and for GradCache's replay of dropout masks.
"""

import contextlib
import gc
import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run. A plain `python train.py` is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Distributed:
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; NCCL on CUDA (one GPU per process), gloo on CPU."""
    if "RANK" not in os.environ:
        return Distributed(device=torch.device(device))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    # torch.distributed.nn.functional is imported before the group exists: its functions default to
    # `group=group.WORLD`, evaluated at import, so imported later (DDP imports it, through
    # torch._dynamo) it would hold the default group for good, and shutdown_distributed could never
    # tear that group down.
    from torch.distributed.nn import functional  # noqa: F401
    # a long timeout: rank 0 evaluates alone while the others wait at a barrier
    dist.init_process_group(backend, timeout=timedelta(hours=2))
    host_group()  # created now, by every rank in the same order, as new_group requires
    return Distributed(dist.get_rank(), dist.get_world_size(), torch.device(device))


@contextlib.contextmanager
def main_first(env: Distributed):
    """Rank 0 runs the block first (building demo data, filling caches), then the others."""
    if env.world_size > 1 and not env.main:
        dist.barrier()
    yield
    if env.world_size > 1 and env.main:
        dist.barrier()


def barrier(env: Distributed):
    if env.world_size > 1:
        dist.barrier()


def shutdown_distributed():
    """Destroy the process groups at the end of a run, on every rank, once the DDP wrapper (which
    holds the default group) is dropped. A group is torn down (its worker threads joined) only when
    its last holder lets it go; one left alive until the interpreter exits can have a gloo thread
    free a collective's tensors while Python is being torn down, which aborts a run that went well
    ("terminate called without an active exception"). See also the import in init_distributed."""
    global _HOST_GROUP
    if not (dist.is_available() and dist.is_initialized()):
        return
    _HOST_GROUP = None
    gc.collect()  # the DDP wrapper sits in reference cycles: collect it, so only the registry holds a group
    dist.destroy_process_group()
    gc.collect()


def rng_states(device: torch.device) -> dict:
    return dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                numpy=np.random.get_state(), python=random.getstate())


def set_rng_states(states: dict, device: torch.device):
    torch.set_rng_state(states["torch"]), np.random.set_state(states["numpy"]), random.setstate(states["python"])
    if states.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


_HOST_GROUP = None


def host_group():
    """A gloo group for small host-side numbers (row counts, token counts): a collective on it
    never waits for the GPU, where reading a count back from an NCCL collective would. The
    default group when it already is gloo (CPU runs). Create it on every rank at start-up."""
    global _HOST_GROUP
    if not distributed() or dist.get_backend() == "gloo":
        return None
    if _HOST_GROUP is None:
        _HOST_GROUP = dist.new_group(backend="gloo")
    return _HOST_GROUP


def host_all_gather(value: int) -> list[int]:
    """Every rank's value of a host-side int, in rank order."""
    if not distributed():
        return [value]
    values = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
    dist.all_gather(values, torch.tensor([value]), group=host_group())
    return [int(v) for v in values]


def host_all_gather_object(obj) -> list:
    """Every rank's picklable `obj` (skipped files, RNG states, a blame), in rank order, over the host group."""
    if not distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj, group=host_group())
    return gathered


def host_sum(value: int) -> int:
    return sum(host_all_gather(value))


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over ranks of a device tensor (asynchronous on the GPU: nothing waits for it)."""
    if distributed():
        value = value.clone()
        dist.all_reduce(value)
    return value


def device_rng_state(device: torch.device):
    """The RNG a forward's dropout draws from: the CPU generator, and the device's on CUDA."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_device_rng_state(state, device: torch.device):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
