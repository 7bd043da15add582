"""train.py's command line: every flag, and the one RunConfig (common/run_config.py) they make.

The flags are read here and nowhere below: the recipe and everything it calls see the typed, frozen
RunConfig (what defines the run, saved as run_config.json) and RunOptions (how this invocation runs it).
A task's demo defaults fill what a demo run was not given.
"""

import argparse
import difflib
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from common.errors import UserError
from common.precision import PRECISIONS
from common.run_config import DataSettings, LoRASettings, ModelSettings, Optimization, RunConfig, Schedule, Sources
from common.run_files import STATE_FILE
from engine.reporting import REPORTERS
from models.audio_text import ENCODING_STRATEGIES
from tasks import TASKS
from tasks.inputs import resolved

DESCRIPTION = "Fine-tune with LoRA: one explicit training loop for every task, on one process or many (see train.py)."


def pattern_value(cast):
    """argparse type for REGEX=VALUE (split at the last '='): (regex, value)."""
    def parse(text: str):
        key, sep, value = text.rpartition("=")
        try:
            if not sep or not key:
                raise ValueError
            return key, cast(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected REGEX={cast.__name__.upper()}, "
                                             "e.g. 'q_proj=8'") from None
    return parse


def lora_init(text: str) -> str:
    if (text in ("default", "gaussian", "pissa", "olora")
            or (text.startswith("pissa_niter_") and text[12:].isdigit())):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: use default, gaussian, pissa, pissa_niter_N "
                                     "(N subspace iterations) or olora")


def parse_args(argv=None, description: str = DESCRIPTION):
    """The flags of `argv` over those of its --config recipe file (if any), over the defaults."""
    parser = build_parser(description)
    argv = sys.argv[1:] if argv is None else list(argv)
    recipe = argparse.ArgumentParser(add_help=False)
    recipe.add_argument("--config")
    path = recipe.parse_known_args(argv)[0].config
    if path is None:
        return parser.parse_args(argv)
    values = read_recipe(path, parser)
    repeated = {action.dest for action in parser._actions if isinstance(action, argparse._AppendAction)}
    parser.set_defaults(**{dest: value for dest, value in values.items() if dest not in repeated})
    args = parser.parse_args(argv)
    for dest in repeated & set(values):  # a repeatable flag given on the command line replaces the recipe's list
        if not getattr(args, dest):
            setattr(args, dest, values[dest])
    return args


def read_recipe(path, parser: argparse.ArgumentParser) -> dict:
    """A recipe file's settings as parsed flag values: YAML keys are the flag names (`batch-size: 32`, or
    batch_size), each value checked as the command line checks it; an unknown key is an error naming the
    nearest flag. Lists give repeatable flags (targets, train-also) their values."""
    try:
        settings = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file (the shipped recipes are in recipes/)") from None
    except yaml.YAMLError as error:
        raise UserError(f"--config {path}: not valid YAML: {error}") from None
    if not isinstance(settings, dict):
        raise UserError(f"--config {path}: expected a mapping of flag names to values, got a {type(settings).__name__}")
    actions = {option.lstrip("-"): action for action in parser._actions for option in action.option_strings}
    values = {}
    for key, value in settings.items():
        name = str(key).replace("_", "-")
        action = actions.get(name)
        if action is None or name in ("config", "help"):
            near = difflib.get_close_matches(name, list(actions), n=1)
            raise UserError(f"{path}: unknown key {key!r}"
                            + (f"; did you mean {near[0]!r} (--{near[0]})?" if near else ""))
        values[action.dest] = recipe_value(path, name, action, value)
    return values


def recipe_value(path, name: str, action: argparse.Action, value):
    """One recipe value as the command line would have parsed it, or a UserError naming the key."""
    def one(item):
        if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
            if not isinstance(item, bool):
                raise argparse.ArgumentTypeError(f"expected true or false, got {item!r}")
            return item
        item = action.type(str(item)) if action.type is not None else str(item)
        if action.choices is not None and item not in action.choices:
            raise argparse.ArgumentTypeError(f"{item!r} is not one of {', '.join(map(str, action.choices))}")
        return item

    try:
        if isinstance(action, argparse._AppendAction):
            return [one(item) for item in (value if isinstance(value, list) else [value])]
        return one(value)
    except (argparse.ArgumentTypeError, ValueError) as error:
        raise UserError(f"{path}: {name}: {error}") from None


