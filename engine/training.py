"""One optimizer step of a LoRA fine-tune, and the state that makes a run resumable.

    step = train_step(task, model, micro_batches, optimizer, schedule, scaler, env, grad_clip)
    ...                                    # the host goes on to the next batch at once
    step.result()                          # later: "updated", "nonfinite", "overflow" or "empty"

`train_step` runs a task's forwards and backwards for every micro-batch of one global batch (the
task decides how: tasks/), clips the gradients, and updates. Whether the update is applied
is decided *on the device*: a NaN/inf loss or gradient turns fused AdamW's update into a no-op
(its `found_inf`, the mechanism GradScaler uses) and adds 0 to the schedule's count of applied
updates, so a bad step changes nothing, yet the host never stops to look. It reads what happened
later, for several steps at once (train.py --log-every), from a copy made asynchronously.

`TrainState` is everything a resume needs, in units of global batches, so the number of
processes or the micro-batch size may change between the saving run and the resuming one.
"""

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from common.distributed import host_sum, unwrap
from common.errors import UserError
from common.run_config import RunConfig


class TrainingError(UserError, RuntimeError):
    """A run that cannot go on as configured; the message says what to change. train.py's main()
    prints it and exits, nothing below it exits the process."""


@dataclass
class StepEnv:
    """What a task needs to run the forwards and backwards of one optimizer step."""

    device: torch.device
    autocast: Callable  # () -> context manager: the run's --precision
    backward: Callable[[torch.Tensor], None]  # scaler.scale(loss).backward()
    world_size: int = 1

    def sync(self, model: nn.Module, last: bool):
        """DDP all-reduces the gradients in one backward a step: the last micro-batch's."""
        if isinstance(model, DistributedDataParallel) and not last:
            return model.no_sync()
        return contextlib.nullcontext()


