"""Fine-tune with LoRA: one explicit training loop for every task, on one process or many.

    python train.py --targets 'audio_tower.*self_attn.(q|k|v|o)_proj'        # the offline audio-text demo
    python train.py --targets 'audio_tower.*self_attn\\.(q|k|v|out)_proj' \\
        --audio-model Qwen/Qwen2-Audio-7B-Instruct --text-model sentence-transformers/all-MiniLM-L6-v2 \\
        --train-data clotho_development.csv --eval-data clotho_evaluation.csv --output-dir runs/clotho
    python train.py --task instructblip --targets 'qformer.*\\.(query|key|value)'  # the offline VQA demo
    python train.py --task audio-qa                            # the offline audio question-answering demo
    torchrun --standalone --nproc_per_node 4 train.py ...      # the same run on 4 processes

The path of one optimizer step (tasks in data/tasks.py, models in models/):

    GlobalBatchSampler (data/sampling.py): global batch k of the epoch -> this rank's micro-batches
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
"""

import argparse
import contextlib
import hashlib
import io
import itertools
import json
import os
import random
import shlex
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from common.errors import UserError, user_message
from common.state_file import load_state, save_state
from data.sampling import GlobalBatchSampler, WithEpoch, accumulation_steps, steps_for_epochs
from data.tasks import TASKS
from lora import LoRAConfig, cast_frozen, inject_lora, mark_only_lora_trainable, save_adapter, trainable_summary
from lora.atomic import atomic_write, atomic_write_text
from lora.diagnose import blame_nonfinite, diagnose
from lora.graceful_stop import StopRequests, Stopped, ignore_in_worker
from lora.quant import NF4Linear, nf4_bytes
from lora.distributed import (Distributed, barrier, host_all_gather_object, host_sum, init_distributed, main_first, rng_states,
                              set_rng_states, shutdown_distributed)
from lora.training import LaunchedStep, StepEnv, StepResult, TrainingError, TrainState, WarmupCosine, param_groups, set_train_mode, train_step
from lora.summary import lora_placement
from lora.init import modifies_base
from lora.inject import all_linear_paths, expand_targets, initial_adapter
from lora.targets import check_target_alternatives, compact_paths, format_preview, preview_targets
from models.audio_text import ENCODING_STRATEGIES, autocast_dtype, save_heads

STATE_FILE = "training_state.safetensors"  # tensors + JSON (common/state_file.py): reading it runs no code
PICKLED_STATE_FILE = "training_state.pt"  # what earlier versions wrote, with torch.save: never unpickled
DEMO = {  # steps that fit a few CPU minutes
    "audio-text": dict(max_steps=600, eval_every=150, save_every=300, warmup_steps=50),
    "instructblip": dict(max_steps=1500, eval_every=300, save_every=750, warmup_steps=50, batch_size=16, lr=3e-3,
                         train_also=["language_projection"]),
    "audio-qa": dict(max_steps=1500, eval_every=500, save_every=750, warmup_steps=50, batch_size=16, lr=3e-3,
                     train_also=["multi_modal_projector"]),
}
# What defines a run: resuming with any of these changed would continue a different run, so it is refused.
FINGERPRINT = ("task", "audio_model", "text_model", "model", "train_data", "train_data_sha256", "targets", "rank", "alpha",
               "dropout", "rslora", "train_also", "embed_dim", "lr", "weight_decay", "batch_size", "warmup_steps",
               "max_steps", "grad_clip", "seed", "precision", "pad_to_30s", "language_model_dtype", "bucket_across_batches",
               "encoding_strategy", "quantize", "quantize_keep", "dora", "rank_pattern", "alpha_pattern", "lora_plus_ratio",
               "init")