def build_parser(description: str = DESCRIPTION) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="RECIPE.yaml", help="a recipe file setting any flag (YAML keys are the flag "
                   "names); flags on the command line override it. The shipped recipes are in recipes/")
    p.add_argument("--print-config", action="store_true", help="print the run configuration the flags and recipe "
                   "resolve to, then exit")
    p.add_argument("--task", choices=sorted(TASKS), default="audio-text")
    p.add_argument("--targets", action="append", help="regex fullmatched against module paths; repeat to OR "
                   "(default: the audio attention's q/k/v/out, or the Q-Former's query/key/value)")
    p.add_argument("--audio-model", help="Qwen2-Audio or Whisper checkpoint: directory or hub id "
                   "(default: the demo preset)")
    p.add_argument("--text-model", help="BERT-family checkpoint with its tokenizer (default: the demo preset)")
    p.add_argument("--model", help="InstructBLIP checkpoint (--task instructblip), or a whole Qwen2-Audio "
                   "(--task audio-qa)")
    p.add_argument("--language-model-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="the frozen language model's dtype: instructblip's T5 or Vicuna (fp16 overflows flan-t5), "
                   "audio-qa's and full_forward's Qwen2")
    p.add_argument("--encoding-strategy", choices=ENCODING_STRATEGIES, default="audio_tower",
                   help="audio-text: encode a clip with the audio tower alone (only its shards are read), or with the "
                   "whole Qwen2-Audio after a fixed prompt, pooling the language model's states over the audio "
                   "positions (full_forward; LoRA may then sit on language_model.*)")
    p.add_argument("--train-data", help="a manifest (JSONL, Clotho or AudioCaps CSV), a Hugging Face dataset on disk "
                   "(parquet files, a save_to_disk folder) or WebDataset shards ('shards/{000000..000099}.tar'); "
                   "default: the demo set")
    p.add_argument("--eval-data", help="data evaluated every --eval-every steps and at the end (any --train-data form)")
    for role, example in (("audio", "audio"), ("text", "caption / captions"), ("image", "image"),
                          ("prompt", "question"), ("answer", "answer")):
        p.add_argument(f"--{role}-column", help=f"a Hugging Face dataset's {role} column, or a shard json's key "
                       f"(default: found from the schema, e.g. {example!r})")
    p.add_argument("--train-audio-dir", help="folder holding the training manifest's audio (default: beside the "
                   "manifest, or the split folder of a Clotho / AudioCaps layout, found automatically)")
    p.add_argument("--eval-audio-dir", help="the same for --eval-data")
    p.add_argument("--output-dir", help="default: runs/demo (runs/demo-instructblip, runs/demo-audio-qa), "
                   "else runs/<task>")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r) instead of alpha/r")
    p.add_argument("--dora", action="store_true", help="DoRA (Liu et al. 2024): a trained magnitude per output row "
                   "over the normalised direction W + s·B@A (lora/dora.py)")
    p.add_argument("--rank-pattern", action="append", default=[], metavar="REGEX=R", type=pattern_value(int),
                   help="the rank of the layers a key selects (PEFT's rank_pattern: the first matching key wins); "
                   "repeatable")
    p.add_argument("--alpha-pattern", action="append", default=[], metavar="REGEX=A", type=pattern_value(float),
                   help="the alpha of the layers a key selects (PEFT's alpha_pattern); repeatable")
    p.add_argument("--lora-plus-ratio", type=float, help="LoRA+ (Hayou et al. 2024): lora_B at this many times the "
                   "learning rate (PEFT's create_loraplus_optimizer; the paper suggests 16)")
    p.add_argument("--init", default="default", type=lora_init, help="how A and B start: default (Kaiming A, "
                   "zero B), gaussian, pissa, pissa_niter_N or olora (PiSSA and OLoRA move the top of W into the "
                   "adapter; the adapter is saved as plain LoRA over the base as released, lora/init.py)")
    p.add_argument("--train-also", action="append", default=[],
                   help="extra module/parameter to train fully (repeatable)")
    p.add_argument("--embed-dim", type=int, default=256, help="width of the shared embedding space")
    p.add_argument("--batch-size", type=int, help="the GLOBAL batch: examples per optimizer step over all processes "
                   "and accumulation steps (default: 32; the instructblip demo: 16)")
    p.add_argument("--micro-batch-size", type=int, help="examples per process per forward (default: --batch-size / "
                   "processes); accumulation steps = batch / (processes x micro)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3; the instructblip demo: 3e-3)")
    p.add_argument("--min-lr", type=float, default=0.0, help="the learning rate the cosine decay ends at (default 0)")
    p.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW decay of matrices; never of biases, norms or logit_scale")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: --epochs, else the demo's 600)")
    p.add_argument("--epochs", type=float, help="passes over the training set, when --max-steps is not given")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global L2 norm of the gradients (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="autocast dtype; under bf16 the frozen weights are also held in bf16; LoRA weights and heads "
                   "stay fp32")
    p.add_argument("--quantize", choices=["none", "nf4"], default="none", help="nf4: QLoRA, the frozen Linear layers "
                   "of the base held in 4-bit NormalFloat (lora/quant.py), quantized as each shard loads; LoRA, the "
                   "trained heads, norms, embeddings and the output head keep their dtype")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute tower blocks in backward: less memory")
    p.add_argument("--log-every", type=int, default=10, help="steps between the host's looks at the device: losses "
                   "are logged (every step) and non-finite steps reported then; the update itself is skipped on the "
                   "device at once")
    p.add_argument("--eval-every", type=int, help="steps between evaluations (0: only before and after)")
    p.add_argument("--save-every", type=int, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--resume", action="store_true", help=f"continue from {STATE_FILE} in --output-dir")
    p.add_argument("--strict-targets", action="store_true", help="an alternative of a --targets pattern that matches "
                   "nothing (o_proj in '(q|k|v|o)_proj') is an error, not a warning")
    p.add_argument("--list-targets", action="store_true",
                   help="print matched modules and trainable counts, then exit")
    p.add_argument("--diagnose", action="store_true",
                   help="run the gradient-flow diagnosis on one batch, then exit")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="DataLoader workers per process")
    p.add_argument("--on-bad-audio", "--on-bad-image", dest="on_bad_input", choices=["fail", "skip"], default="fail",
                   help="a missing, undecodable or non-finite file, a training-manifest line that cannot be read, an "
                   "over-long prompt: stop with an error naming its manifest line, or skip it, counted once and "
                   "listed in skipped.jsonl (evaluation manifests are always strict)")
    p.add_argument("--bucket-by-length", action=argparse.BooleanOptionalAction, default=True,
                   help="audio-text: sort each global batch by clip length before cutting it into micro-batches, so "
                   "a forward pads little; the batch itself (the negatives) stays a random sample (default: on)")
    p.add_argument("--bucket-across-batches", action="store_true", help="audio-text: draw each global batch from "
                   "length-sorted windows of the epoch, so even one micro-batch a step pads little; changes the "
                   "negatives (clips of one length together) and cost the demo recall: see the README")
    p.add_argument("--no-feature-cache", action="store_true", help="compute the log-mel of every clip on every read "
                   "instead of once (cached under --cache-dir/features); the numbers are the same")
    p.add_argument("--pack", type=int, metavar="TOKENS", help="audio-qa, instructblip with a decoder-only language "
                   "model: put several examples end to end in rows of at most TOKENS language-model tokens, with a "
                   "block-diagonal attention and positions restarting per example (data/packing.py): no compute on "
                   "padding, the same loss")
    p.add_argument("--pad-to-30s", action="store_true", help="pad every clip to 30 s as the reference does (slower)")
    p.add_argument("--max-bad-steps", type=int, default=5, help="abort after this many non-finite steps in a row")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache-dir", default=os.environ.get("LORA_MM_CACHE", str(Path.home() / ".cache" / "lora-mm")),
                   help="where the demo sets, demo models and feature cache live (default: $LORA_MM_CACHE, else "
                   "~/.cache/lora-mm); safe to share between runs")
    p.add_argument("--report-to", action="append", default=[], choices=REPORTERS, help="also write every logged "
                   "step and evaluation to TensorBoard (event files under --output-dir/tensorboard) or to an offline "
                   "W&B run (needs wandb); repeatable. metrics.jsonl and the PNG are always written")
    p.add_argument("--debug", action="store_true", help="show the traceback of a mistake the message explains")
    return p



