"""What the benchmarks measure with, in one place: a process's memory from /proc, a device barrier, one
timed training step of a layer, and the name of the device the figures come from."""

import platform
import time

import torch
from torch import nn


def memory_status(field: str, pid: str = "self") -> int:
    """VmRSS (now) or VmHWM (peak) in bytes, from /proc. Not ru_maxrss: Linux carries that over fork and exec,
    so a child would report at least its parent's RSS at the fork."""
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith(field + ":")).split()[1]) * 1024


def synchronize(device: torch.device):
    """Wait for the device's queued work (a CUDA timer otherwise stops before the kernels have run)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Seconds for one forward and backward, with the device synchronised on both ends."""
    synchronize(x.device)
    start = time.perf_counter()
    layer(x).backward(grad)
    synchronize(x.device)
    return time.perf_counter() - start


def device_name(device: torch.device | str = "cpu") -> str:
    """The GPU's name, or the CPU's model as /proc/cpuinfo gives it (what `lscpu` prints as "Model name")."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.machine()