def pattern_value(cast):
    """argparse type for REGEX=VALUE (split at the last '='): (regex, value)."""
    def parse(text: str):
        key, sep, value = text.rpartition("=")
        try:
            if not sep or not key:
                raise ValueError
            return key, cast(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected REGEX={cast.__name__.upper()}, e.g. 'q_proj=8'") from None
    return parse


def lora_init(text: str) -> str:
    if text in ("default", "gaussian", "pissa", "olora") or (text.startswith("pissa_niter_") and text[12:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: use default, gaussian, pissa, pissa_niter_N (N subspace iterations) or olora")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), default="audio-text")
    p.add_argument("--targets", action="append", help="regex fullmatched against module paths; repeat to OR "
                   "(default: the audio attention's q/k/v/out, or the Q-Former's query/key/value)")
    p.add_argument("--audio-model", help="Qwen2-Audio or Whisper checkpoint: directory or hub id (default: the demo preset)")
    p.add_argument("--text-model", help="BERT-family checkpoint with its tokenizer (default: the demo preset)")
    p.add_argument("--model", help="InstructBLIP checkpoint (--task instructblip), or a whole Qwen2-Audio (--task audio-qa)")
    p.add_argument("--language-model-dtype", choices=["fp32", "bf16"], default="fp32", help="the frozen language model's dtype: "
                   "instructblip's T5 or Vicuna (fp16 overflows flan-t5), audio-qa's and full_forward's Qwen2")
    p.add_argument("--encoding-strategy", choices=ENCODING_STRATEGIES, default="audio_tower", help="audio-text: encode a clip "
                   "with the audio tower alone (only its shards are read), or with the whole Qwen2-Audio after a fixed prompt, "
                   "pooling the language model's states over the audio positions (full_forward; LoRA may then sit on "
                   "language_model.*)")
    p.add_argument("--train-data", help="manifest: JSONL, Clotho CSV or AudioCaps CSV; instructblip: JSONL (default: the demo set)")
    p.add_argument("--eval-data", help="manifest evaluated every --eval-every steps and at the end")
    p.add_argument("--train-audio-dir", help="folder holding the training manifest's audio (default: beside the manifest, "
                   "or the split folder of a Clotho / AudioCaps layout, found automatically)")
    p.add_argument("--eval-audio-dir", help="the same for --eval-data")
    p.add_argument("--output-dir", help="default: runs/demo (runs/demo-instructblip, runs/demo-audio-qa), else runs/<task>")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r) instead of alpha/r")
    p.add_argument("--dora", action="store_true", help="DoRA (Liu et al. 2024): a trained magnitude per output row over the "
                   "normalised direction W + s·B@A (lora/dora.py)")
    p.add_argument("--rank-pattern", action="append", default=[], metavar="REGEX=R", type=pattern_value(int),
                   help="the rank of the layers a key selects (PEFT's rank_pattern: the first matching key wins); repeatable")
    p.add_argument("--alpha-pattern", action="append", default=[], metavar="REGEX=A", type=pattern_value(float),
                   help="the alpha of the layers a key selects (PEFT's alpha_pattern); repeatable")
    p.add_argument("--lora-plus-ratio", type=float, help="LoRA+ (Hayou et al. 2024): lora_B at this many times the learning "
                   "rate (PEFT's create_loraplus_optimizer; the paper suggests 16)")
    p.add_argument("--init", default="default", type=lora_init, help="how A and B start: default (Kaiming A, zero B), "
                   "gaussian, pissa, pissa_niter_N or olora (PiSSA and OLoRA move the top of W into the adapter; the adapter "
                   "is saved as plain LoRA over the base as released, lora/init.py)")
    p.add_argument("--train-also", action="append", default=[], help="extra module/parameter to train fully (repeatable)")
    p.add_argument("--embed-dim", type=int, default=256, help="width of the shared embedding space")
    p.add_argument("--batch-size", type=int, help="the GLOBAL batch: examples per optimizer step over all processes and "
                   "accumulation steps (default: 32; the instructblip demo: 16)")
    p.add_argument("--micro-batch-size", type=int, help="examples per process per forward (default: --batch-size / processes); "
                   "accumulation steps = batch / (processes x micro)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3; the instructblip demo: 3e-3)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decay of matrices; never of biases, norms or logit_scale")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: --epochs, else the demo's 600)")
    p.add_argument("--epochs", type=float, help="passes over the training set, when --max-steps is not given")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global L2 norm of the gradients (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast dtype; under bf16 the frozen weights are also held in bf16; LoRA weights and heads stay fp32")
    p.add_argument("--quantize", choices=["none", "nf4"], default="none", help="nf4: QLoRA, the frozen Linear layers of the "
                   "base held in 4-bit NormalFloat (lora/quant.py), quantized as each shard loads; LoRA, the trained heads, "
                   "norms, embeddings and the output head keep their dtype")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute tower blocks in backward: less memory")
    p.add_argument("--log-every", type=int, default=10, help="steps between the host's looks at the device: losses are "
                   "logged (every step) and non-finite steps reported then; the update itself is skipped on the device at once")
    p.add_argument("--eval-every", type=int, help="steps between evaluations (0: only before and after)")
    p.add_argument("--save-every", type=int, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--resume", action="store_true", help=f"continue from {STATE_FILE} in --output-dir")
    p.add_argument("--strict-targets", action="store_true", help="an alternative of a --targets pattern that matches "
                   "nothing (o_proj in '(q|k|v|o)_proj') is an error, not a warning")
    p.add_argument("--list-targets", action="store_true", help="print matched modules and trainable counts, then exit")
    p.add_argument("--diagnose", action="store_true", help="run the gradient-flow diagnosis on one batch, then exit")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="DataLoader workers per process")
    p.add_argument("--on-bad-audio", "--on-bad-image", dest="on_bad_input", choices=["fail", "skip"], default="fail",
                   help="a missing, undecodable or non-finite file, a training-manifest line that cannot be read, an "
                   "over-long prompt: stop with an error naming its manifest line, or skip it, counted once and listed in "
                   "skipped.jsonl (evaluation manifests are always strict)")
    p.add_argument("--bucket-by-length", action=argparse.BooleanOptionalAction, default=True,
                   help="audio-text: sort each global batch by clip length before cutting it into micro-batches, so a forward "
                   "pads little; the batch itself (the negatives) stays a random sample (default: on)")
    p.add_argument("--bucket-across-batches", action="store_true", help="audio-text: draw each global batch from "
                   "length-sorted windows of the epoch, so even one micro-batch a step pads little; changes the negatives "
                   "(clips of one length together) and cost the demo recall: see the README")
    p.add_argument("--no-feature-cache", action="store_true", help="compute the log-mel of every clip on every read "
                   "instead of once (cached under --cache-dir/features); the numbers are the same")
    p.add_argument("--pad-to-30s", action="store_true", help="pad every clip to 30 s as the reference does (slower)")
    p.add_argument("--max-bad-steps", type=int, default=5, help="abort after this many non-finite steps in a row")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache-dir", default=os.environ.get("LORA_MM_CACHE", str(Path.home() / ".cache" / "lora-mm")),
                   help="where the demo sets, demo models and feature cache live (default: $LORA_MM_CACHE, else ~/.cache/lora-mm); "
                   "safe to share between runs")
    p.add_argument("--debug", action="store_true", help="show the traceback of a mistake the message explains")
    return p.parse_args(argv)


# --- outputs ---------------------------------------------------------------------------------


def plot_curves(metrics_path: Path, png_path: Path, curves: tuple[str, str, dict]):
    """Training loss and the evaluations against steps, from metrics.jsonl, as a PNG (atomic)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if r.get("eval")]
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8)
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    ylabel, title, values = curves
    ax_eval.set(xlabel="step", ylabel=ylabel, title=title)
    for label, value in values.items():
        ax_eval.plot([r["step"] for r in evals], [value(r["eval"]) for r in evals], marker="o", label=label)
    ax_eval.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def save_outputs(out: Path, model, lora_config, run: dict, state: dict, initial: dict | None = None):
    """Adapter (PEFT format), heads, run config, skipped inputs, then the resumable state last:
    each file atomic, so a crash at any point leaves a loadable set."""
    save_adapter(model, out, lora_config, base_model_name_or_path=run.get("model") or run.get("audio_model"), initial=initial)
    save_heads(model, out / "heads.safetensors")
    atomic_write_text(out / "run_config.json", json.dumps(run, indent=2) + "\n")
    skipped = [dict(path=path, **entry) for path, entry in state["skipped"].items()]
    atomic_write_text(out / "skipped.jsonl", "".join(json.dumps(entry) + "\n" for entry in skipped))
    atomic_write(out / STATE_FILE, lambda tmp: save_state(state, tmp))


def before_checkpoint(line: str, step: int) -> bool:
    """Was this metrics.jsonl line written before the checkpoint of `step`? (An evaluation at that
    step comes before its checkpoint; a non-finite report at that step is about the next update.)"""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:  # the half-written last line of a killed run
        return False
    return record["step"] < step or (record["step"] == step and ("loss" in record or "eval" in record))


def file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- the recipe ------------------------------------------------------------------------------


def size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def output_dir(args) -> Path:
    """--output-dir, else runs/demo (runs/demo-instructblip, ...) for a demo and runs/<task> otherwise."""
    default = f"runs/demo{'' if args.task == 'audio-text' else '-' + args.task}" if is_demo(args) else f"runs/{args.task}"
    return Path(args.output_dir or default).resolve()


def resume_command(argv: list[str], world_size: int) -> str:
    """The command that continues this run: the same flags, with --resume."""
    flags = list(argv) + ([] if "--resume" in argv else ["--resume"])
    launcher = ["torchrun", f"--nproc_per_node={world_size}"] if world_size > 1 else ["python"]
    return shlex.join(launcher + ["train.py"] + flags)


def is_demo(args) -> bool:
    """No model and no data given for this task: run its offline demo."""
    given = [args.audio_model, args.text_model] if args.task == "audio-text" else [args.model]
    return not any(given + [args.train_data])


def build_task(args, env: Distributed, say):
    """The task with demo defaults filled in, and the targets; the model has no LoRA yet."""
    demo = is_demo(args)
    defaults = DEMO[args.task] if demo else {}
    args.batch_size = args.batch_size or defaults.get("batch_size", 32)
    args.lr = args.lr or defaults.get("lr", 1e-3)
    args.train_also = args.train_also or defaults.get("train_also", [])
    try:  # before any model is built: a size that does not divide is a typo to fix now
        accumulation_steps(args.batch_size, env.world_size, args.micro_batch_size or args.batch_size // env.world_size or 1)
    except ValueError as error:
        raise TrainingError(str(error)) from error
    torch.manual_seed(args.seed)
    with main_first(env), contextlib.redirect_stdout(sys.stdout if env.main else io.StringIO()):  # only rank 0 prints
        task = TASKS[args.task](args, demo, say)
    targets = expand_targets(task.model, args.targets or task.default_targets, exclude=task.heads + args.train_also)
    if any(t.lower() == "all-linear" for t in args.targets or []):
        paths = all_linear_paths(task.model, exclude=task.heads + args.train_also)
        say(f"--targets all-linear: {len(paths)} Linear layers: {'; '.join(compact_paths(paths))}")
    quantize = task.quantize
    task.run.update(quantize=args.quantize, quantize_keep=list(quantize.keep) if quantize else [])
    if quantize is not None:
        held, original = nf4_bytes(task.model)
        n_layers = sum(isinstance(m, NF4Linear) for m in task.model.modules())
        say(f"--quantize nf4: {n_layers} Linear layers held in NF4, {size(original)} -> {size(held)}; "
            f"kept in their dtype: the output head, norms, embeddings" + "".join(f", {k}" for k in quantize.keep))
    return task, targets, defaults


def lora_config(args, targets: list[str], model: nn.Module) -> LoRAConfig:
    """The LoRA of the flags: rank, alpha, dropout, rsLoRA, DoRA, per-module ranks and alphas, init, and the
    --train-also modules that are modules (PEFT's modules_to_save, so PEFT loads them with the adapter)."""
    modules = dict(model.named_modules())
    return LoRAConfig(targets, r=args.rank, alpha=args.alpha, dropout=args.dropout, rslora=args.rslora, use_dora=args.dora,
                      rank_pattern=dict(args.rank_pattern), alpha_pattern=dict(args.alpha_pattern), init=args.init,
                      modules_to_save=tuple(name for name in args.train_also if name in modules))


class Recipe:
    """setup() builds everything, train() runs the loop, save_checkpoint() writes the outputs."""

    def __init__(self, args, env: Distributed, stop: StopRequests):
        self.args, self.env, self.stop = args, env, stop
        self.last_eval = self.last_save = -1  # the steps evaluated and saved last

    def say(self, *text, **kwargs):
        if self.env.main:
            tqdm.write(" ".join(map(str, text)), **kwargs)

    def setup(self):
        """Output folder, task, model with LoRA, data, optimizer and state (resumed if asked), DDP."""
        args, env = self.args, self.env
        random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
        self.out = output_dir(args)
        if (self.out / PICKLED_STATE_FILE).exists() and not (self.out / STATE_FILE).exists():
            raise TrainingError(f"{self.out / PICKLED_STATE_FILE} is a pickle (torch.save), which could run any code when read, "
                                f"so it is not read: this toolkit keeps its state in {STATE_FILE}. Start a new --output-dir")
        if (self.out / STATE_FILE).exists() and not args.resume:
            raise TrainingError(f"{self.out} already holds a run: pass --resume to continue it, or another --output-dir")
        if args.resume and not (self.out / STATE_FILE).exists():
            raise TrainingError(f"--resume: no {STATE_FILE} in {self.out}")
        self.task, targets, defaults = build_task(args, env, self.say)
        self.model = self.setup_model(targets)
        lengths = self.setup_data()
        per_epoch = self.sampler.batches_per_epoch
        self.max_steps = args.max_steps or (steps_for_epochs(args.epochs, per_epoch) if args.epochs else defaults.get("max_steps", 1000))
        self.warmup = args.warmup_steps if args.warmup_steps is not None else defaults.get("warmup_steps", min(100, self.max_steps // 10))
        if self.warmup >= self.max_steps > 0:  # the learning rate would never reach its peak
            shorter = self.max_steps // 10
            self.say(f"note: the warm-up ({self.warmup} steps) is not shorter than the run ({self.max_steps} steps), so the "
                     f"learning rate would never reach --lr; warming up over {shorter} steps (10%) instead")
            self.warmup = shorter
        self.eval_every = args.eval_every if args.eval_every is not None else defaults.get("eval_every", 500)
        self.save_every = args.save_every if args.save_every is not None else defaults.get("save_every", 500)
        self.run = dict(self.task.run, targets=targets, rank=args.rank, alpha=args.alpha, dropout=args.dropout, rslora=args.rslora,
                        dora=args.dora, rank_pattern=dict(args.rank_pattern), alpha_pattern=dict(args.alpha_pattern),
                        lora_plus_ratio=args.lora_plus_ratio, init=args.init,
                        train_also=args.train_also, precision=args.precision, seed=args.seed, batch_size=args.batch_size,
                        micro_batch_size=self.sampler.micro_batch, world_size=env.world_size, lr=args.lr,
                        weight_decay=args.weight_decay, grad_clip=args.grad_clip, max_steps=self.max_steps, warmup_steps=self.warmup,
                        bucket_by_length=lengths is not None, bucket_across_batches=self.sampler.across_batches,
                        train_data_sha256=file_sha256(self.task.run["train_data"]))
        self.state = self.setup_optimization()
        set_train_mode(self.model)
        self.metrics_path = self.out / "metrics.jsonl"
        if args.resume:
            self.resume()
        elif env.main and self.metrics_path.exists():
            self.metrics_path.unlink()
        # find_unused_parameters=False: every trainable parameter must get a gradient in every step;
        # train_step names any that does not, before DDP's own (index-only) error could
        self.ddp = self.model if env.world_size == 1 else DistributedDataParallel(
            self.model, device_ids=[env.device.index] if env.device.type == "cuda" else None, forward_sync_buffers=False,
            find_unused_parameters=False)
        # after DDP: wrapping broadcasts rank 0's tensors into every parameter, frozen ones too, in place, which
        # bumps their version counters and so would empty the frozen text tower's cache filled before it
        self.task.prepare(self.step_env, self.say)

        self.say(trainable_summary(self.model))
        self.say(lora_placement(self.model))
        self.say(f"{self.max_steps} steps of {args.batch_size} examples ({per_epoch} per epoch) = {env.world_size} process(es) x "
                 f"{self.sampler.accumulation} micro-batch(es) of {self.sampler.micro_batch}; output {self.out}")
        if self.sampler.dropped_per_epoch:
            self.say(f"each epoch leaves out its last {self.sampler.dropped_per_epoch} example(s) (a partial global batch; the next "
                     "epoch reshuffles)")

    def setup_model(self, targets: list[str]) -> nn.Module:
        """The task's model with LoRA injected where the targets say, only LoRA and heads trainable."""
        args, model = self.args, self.task.model
        strategy = self.task.forward_strategy(targets)
        if strategy is not None and strategy.misplaced:  # the seeds' failure, caught before anything runs
            raise TrainingError("\n".join(strategy.findings()))
        warnings = check_target_alternatives(model, targets)
        if warnings and args.strict_targets:
            raise TrainingError(warnings.format(strict=True))
        if warnings:
            self.say(warnings.message)
        self.lora_config = lora_config(args, targets, model)
        try:
            inject_lora(model, self.lora_config)
            # PiSSA/OLoRA: A and B as they start, so the adapter is saved as plain LoRA over the base as released
            self.initial_adapter = initial_adapter(model) if modifies_base(args.init) else None
            mark_only_lora_trainable(model, also=self.task.heads + args.train_also)
        except ValueError as error:
            raise TrainingError(f"--targets: {error}") from error
        if args.precision == "bf16":
            cast_frozen(model, torch.bfloat16)  # frozen towers held in bf16; LoRA and heads stay fp32
        model.to(self.env.device)
        for module in model.modules():  # every ported tower has the switch
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = args.grad_checkpointing
        return model

    def setup_data(self) -> list[float] | None:
        """This rank's sampler and loader; returns the lengths batches are bucketed by (None: no bucketing)."""
        args, env = self.args, self.env
        try:
            bucket = args.bucket_by_length or args.bucket_across_batches
            lengths = self.task.lengths() if bucket else None  # None too when the task has no lengths
            self.sampler = GlobalBatchSampler(len(self.task.dataset), args.batch_size, args.micro_batch_size, env.world_size, env.rank,
                                              seed=args.seed, lengths=lengths, across_batches=args.bucket_across_batches and lengths is not None)
        except ValueError as error:
            raise TrainingError(f"{self.task.run['train_data']}: {error}") from error
        self.loader_generator = torch.Generator()  # worker seeds come from here, never from the global RNG
        # persistent workers: forked once (a fork of the training process at every epoch costs a step's worth
        # of copy-on-write page faults); each index carries its epoch instead (WithEpoch)
        self.loader = DataLoader(self.task.dataset, batch_sampler=WithEpoch(self.sampler), num_workers=args.workers,
                                 generator=self.loader_generator, collate_fn=self.task.collate, pin_memory=env.device.type == "cuda",
                                 persistent_workers=args.workers > 0, worker_init_fn=ignore_in_worker)
        return lengths

    def setup_optimization(self) -> TrainState:
        """AdamW, the schedule, the fp16 scaler, the autocast of --precision, and the state holding them."""
        args, env = self.args, self.env
        # fused: one kernel for all tensors, and it can skip an update on the device (found_inf)
        optimizer = torch.optim.AdamW(param_groups(self.model, args.weight_decay, lora_plus_ratio=args.lora_plus_ratio), lr=args.lr,
                                      fused=True)
        schedule = WarmupCosine(args.lr, self.warmup, self.max_steps, env.device)
        self.amp_dtype = autocast_dtype(args.precision)
        scaler = torch.amp.GradScaler(env.device.type, enabled=args.precision == "fp16")  # fp16 gradients underflow without it
        autocast = (lambda: torch.autocast(env.device.type, dtype=self.amp_dtype)) if self.amp_dtype else contextlib.nullcontext
        self.step_env = StepEnv(env.device, autocast, lambda loss: scaler.scale(loss).backward(), env.world_size)
        state = TrainState(self.model, optimizer, schedule, scaler, {name: self.run.get(name) for name in FINGERPRINT},
                           world_size=env.world_size)
        state.skipped.update({s.path: dict(manifest=self.run["train_data"], line=s.line, reason=s.reason) for s in self.task.skipped_up_front})
        return state

    def resume(self):
        state = None
        if self.env.main:
            state = load_state(self.out / STATE_FILE)
        if self.env.world_size > 1:  # rank 0 reads, every rank gets it: no shared file system needed
            holder = [state]
            dist.broadcast_object_list(holder, src=0)
            state = holder[0]
        self.state.load_state_dict(state)
        saved = self.state.rng
        if self.env.rank < len(saved):
            set_rng_states(saved[self.env.rank], self.env.device)
        else:  # more processes than the saved run: a fresh, deterministic stream for the new rank
            torch.manual_seed(self.args.seed * 1_000_003 + self.state.step * 1000 + self.env.rank)
        if self.env.main:
            # a crash after the checkpoint left later lines (and perhaps half a line): drop them, the
            # resumed run writes them again; and temporary files of writes the crash cut short
            lines = self.metrics_path.read_text().splitlines() if self.metrics_path.exists() else []
            kept = [line for line in lines if before_checkpoint(line, self.state.step)]
            atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))
            for stale in self.out.glob(".*.tmp-*"):
                stale.unlink(missing_ok=True)
        self.say(f"resumed {self.out} at step {self.state.step} (epoch {self.state.epoch}, global batch {self.state.batches_done}); "
                 f"saved by {self.state.saved_world_size} process(es), now {self.env.world_size}")

    def log(self, record: dict):
        if self.env.main:
            self.metrics_file.write(json.dumps(record) + "\n")

    def evaluate(self, label: str) -> dict | None:
        """Rank 0 evaluates the unwrapped model while the others wait; the training RNG is untouched."""
        self.last_eval = self.state.step
        metrics = None
        if self.env.main:
            devices = [self.env.device] if self.env.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                metrics = self.task.evaluate(self.model, batch_size=self.args.batch_size, device=self.env.device,
                                             workers=self.args.workers, autocast_dtype=self.amp_dtype, progress=False)
            if metrics is not None:
                self.say(self.task.format(metrics, f"{label}, step {self.state.step}"))
                self.log({"step": self.state.step, "eval": metrics})
        set_train_mode(self.model)
        barrier(self.env)
        return metrics

    def save_checkpoint(self, started: float):
        """Every rank's RNG is gathered (a collective); rank 0 writes."""
        self.last_save = self.state.step
        self.state.elapsed = time.perf_counter() - started
        self.state.rng = host_all_gather_object(rng_states(self.env.device))
        if self.env.main:
            save_outputs(self.out, self.model, self.lora_config, self.run, self.state.state_dict(), self.initial_adapter)
        barrier(self.env)

    def record_skipped(self, micro_batches: list[dict]):
        """Bad files met while decoding, on any rank: each distinct file is counted and listed once."""
        for batch in micro_batches:
            for key, count in (batch.get("cache") or {}).items():
                self.cache_counts[key] += count
        local = [tuple(s) for batch in micro_batches for s in batch["skipped"]]
        for path, line, reason in [s for part in host_all_gather_object(local) for s in part]:
            if path not in self.state.skipped:
                self.state.skipped[path] = dict(manifest=self.run["train_data"], line=line, reason=reason)
                self.say(f"skipped {path} (manifest line {line}): {reason}")

    def blame(self, micro_batches: list[dict]) -> tuple[str, list[tuple[str, int]]]:
        """Re-run this rank's micro-batches with hooks: where the first NaN/inf appeared, and the files
        to blame (the rows holding it when the batch itself is non-finite, else the whole micro-batch)."""
        for batch in micro_batches:
            if batch["index"].numel():
                blame = blame_nonfinite(self.model, lambda m, b=batch: self.task.micro_batch_loss(m, b, self.step_env),
                                        {self.task.input_key: batch[self.task.input_key]})
                if blame.found:
                    rows = blame.rows if blame.kind == "batch" else range(len(batch["paths"]))
                    return blame.message, [(batch["paths"][r], batch["lines"][r]) for r in rows]
        return "not reproduced by a re-run of the forward on this rank (the backward, or dropout)", []

    def on_nonfinite(self, result: StepResult, micro_batches: list[dict]):
        state = self.state
        state.bad_in_a_row += 1
        gathered = host_all_gather_object(self.blame(micro_batches))
        culprit = next((c for c, w in gathered if w), gathered[0][0])  # a rank that found the bad rows, else rank 0's account
        where = [w for _, ws in gathered for w in ws]
        self.say(f"step {state.step + 1}: non-finite loss {result.loss:.4g} / grad norm {result.grad_norm:.4g}; first non-finite "
                 f"output: {culprit}; step skipped ({state.bad_in_a_row} in a row); batch: "
                 + ", ".join(f"{path} (line {line})" for path, line in where))
        self.log({"step": state.step, "nonfinite": {"loss": str(result.loss), "first_module": culprit,
                                                     "paths": [path for path, _ in where]}})
        if state.bad_in_a_row >= self.args.max_bad_steps:
            raise TrainingError(f"aborting: {state.bad_in_a_row} non-finite steps in a row (first non-finite output: {culprit}); "
                                f"the last good checkpoint is kept in {self.out}")

    def next_global_batch(self) -> tuple[list[dict], float]:
        """This rank's micro-batches of the next global batch (starting a new epoch when one ends),
        and the seconds spent waiting for them."""
        state = self.state
        while True:
            if self.batches is None:  # a new epoch (or a resume): the sampler starts at its position
                self.sampler.set_state(state.epoch, state.batches_done)
                self.loader_generator.manual_seed(self.args.seed * 1_000_003 + state.epoch)
                self.batches = iter(self.loader)
            wait = time.perf_counter()
            micro_batches = list(itertools.islice(self.batches, self.sampler.accumulation))
            if micro_batches:
                state.batches_done += 1
                return micro_batches, time.perf_counter() - wait
            self.end_of_epoch()
            state.epoch, state.batches_done, self.batches = state.epoch + 1, 0, None

    def end_of_epoch(self):
        hits, misses, recomputed = (host_sum(self.cache_counts[k]) for k in ("hit", "miss", "recomputed"))
        if misses + recomputed or (hits and self.state.epoch == 0):  # once a warm cache is plain, say so only once
            self.say(f"epoch {self.state.epoch} done; feature cache: {hits} hits, {misses} computed, {recomputed} damaged "
                     "entries recomputed")
        self.cache_counts = dict(hit=0, miss=0, recomputed=0)

    def due(self, step: int) -> bool:
        """A step after which the loop must know where it stands: the last, an evaluation, a checkpoint."""
        return step >= self.max_steps or bool(self.eval_every and step % self.eval_every == 0) or bool(self.save_every and step % self.save_every == 0)

    def read_steps(self, launched: list[LaunchedStep]):
        """What the launched steps did, in order: count, log, or skip and blame. The one place the
        host waits for the device, once per --log-every steps or at an evaluation or checkpoint."""
        state = self.state
        for step in launched:
            result = step.result()
            if result.status == "nonfinite":
                self.on_nonfinite(result, step.micro_batches)
                continue
            if result.status != "updated":
                continue  # "empty": nothing readable in the global batch; "overflow": fp16 scaler skipped it
            state.bad_in_a_row = 0
            state.step += 1
            per_s = result.examples / max(step.seconds, 1e-9)  # wall time, waiting for data included
            # the share of log-mel frames that are padding (what --bucket-by-length keeps small)
            padding = [1 - b["frame_mask"].float().mean().item() for b in step.micro_batches if b.get("frame_mask") is not None]
            self.log({"step": state.step, "epoch": state.epoch, "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                      "examples_per_s": per_s, "data_wait_s": step.data_wait}
                     | ({"padding": sum(padding) / len(padding)} if padding else {}))
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{result.lr:.2e}", per_s=f"{per_s:.0f}")
            if self.env.main and self.bar.disable and (state.step % max(1, self.max_steps // 20) == 0 or state.step == 1):
                print(f"step {state.step}/{self.max_steps}  loss {result.loss:.4f}  lr {result.lr:.2e}  {per_s:.0f} examples/s", flush=True)

    def train(self) -> dict:
        args, env, state = self.args, self.env, self.state
        if env.main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.metrics_file = open(self.metrics_path, "a", encoding="utf-8", buffering=1)  # line-buffered
        barrier(env)
        if not args.resume:
            state.history["before"] = self.evaluate("before training")
        self.stop.armed = True  # from here on a signal means: finish the step, save, then stop
        set_train_mode(self.model)
        self.bar = tqdm(total=self.max_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
                        disable=None if env.main else True)
        self.batches, self.cache_counts = None, dict(hit=0, miss=0, recomputed=0)
        started = time.perf_counter() - state.elapsed
        launched: list[LaunchedStep] = []
        tick, stop = time.perf_counter(), None
        while stop is None:
            if launched and (len(launched) >= args.log_every or self.due(state.step + len(launched))):
                self.read_steps(launched)
                launched = []
                if 0 < state.step < self.max_steps and self.eval_every and state.step % self.eval_every == 0 and state.step != self.last_eval:
                    self.evaluate("eval")
                if 0 < state.step < self.max_steps and self.save_every and state.step % self.save_every == 0 and state.step != self.last_save:
                    self.save_checkpoint(started)
                tick = time.perf_counter()  # evaluation and saving are not training time
                continue
            if state.step >= self.max_steps:
                break
            stop = self.stop.agreed()  # every rank asks at the same point, so all stop after the same step
            if stop is not None:
                break
            micro_batches, data_wait = self.next_global_batch()
            self.record_skipped(micro_batches)
            step = train_step(self.task, self.ddp, micro_batches, state.optimizer, state.schedule, state.scaler,
                              self.step_env, args.grad_clip)
            now = time.perf_counter()
            step.data_wait, step.seconds, tick = data_wait, now - tick, now
            launched.append(step)
        self.bar.close()
        if stop is not None:
            self.read_steps(launched)
            self.save_checkpoint(started)
            raise Stopped(stop, state.step)
        state.history["after"] = self.evaluate("after training")
        self.save_checkpoint(started)
        if env.main:
            self.metrics_file.close()
            plot_curves(self.metrics_path, self.out / "training_curves.png", self.task.curves())
            self.summary()
        return state.history

    def summary(self):
        state = self.state
        summary = trainable_summary(self.model)
        print(f"\ndone: {state.step} steps in {state.elapsed / 60:.1f} min; trainable {summary.trainable:,} parameters ({100 * summary.share:.3f}%)")
        print(f"skipped inputs: {len(state.skipped)}" + (f" (listed in {self.out / 'skipped.jsonl'})" if state.skipped else ""))
        if state.history.get("before") and state.history.get("after"):
            print(f"before: {self.task.headline(state.history['before'])}")
            print(f"after:  {self.task.headline(state.history['after'])}")
        print(f"outputs in {self.out}: adapter_model.safetensors, adapter_config.json, heads.safetensors, run_config.json, "
              f"metrics.jsonl, skipped.jsonl, training_curves.png, {STATE_FILE}")
        print(f"evaluate again with: python eval.py --checkpoint {self.out}" + (f" --data {self.run['eval_data']}" if self.run["eval_data"] else ""))


def list_targets(args) -> int:
    """--list-targets: what the patterns select, before anything is injected."""
    task, targets, _ = build_task(args, Distributed(), print)
    preview = preview_targets(task.model, targets, lora_config(args, targets, task.model).rank_for)
    also = task.heads + args.train_also
    heads = sum(p.numel() for n, p in task.model.named_parameters() if any(n == h or n.startswith(h + ".") for h in also))
    print(format_preview(preview, targets, extra_trainable=heads))
    strategy = task.forward_strategy(targets)
    if strategy is not None and strategy.misplaced:  # a pattern aimed at modules this strategy never loads
        print("\n".join(strategy.findings()))
        return 1
    return 0 if preview.ok else 1


def run_diagnosis(args) -> int:
    """--diagnose: the gradient-flow checks on one real batch, in this process alone."""
    env = Distributed(device=torch.device(args.device))
    task, targets, _ = build_task(args, env, print)
    model = task.model
    strategy = task.forward_strategy(targets)  # what the forward runs; check 7 names it and its misplaced targets
    placeable = [t for t in targets if strategy is None or t not in strategy.misplaced]
    try:
        if placeable:  # targets that select only modules the strategy never loads are reported, not injected
            inject_lora(model, lora_config(args, placeable, model))
            mark_only_lora_trainable(model, also=task.heads + args.train_also)
    except ValueError as error:
        raise TrainingError(f"--targets: {error}") from error
    model.to(env.device)
    set_train_mode(model)
    amp_dtype = autocast_dtype(args.precision)
    autocast = (lambda: torch.autocast(env.device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    step_env = StepEnv(env.device, autocast, lambda loss: loss.backward())
    task.prepare(step_env, print)
    loader = DataLoader(task.dataset, batch_size=min(args.batch_size, len(task.dataset)), num_workers=0, collate_fn=task.collate)
    batch = next(b for b in loader if b["index"].numel())
    report = diagnose(model, lambda m: task.micro_batch_loss(m, batch, step_env), strategy)
    print(report)
    return 0 if report.ok else 1


def train(args) -> tuple[nn.Module, dict]:
    """The whole run; returns (model, history) so tests can inspect what training changed.
    Errors the user can fix are raised as UserError (TrainingError, ManifestError, ...); a SIGINT or
    SIGTERM during training saves a checkpoint and raises Stopped (lora/graceful_stop.py)."""
    if torch.device(args.device).type == "cuda":  # fp32 matmuls on tensor cores (TF32): ~8x the fp32 rate
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    env = init_distributed(args.device)
    recipe = None
    try:
        with StopRequests() as stop:
            recipe = Recipe(args, env, stop)
            recipe.setup()
            history = recipe.train()
        return recipe.model, history
    finally:
        if recipe is not None:  # let go of what holds the process group and the DataLoader workers
            recipe.ddp = recipe.batches = recipe.loader = None
        shutdown_distributed()


def main(argv=None) -> int:
    """The command line: a user's mistake is one `error:` line and exit 2 (a traceback only for
    bugs, or with --debug); a stop by signal says how to resume and exits 128 + its number."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    speaks = int(os.environ.get("RANK", "0")) == 0  # under torchrun, one rank tells the user
    try:
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
            out = output_dir(args)
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