@dataclass
class TrainState:
    """Everything that makes a resume exact, in units of global batches so the number of processes
    may change: counters, trained tensors, optimizer, schedule, scaler, and every rank's RNG."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: "WarmupCosine"
    scaler: torch.amp.GradScaler
    fingerprint: dict  # the settings that define the run (RunConfig.fingerprint): a resume must match them
    world_size: int = 1
    step: int = 0  # optimizer updates done
    epoch: int = 0
    batches_done: int = 0  # global batches of this epoch taken from the sampler (skipped ones included)
    elapsed: float = 0.0  # training seconds before this process started
    history: dict = field(default_factory=dict)  # "before"/"after" evaluations
    skipped: dict = field(default_factory=dict)  # file -> {"manifest", "line", "reason"}: each bad file once
    bad_in_a_row: int = 0
    rng: list = field(default_factory=list)  # per rank, gathered at save time
    saved_world_size: int = 0  # processes of the run that wrote the state being resumed

    def state_dict(self) -> dict:
        trainable = {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        return dict(step=self.step, epoch=self.epoch, batches_done=self.batches_done, elapsed=self.elapsed,
                    history=self.history, skipped=self.skipped, world_size=self.world_size,
                    fingerprint=self.fingerprint, rng=self.rng, trainable=trainable,
                    optimizer=self.optimizer.state_dict(),
                    schedule=self.schedule.state_dict(), scaler=self.scaler.state_dict())

    def load_state_dict(self, state: dict):
        """Restore a saved run; refuses one whose defining settings differ, naming each."""
        saved = RunConfig.normalized_fingerprint(state["fingerprint"])  # a state of any version, today's defaults
        names = sorted(set(saved) | set(self.fingerprint))
        changed = [f"{name}: saved {saved.get(name)!r}, now {self.fingerprint.get(name)!r}"
                   for name in names if saved.get(name) != self.fingerprint.get(name)]
        if changed:
            raise TrainingError("--resume refused: these settings differ from the saved run's "
                                "(start a new --output-dir to change them):\n  " + "\n  ".join(changed))
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                params[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        for name in ("step", "epoch", "batches_done", "elapsed", "history", "skipped", "rng"):
            setattr(self, name, state[name])
        self.saved_world_size = state["world_size"]


# --- one optimizer step ----------------------------------------------------------------------


@dataclass
class StepResult:
    # "updated", "nonfinite" (skipped: NaN/inf loss or gradient), "overflow" (fp16 scaler),
    # "empty" (too few readable examples)
    status: str
    examples: int  # examples of the global batch that reached the model
    loss: float | None = None
    grad_norm: float | None = None
    lr: float | None = None


@dataclass
class LaunchedStep:
    """An optimizer step sent to the device. Whether it was applied is decided on the device, so the
    host goes on to the next batch at once and reads what happened later, in groups (--log-every)."""

    examples: int
    micro_batches: list[dict]  # kept until the step is read, for the non-finite guard's blame
    fp16: bool = False
    stats: torch.Tensor | None = None  # [loss, grad norm, loss finite, gradients finite, lr], copied to the host
    ready: object = None  # a CUDA event recorded after that copy; None on the CPU
    data_wait: float = 0.0  # seconds spent waiting for the batch
    seconds: float = 0.0  # wall time since the previous step was launched, data wait included

    def result(self) -> StepResult:
        if self.stats is None:
            return StepResult("empty", 0)  # every example of the global batch was unreadable
        if self.ready is not None:
            self.ready.synchronize()
        loss, grad_norm, loss_ok, grads_ok, lr = self.stats.tolist()
        if not loss_ok or (not grads_ok and not self.fp16):
            status = "nonfinite"
        else:  # fp16: inf gradients with a finite loss are the scaler's business (it skipped the update)
            status = "updated" if grads_ok else "overflow"
        return StepResult(status, self.examples, loss, grad_norm, lr)


class WarmupCosine:
    """The learning rate: linear warmup to `peak` over `warmup` updates, then cosine decay to `floor` (default 0)
    at `total`, as a device tensor computed from a device-side count of applied updates: a skipped (non-finite)
    step adds 0 to the count without the host having to look, so the schedule never advances on it and nothing
    waits for the GPU."""

    def __init__(self, peak: float, warmup: int, total: int, device: torch.device, floor: float = 0.0):
        self.peak, self.warmup, self.total, self.floor = peak, warmup, total, floor
        self.updates = torch.zeros((), dtype=torch.float64, device=device)

    def lr(self) -> torch.Tensor:
        s = self.updates
        progress = ((s - self.warmup) / max(1, self.total - self.warmup)).clamp(max=1.0)
        decayed = self.floor + (self.peak - self.floor) * (0.5 * (1 + torch.cos(math.pi * progress)))
        return torch.where(s < self.warmup, self.peak * ((s + 1) / (self.warmup + 1)), decayed).float()

    def count(self, applied: torch.Tensor):
        self.updates += applied

    def state_dict(self) -> dict:
        return {"updates": int(self.updates)}

    def load_state_dict(self, state: dict):
        self.updates.fill_(state["updates"])


def train_step(task, model, micro_batches, optimizer, schedule, scaler, env: StepEnv, grad_clip: float) -> LaunchedStep:
    """Forward and backward every micro-batch of one global batch, then the update, applied on the
    device only if the loss and the gradients are finite (fp16: the scaler judges the gradients)."""
    step = LaunchedStep(host_sum(sum(b["index"].numel() for b in micro_batches)), micro_batches, scaler.is_enabled())
    if step.examples < task.min_examples:  # e.g. a contrastive batch of one clip has no negative: nothing to learn
        step.examples = 0
        return step
    loss = task.forward_backward(model, micro_batches, env)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]  # every trainable parameter
    if any(p.grad is None for p in trainable):
        off_path = [n for n, p in unwrap(model).named_parameters() if p.requires_grad and p.grad is None]
        raise TrainingError(f"trainable parameter(s) received no gradient, so they sit off the forward path: "
                            f"{', '.join(off_path[:8])}{' ...' if len(off_path) > 8 else ''}. "
                            "Run `python train.py --diagnose` with the same flags to see where LoRA sits and what "
                            "the forward reaches")
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, grad_clip if grad_clip > 0 else float("inf"))
    loss_ok, grads_ok = torch.isfinite(loss), torch.isfinite(grad_norm)
    applied = loss_ok & grads_ok
    lr = schedule.lr()
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr  # LoRA+: B's groups run at lr·ratio
    if scaler.is_enabled():
        scaler.step(optimizer)  # skips, on the device, an update with inf gradients
        scaler.update()
    else:
        optimizer.found_inf = (~applied).float()  # fused AdamW: 1 turns the update into a no-op, on the device
        optimizer.step()
        del optimizer.found_inf
    schedule.count(applied)
    optimizer.zero_grad(set_to_none=True)
    stats = torch.stack([loss.detach().float(), grad_norm.float(), loss_ok.float(), grads_ok.float(), lr])
    if stats.is_cuda:  # an asynchronous copy into pinned memory, read when the loop next looks
        step.stats = torch.empty(stats.shape, pin_memory=True).copy_(stats, non_blocking=True)
        step.ready = torch.cuda.Event()
        step.ready.record()
    else:
        step.stats = stats
    return step


def param_groups(model: nn.Module, weight_decay: float, lora_plus_ratio: float | None = None) -> list[dict]:
    """AdamW groups. Without LoRA+: decay for matrices (LoRA A/B, projections); none for biases, norm
    weights and logit_scale (the CLIP/open_clip convention: decaying logit_scale pulls the temperature to 1).

    With `lora_plus_ratio` (LoRA+, Hayou et al. 2024, arXiv:2402.12354: B's learning rate ratio × A's,
    since with A and B at one rate the update of a wide layer is far from optimal), the groups are PEFT's
    `create_loraplus_optimizer` (peft/optimizers/loraplus.py) with its `loraplus_weight_decay` = weight_decay:
    lora_B and every 1-d tensor at lr·ratio, decayed unless inside an nn.LayerNorm or named *bias*;
    everything else (lora_A, trained matrices, a 0-d logit_scale) at lr, decayed. PEFT's fourth group,
    LoRA on nn.Embedding at a fixed 1e-6, is always empty here: this LoRA wraps Linear layers only.
    Each group's `lr_scale` is the factor train_step puts on the scheduled learning rate.
    """
    if lora_plus_ratio is None:
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 or name.endswith("logit_scale") else decay).append(param)
        return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
    if not lora_plus_ratio > 0:
        raise ValueError(f"the LoRA+ ratio must be positive (the paper uses 2 to 16), got {lora_plus_ratio!r}")
    in_layer_norm = {f"{path}.{name}" if path else name for path, m in model.named_modules()
                     if isinstance(m, nn.LayerNorm) for name, _ in m.named_parameters()}
    group_a, group_b, group_b_no_decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_B" in name or param.ndim == 1:
            (group_b_no_decay if name in in_layer_norm or "bias" in name else group_b).append(param)
        else:
            group_a.append(param)
    return [dict(params=group_a, weight_decay=weight_decay, lr_scale=1.0),
            dict(params=group_b, weight_decay=weight_decay, lr_scale=float(lora_plus_ratio)),
            dict(params=group_b_no_decay, weight_decay=0.0, lr_scale=float(lora_plus_ratio))]


def set_train_mode(model: nn.Module):
    """Train mode where something trains (LoRA dropout is on); eval mode for a fully frozen tower,
    whose dropout would only add noise to fixed features."""
    model.train()
    for child in model.children():
        if not any(p.requires_grad for p in child.parameters()):
            child.eval()