@dataclass(frozen=True)
class RunOptions:
    """How this invocation runs, beside what defines the run (RunConfig): where, on what, resumed or not."""

    output_dir: Path
    device: str
    resume: bool = False
    strict_targets: bool = False
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, the same numbers
    report_to: tuple[str, ...] = ()  # dashboards beside metrics.jsonl: tensorboard, wandb


def is_demo(args) -> bool:
    """No model and no data given for this task: run its offline demo."""
    return not any([getattr(args, name) for name in TASKS[args.task].given_sources] + [args.train_data])


def config_from_args(args) -> RunConfig:
    """The flags as a RunConfig, the task's demo defaults filling what was not given. What only setup can
    know (the demo's files, the expanded targets, the length of the run) is added by Recipe.setup."""
    task = TASKS[args.task]
    defaults = task.demo_defaults if is_demo(args) else {}
    train_also = tuple(args.train_also or defaults.get("train_also", ()))
    return RunConfig(
        sources=Sources(task=args.task, demo=is_demo(args), audio_model=args.audio_model, text_model=args.text_model,
                        model=args.model, train_data=resolved(args.train_data), eval_data=resolved(args.eval_data),
                        train_audio_dir=args.train_audio_dir, eval_audio_dir=args.eval_audio_dir),
        model=ModelSettings(embed_dim=args.embed_dim, encoding_strategy=args.encoding_strategy,
                            language_model_dtype=args.language_model_dtype, pad_to_30s=args.pad_to_30s,
                            quantize=args.quantize,
                            # NF4 leaves what trains in its dtype: the heads and the --train-also modules
                            quantize_keep=tuple(task.heads) + train_also if args.quantize != "none" else ()),
        lora=LoRASettings(targets=tuple(args.targets or task.default_targets), rank=args.rank, alpha=args.alpha,
                          dropout=args.dropout, rslora=args.rslora, dora=args.dora,
                          rank_pattern=tuple(args.rank_pattern), alpha_pattern=tuple(args.alpha_pattern),
                          init=args.init, lora_plus_ratio=args.lora_plus_ratio, train_also=train_also),
        optim=Optimization(
            lr=args.lr or defaults.get("lr", 1e-3), min_lr=args.min_lr, weight_decay=args.weight_decay,
            batch_size=args.batch_size or defaults.get("batch_size", 32), micro_batch_size=args.micro_batch_size,
            grad_clip=args.grad_clip, seed=args.seed,
            warmup_steps=args.warmup_steps if args.warmup_steps is not None else defaults.get("warmup_steps"),
            max_steps=args.max_steps or (None if args.epochs else defaults.get("max_steps")), epochs=args.epochs),
        data=DataSettings(on_bad_input=args.on_bad_input, bucket_by_length=args.bucket_by_length,
                          bucket_across_batches=args.bucket_across_batches, workers=args.workers,
                          feature_cache=not args.no_feature_cache, cache_dir=args.cache_dir, pack=args.pack,
                          audio_column=args.audio_column, text_column=args.text_column,
                          image_column=args.image_column, prompt_column=args.prompt_column,
                          answer_column=args.answer_column),
        schedule=Schedule(
            eval_every=args.eval_every if args.eval_every is not None else defaults.get("eval_every", 500),
            save_every=args.save_every if args.save_every is not None else defaults.get("save_every", 500),
            log_every=args.log_every, max_bad_steps=args.max_bad_steps),
        precision=args.precision)


