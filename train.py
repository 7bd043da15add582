"""Fine-tune with LoRA: one explicit training loop for every task, on one process or many.

    python train.py --targets 'audio_tower.*self_attn.(q|k|v|o)_proj'        # the offline audio-text demo
    python train.py --targets 'audio_tower.*self_attn\\.(q|k|v|out)_proj' \\
        --audio-model Qwen/Qwen2-Audio-7B-Instruct --text-model sentence-transformers/all-MiniLM-L6-v2 \\
        --train-data clotho_development.csv --eval-data clotho_evaluation.csv --output-dir runs/clotho
    python train.py --task instructblip --targets 'qformer.*\\.(query|key|value)'  # the offline VQA demo
    python train.py --task audio-qa                            # the offline audio question-answering demo
    torchrun --standalone --nproc_per_node 4 train.py ...      # the same run on 4 processes

The path of one optimizer step (tasks in tasks/, the engine's parts in engine/, models in models/):

    GlobalBatches (engine/batches.py): global batch k of the epoch -> this rank's micro-batches
    DataLoader workers: decode, resample, log-mel (audio) or RGB, resize, normalise (images); collate
    task.forward_backward(model, micro-batches)
      audio-text:   embeddings of every rank's micro-batches -> symmetric InfoNCE over the global
                    batch (gathered across ranks; GradCache across micro-batches)
      instructblip, audio-qa: answer-token cross-entropy, each micro-batch weighted by its share
                    of the global batch's answer tokens
      DDP averages the LoRA and head gradients over ranks, once, in the last micro-batch's backward
    clip gradients -> skip the update if anything is non-finite -> AdamW -> warmup/cosine lr

`--batch-size` is the global batch: examples per optimizer step over all ranks and accumulation
steps. The same command on 1 process or N, with any `--micro-batch-size`, trains the same run.
With no model or data flags it runs the task's offline demo: synthetic data and small random-init
models saved as real checkpoints (data/demo_sounds.py, data/demo_shapes.py, data/demo_models.py).
The flags become one typed RunConfig (common/run_config.py), the only thing the layers below see.
"""

import contextlib
import io
import os
import random
import signal
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import cli
from cli import RunOptions, config_from_args, options_from_args, print_config, resume_command
from common.distributed import Distributed, barrier, host_all_gather_object, init_distributed, main_first, rng_states
from common.distributed import set_rng_states, shutdown_distributed
from common.errors import UserError, user_message
from common.precision import Precision
from common.run_config import RunConfig
from common.run_files import CURVES_FILE, STATE_FILE, RunDirectory
from data.sampling import accumulation_steps, steps_for_epochs
from engine.batches import GlobalBatches, record_skipped
from engine.graceful_stop import StopRequests, Stopped
from engine.inspection import diagnose_one_batch, print_target_preview
from engine.nonfinite import NonFiniteGuard
from engine.outputs import check_output_dir, read_saved_state, save_outputs
from engine.reporting import MetricsLog, StepLog, describe_quantization, describe_setup, plot_curves, print_summary
from engine.training import (LaunchedStep, StepEnv, TrainingError, TrainState, WarmupCosine, param_groups,
                             set_train_mode, train_step)
from lora import LoRAConfig, cast_frozen, inject_lora, mark_only_lora_trainable
from lora.init import modifies_base
from lora.inject import all_linear_paths, expand_targets, initial_adapter
from lora.targets import check_target_alternatives, compact_paths
from tasks import TASKS


def parse_args(argv=None):
    """The flags (cli.py), with this file's docstring as the help's description."""
    return cli.parse_args(argv, description=__doc__)