def options_from_args(args) -> RunOptions:
    """--output-dir, else runs/demo (runs/demo-instructblip, ...) for a demo and runs/<task> otherwise."""
    default = (f"runs/demo{'' if args.task == 'audio-text' else '-' + args.task}" if is_demo(args)
               else f"runs/{args.task}")
    return RunOptions(Path(args.output_dir or default).resolve(), args.device, args.resume, args.strict_targets,
                      args.grad_checkpointing, tuple(dict.fromkeys(args.report_to)))


def print_config(args) -> str:
    """--print-config: the run configuration the flags, the recipe and the demo defaults resolve to (what
    setup completes later, the demo's files and the length of an --epochs run, is not known yet), and how
    this invocation would run it."""
    options = {name: str(value) if isinstance(value, Path) else value
               for name, value in vars(options_from_args(args)).items()}
    return json.dumps({"run_config": config_from_args(args).to_json(), "options": options}, indent=2)


def resume_command(argv: list[str], world_size: int) -> str:
    """The command that continues this run: the same flags, with --resume."""
    flags = list(argv) + ([] if "--resume" in argv else ["--resume"])
    launcher = ["torchrun", f"--nproc_per_node={world_size}"] if world_size > 1 else ["python"]
    return shlex.join(launcher + ["train.py"] + flags)