class Recipe:
    """setup() builds everything, train() runs the loop, save_checkpoint() writes the outputs."""

    def __init__(self, config: RunConfig, options: RunOptions, env: Distributed, stop: StopRequests | None = None):
        self.config, self.options, self.env, self.stop = config, options, env, stop
        self.run = RunDirectory(options.output_dir)
        self.precision = Precision(config.precision)
        self.metrics = MetricsLog(self.run.metrics, env.main, options.report_to)
        self.task = self.model = self.lora_config = self.initial_adapter = None  # setup_task, inject
        self.batches = self.max_steps = None  # setup_data
        self.state = self.step_env = None  # setup_optimization
        self.ddp = self.steps = None  # setup, train
        self.last_eval = self.last_save = -1  # the steps evaluated and saved last

    def say(self, *text, **kwargs):
        if self.env.main:
            tqdm.write(" ".join(map(str, text)), **kwargs)

    def setup(self):
        """Output folder, task, model with LoRA, data, optimizer and state (resumed if asked), DDP."""
        seed = self.config.optim.seed
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
        check_output_dir(self.run, self.options.resume)
        self.setup_task()
        self.setup_model()
        self.setup_data()
        self.setup_optimization()
        set_train_mode(self.model)
        if self.options.resume:
            self.resume()
        # find_unused_parameters=False: every trainable parameter must get a gradient in every step;
        # train_step names any that does not, before DDP's own (index-only) error could
        self.ddp = self.model if self.env.world_size == 1 else DistributedDataParallel(
            self.model, device_ids=[self.env.device.index] if self.env.device.type == "cuda" else None,
            forward_sync_buffers=False, find_unused_parameters=False)
        # after DDP: wrapping broadcasts rank 0's tensors into every parameter, frozen ones too, in place, which
        # bumps their version counters and so would empty the frozen text tower's cache filled before it
        self.task.prepare(self.step_env, self.say)
        self.say(describe_setup(self.model, self.batches.sampler, self.max_steps, self.env.world_size, self.run.path))

    def setup_task(self):
        """The task with its model (no LoRA yet) and data; the config gains the demo's files, the audio folders
        found, and the targets with all-linear expanded."""
        config, env = self.config, self.env
        optim = config.optim
        # before any model is built: a size that does not divide is a typo to fix now
        try:
            accumulation_steps(optim.batch_size, env.world_size,
                               optim.micro_batch_size or optim.batch_size // env.world_size or 1)
        except ValueError as error:
            raise TrainingError(str(error)) from error
        torch.manual_seed(optim.seed)
        # only rank 0 prints
        with main_first(env), contextlib.redirect_stdout(sys.stdout if env.main else io.StringIO()):
            if config.sources.demo:
                config = config.replace(**TASKS[config.task].demo_sources(config, self.say))
            self.task = TASKS[config.task](config, self.say)
        config, model = self.task.config, self.task.model
        exclude = self.task.heads + list(config.lora.train_also)
        if any(t.lower() == "all-linear" for t in config.lora.targets):
            paths = all_linear_paths(model, exclude=exclude)
            self.say(f"--targets all-linear: {len(paths)} Linear layers: {'; '.join(compact_paths(paths))}")
        self.config = config.replace(targets=expand_targets(model, config.lora.targets, exclude=exclude))
        if config.model.quantize != "none":
            self.say(describe_quantization(model, config.model.quantize_keep))

    def setup_model(self):
        """The checks before LoRA goes in (targets the forward never runs, dead alternatives), then inject."""
        targets = list(self.config.lora.targets)
        strategy = self.task.forward_strategy(targets)
        # LoRA where the forward never runs: caught before anything runs
        if strategy is not None and strategy.misplaced:
            raise TrainingError("\n".join(strategy.findings()))
        warnings = check_target_alternatives(self.task.model, targets)
        if warnings and self.options.strict_targets:
            raise TrainingError(warnings.format(strict=True))
        if warnings:
            self.say(warnings.message)
        self.inject(targets)

    def inject(self, targets: list[str]):
        """LoRA where `targets` say, only LoRA, the heads and --train-also trainable, frozen weights held as the
        precision says, the model on its device with every gradient-checkpointing switch set."""
        model, lora = self.task.model, self.config.lora
        try:
            if targets:  # none: --diagnose with only targets the forward never runs, reported by the diagnosis
                self.lora_config = LoRAConfig.from_settings(lora, dict(model.named_modules()), targets)
                inject_lora(model, self.lora_config)
                # PiSSA/OLoRA: A and B as they start, so the adapter is saved as plain LoRA over the base as released
                self.initial_adapter = initial_adapter(model) if modifies_base(lora.init) else None
                mark_only_lora_trainable(model, also=self.task.heads + list(lora.train_also))
        except ValueError as error:
            raise TrainingError(f"--targets: {error}") from error
        if self.precision.frozen_dtype is not None:
            cast_frozen(model, self.precision.frozen_dtype)  # frozen towers held in bf16; LoRA and heads stay fp32
        model.to(self.env.device)
        for module in model.modules():  # every ported tower has the switch
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = self.options.grad_checkpointing
        self.model = model

    def setup_data(self):
        """This rank's global batches, and the length of the run (with --epochs, from the batches per epoch)."""
        self.batches = GlobalBatches(self.task, self.config, self.env)
        optim, per_epoch = self.config.optim, self.batches.sampler.batches_per_epoch
        self.max_steps = optim.max_steps or (steps_for_epochs(optim.epochs, per_epoch) if optim.epochs else 1000)
        warmup = optim.warmup_steps if optim.warmup_steps is not None else min(100, self.max_steps // 10)
        if warmup >= self.max_steps > 0:  # the learning rate would never reach its peak
            self.say(f"note: the warm-up ({warmup} steps) is not shorter than the run ({self.max_steps} steps), "
                     f"so the learning rate would never reach --lr; warming up over {self.max_steps // 10} steps "
                     "(10%) instead")
            warmup = self.max_steps // 10
        sampler = self.batches.sampler
        self.config = self.config.replace(
            max_steps=self.max_steps, warmup_steps=warmup, micro_batch_size=sampler.micro_batch,
            world_size=self.env.world_size, bucket_by_length=self.batches.lengths is not None,
            bucket_across_batches=sampler.across_batches)

    def setup_optimization(self):
        """AdamW, the schedule, the fp16 scaler, the autocast of --precision, and the state holding them."""
        optim, env = self.config.optim, self.env
        groups = param_groups(self.model, optim.weight_decay, lora_plus_ratio=self.config.lora.lora_plus_ratio)
        # fused: can skip an update on the device (found_inf)
        optimizer = torch.optim.AdamW(groups, lr=optim.lr, fused=True)
        schedule = WarmupCosine(optim.lr, optim.warmup_steps, self.max_steps, env.device, floor=optim.min_lr)
        scaler = self.precision.grad_scaler(env.device)  # fp16 gradients underflow without it
        self.step_env = StepEnv(env.device, lambda: self.precision.autocast(env.device),
                                lambda loss: scaler.scale(loss).backward(), env.world_size)
        self.state = TrainState(self.model, optimizer, schedule, scaler, self.config.fingerprint(),
                                world_size=env.world_size)
        self.state.skipped.update({s.path: dict(manifest=self.config.sources.train_data, line=s.line, reason=s.reason)
                                   for s in self.task.skipped_up_front})

    def resume(self):
        self.state.load_state_dict(read_saved_state(self.run, self.env))
        saved = self.state.rng
        if self.env.rank < len(saved):
            set_rng_states(saved[self.env.rank], self.env.device)
        else:  # more processes than the saved run: a fresh, deterministic stream for the new rank
            torch.manual_seed(self.config.optim.seed * 1_000_003 + self.state.step * 1000 + self.env.rank)
        self.say(f"resumed {self.run.path} at step {self.state.step} (epoch {self.state.epoch}, global batch "
                 f"{self.state.batches_done}); saved by {self.state.saved_world_size} process(es), "
                 f"now {self.env.world_size}")

    def evaluate(self, label: str) -> dict | None:
        """Rank 0 evaluates the unwrapped model while the others wait; the training RNG is untouched."""
        self.last_eval = self.state.step
        metrics = None
        if self.env.main:
            devices = [self.env.device] if self.env.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                metrics = self.task.evaluate(self.model, batch_size=self.config.optim.batch_size,
                                             workers=self.config.data.workers, precision=self.precision.name)
            if metrics is not None:
                self.say(self.task.format(metrics, f"{label}, step {self.state.step}"))
                self.metrics.log({"step": self.state.step, "eval": metrics})
        set_train_mode(self.model)
        barrier(self.env)
        return metrics

    def due(self, step: int, every: int | None, last: int = -1) -> bool:
        """Is `step` one where the loop evaluates or saves (every `every` steps, not done yet, not the last)?"""
        return 0 < step < self.max_steps and bool(every) and step % every == 0 and step != last

    def train(self) -> dict:
        env, state, schedule = self.env, self.state, self.config.schedule
        if env.main:
            self.run.path.mkdir(parents=True, exist_ok=True)
        self.metrics.start(state.step if self.options.resume else None, self.config.to_json())
        barrier(env)
        if not self.options.resume:
            state.history["before"] = self.evaluate("before training")
        self.stop.armed = True  # from here on a signal means: finish the step, save, then stop
        set_train_mode(self.model)
        guard = NonFiniteGuard(self.model, self.task, self.step_env, schedule.max_bad_steps, self.run.path, self.say,
                               self.metrics.log)
        self.steps = StepLog(self.metrics, guard, self.max_steps, env.main, initial=state.step)
        started = time.perf_counter() - state.elapsed
        launched: list[LaunchedStep] = []
        tick, stop = time.perf_counter(), None
        while stop is None:
            ahead = state.step + len(launched)  # the host must look before a step that evaluates, saves or ends
            if launched and (len(launched) >= schedule.log_every or ahead >= self.max_steps
                             or self.due(ahead, schedule.eval_every) or self.due(ahead, schedule.save_every)):
                self.steps.read(launched, state)
                launched = []
                if self.due(state.step, schedule.eval_every, self.last_eval):
                    self.evaluate("eval")
                if self.due(state.step, schedule.save_every, self.last_save):
                    self.save_checkpoint(started)
                tick = time.perf_counter()  # evaluation and saving are not training time
                continue
            if state.step >= self.max_steps:
                break
            stop = self.stop.agreed()  # every rank asks at the same point, so all stop after the same step
            if stop is not None:
                break
            micro_batches, data_wait = self.batches.next(state, self.say)
            record_skipped(micro_batches, state.skipped, self.config.sources.train_data, self.say)
            step = train_step(self.task, self.ddp, micro_batches, state.optimizer, state.schedule, state.scaler,
                              self.step_env, self.config.optim.grad_clip)
            now = time.perf_counter()
            step.data_wait, step.seconds, tick = data_wait, now - tick, now
            launched.append(step)
        self.steps.close()
        if stop is not None:
            self.steps.read(launched, state)
            self.save_checkpoint(started)
            raise Stopped(stop, state.step)
        state.history["after"] = self.evaluate("after training")
        self.save_checkpoint(started)
        if env.main:
            self.metrics.close()
            plot_curves(self.run.metrics, self.run / CURVES_FILE, self.task.curves())
            print_summary(self.model, state, self.task, self.run.path, self.config.sources.eval_data)
        return state.history

    def save_checkpoint(self, started: float):
        """Every rank's RNG is gathered (a collective); rank 0 writes."""
        self.last_save = self.state.step
        self.state.elapsed = time.perf_counter() - started
        self.state.rng = host_all_gather_object(rng_states(self.env.device))
        if self.env.main:
            save_outputs(self.run, self.model, self.lora_config, self.config, self.state.state_dict(),
                         self.initial_adapter)


# --- the commands ----------------------------------------------------------------------------


def list_targets(args) -> int:
    """--list-targets: what the patterns select, before anything is injected."""
    recipe = Recipe(config_from_args(args), options_from_args(args), Distributed())
    recipe.setup_task()
    return print_target_preview(recipe.task, recipe.config)


def run_diagnosis(args) -> int:
    """--diagnose: the gradient-flow checks on one real batch, in this process alone, on the model as training
    holds it (LoRA, frozen weights in the precision's dtype, gradient checkpointing)."""
    options = options_from_args(args)
    recipe = Recipe(config_from_args(args), options, Distributed(device=torch.device(options.device)))
    recipe.setup_task()
    # check 7 names it, and what it never runs
    strategy = recipe.task.forward_strategy(list(recipe.config.lora.targets))
    # targets that select only modules the strategy never loads are reported, not injected
    recipe.inject([t for t in recipe.config.lora.targets if strategy is None or t not in strategy.misplaced])
    return diagnose_one_batch(recipe.task, recipe.model, strategy, recipe.config.optim.batch_size, recipe.precision,
                              recipe.env.device)


def train(args) -> tuple[nn.Module, dict]:
    """The whole run; returns (model, history) so tests can inspect what training changed.
    Errors the user can fix are raised as UserError (TrainingError, ManifestError, ...); a SIGINT or
    SIGTERM during training saves a checkpoint and raises Stopped (engine/graceful_stop.py)."""
    options = options_from_args(args)
    if torch.device(options.device).type == "cuda":  # fp32 matmuls on tensor cores (TF32): ~8x the fp32 rate
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    env = init_distributed(options.device)
    recipe = None
    try:
        with StopRequests() as stop:
            recipe = Recipe(config_from_args(args), options, env, stop)
            recipe.setup()
            history = recipe.train()
        return recipe.model, history
    finally:
        if recipe is not None:  # let go of what holds the process group and the DataLoader workers
            recipe.ddp = None
            if recipe.batches is not None:
                recipe.batches.close()
        shutdown_distributed()


def main(argv=None) -> int:
    """The command line: a user's mistake is one `error:` line and exit 2 (a traceback only for
    bugs, or with --debug); a stop by signal says how to resume and exits 128 + its number."""
    argv = sys.argv[1:] if argv is None else list(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    speaks = int(os.environ.get("RANK", "0")) == 0  # under torchrun, one rank tells the user
    try:
        args = parse_args(argv)
    except UserError as error:  # a recipe file that cannot be used
        print(f"error: {user_message(error)}", file=sys.stderr)
        return 2
    try:
        if args.print_config:
            print(print_config(args))
            return 0
        if args.list_targets:
            return list_targets(args)
        if args.diagnose:
            return run_diagnosis(args)
        train(args)
        return 0
    except Stopped as stop:
        if speaks:
            print(f"stopped at step {stop.step}; continue with: {resume_command(argv, world_size)}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt as interrupt:  # before training began, or a second Ctrl-C
        if args.debug:
            raise
        if speaks:
            out = options_from_args(args).output_dir
            kept = (f"the last checkpoint in {out} is kept; continue with: {resume_command(argv, world_size)}"
                    if (out / STATE_FILE).exists() else "nothing was saved")
            print(f"\ninterrupted; {kept}", file=sys.stderr)
        return 128 + getattr(interrupt, "signum", signal.SIGINT)
    except UserError as error:  # the user's to fix: the message, no traceback
        if args.debug:
            raise
        # every rank that met the mistake says so (a bad file may sit in one rank's share of the data)
        rank = "" if speaks else f"(rank {os.environ['RANK']}) "
        print(f"error: {rank}{user_message(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
