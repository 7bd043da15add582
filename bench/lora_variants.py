"""LoRA, rsLoRA, DoRA, LoRA+ and PiSSA trained the same way: time per step, peak memory, final recall.

A benchmark, not a test. Each variant is one `python train.py ...` in a fresh process, with the same
rank, alpha, dropout, steps, seed and data, so no variant inherits another's allocator or threads. One
untimed warm-up run (plain LoRA, the same steps and seed, so the same clips) goes first: it fills the on-disk
log-mel cache that every later run reads, so the first variant does not pay for computing it alone.
With `--rounds N` the variants run in turn N times, each round starting one variant later, so a busy spell
of the machine does not fall on one variant alone. The table holds, per variant:

    s/step      wall time of the fastest optimizer step, data wait included (metrics.jsonl's examples_per_s
                over run_config.json's global batch), the first step left out (it pays for warm-up), lowest
                over the rounds. Other work on the machine only ever adds time, and on a shared CPU it
                doubles some steps and not others; every variant sees the same batches (the same seed), so
                their fastest steps compare like with like
    xLoRA       that time over plain LoRA's, from the same bench run
    median      the median step of a run (lowest over the rounds): what a run took, noise included
    peak MiB    the child process's maximum resident set size (os.wait4's ru_maxrss)
    R@1, R@10   the last evaluation in metrics.jsonl (after training), both directions
    wall s      the whole process: start, data and model setup, both evaluations, saving (lowest over rounds)
    cpu s       the CPU time (user + system) of the whole process (lowest over rounds): time spent waiting for a
                core is not counted, but threads spinning while their partner waits are

Then a layer-level timing, as bench/lora_layer.py: one forward+backward of our DoRA layer against PEFT's
DoRA on the same shapes (Qwen2-Audio attention, 1280x1280), with dropout 0 (the case with PEFT's faster path),
our and PEFT's plain LoRA beside them, all four alternating so machine noise hits each alike; the goal and the
ratios are read on the medians (steadier from run to run than a single fastest repeat), the fastest printed
beside. The input requires grad, as for every LoRA layer but the first in a tower, so backward runs through the
base weight.

    python bench/lora_variants.py                                    # the offline demo, 20 steps each
    python bench/lora_variants.py --rounds 3                         # on a busy machine: more chances at quiet
    python bench/lora_variants.py --steps 100 --variants lora,dora --json runs/variants.json
    python bench/lora_variants.py --audio-model DIR --text-model DIR --train-data M.csv --eval-data E.csv
    python bench/lora_variants.py --variants none                    # the layer-level timing alone

Needs the dev requirements (peft) for the layer-level timing. Times are wall-clock on whatever else the
machine runs: compare ratios from one bench run, never numbers across machines or runs.
"""

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.measure import device_name, time_step  # noqa: E402
from common.atomic import atomic_write_text  # noqa: E402
from common.run_files import read_run_config  # noqa: E402
from lora import LoRAConfig, inject_lora  # noqa: E402

# name: the train.py flags that make the variant, on top of the settings every variant shares
VARIANTS = {
    "lora": [],
    "rslora": ["--rslora"],
    "dora": ["--dora"],
    "lora+": ["--lora-plus-ratio", "16"],  # the ratio the LoRA+ paper suggests
    "pissa": ["--init", "pissa"],
}
DORA_GOAL = 1.15  # DoRA's step at most this many times LoRA's, dropout 0 (PEFT users report 1.2x to 2x)
PASS_THROUGH = ("audio_model", "text_model", "train_data", "eval_data", "train_audio_dir", "eval_audio_dir")
LOG_TAIL = 2000  # characters of a failed run's output to show


@dataclass
class VariantRun:
    """What one variant's training process gave: its timings, memory and final recall, or why it failed."""

    variant: str
    flags: list[str]
    step_s: float = math.nan  # the fastest step
    median_step_s: float = math.nan
    peak_rss_mib: float = math.nan
    wall_s: float = math.nan
    cpu_s: float = math.nan
    recall: dict = field(default_factory=dict)  # {"text_to_audio": {"R@1": .., ...}, "audio_to_text": {...}}
    error: str | None = None


def train_command(variant: str, args, out_dir: Path) -> list[str]:
    """The train.py command line of one variant: shared settings, the passed-through data, the variant's flags."""
    shared = ["--rank", str(args.rank), "--alpha", str(args.alpha), "--dropout", str(args.dropout),
              "--max-steps", str(args.steps), "--warmup-steps", str(args.steps // 10), "--seed", str(args.seed),
              "--eval-every", "0", "--save-every", "0", "--output-dir", str(out_dir)]
    if args.batch_size:
        shared += ["--batch-size", str(args.batch_size)]
    for name in PASS_THROUGH:
        if getattr(args, name):
            shared += [f"--{name.replace('_', '-')}", getattr(args, name)]
    return [sys.executable, str(ROOT / "train.py"), *shared, *args.train_arg, *VARIANTS[variant]]


def run_variant(variant: str, args, work_dir: Path, label: str | None = None) -> VariantRun:
    """Train one variant in a fresh process and read its numbers back from its output directory."""
    label = label or variant.replace("+", "-plus")  # "+" is awkward in a folder name
    out_dir, log_path = work_dir / label, work_dir / f"{label}.log"
    command = train_command(variant, args, out_dir)
    result = VariantRun(variant, VARIANTS[variant])
    print(f"[{label}] {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        # wait4, not child.wait(): it also returns the child's resource usage, ru_maxrss in KiB on Linux
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    result.wall_s, result.peak_rss_mib = time.perf_counter() - start, usage.ru_maxrss / 1024
    result.cpu_s = usage.ru_utime + usage.ru_stime
    if child.returncode != 0:
        result.error = f"train.py exited with {child.returncode}; the end of {log_path}:\n" + log_tail(log_path)
        return result
    try:
        result.step_s, result.median_step_s, result.recall = read_run(out_dir)
    except (OSError, ValueError, KeyError) as error:
        result.error = f"{out_dir} cannot be read ({error}); the end of {log_path}:\n" + log_tail(log_path)
    return result


def run_rounds(args, work_dir: Path) -> list[VariantRun]:
    """Every variant `args.rounds` times, in turn, each round rotated by one; one combined result per variant."""
    rounds = []
    for k in range(args.rounds):
        order = args.variants[k % len(args.variants):] + args.variants[: k % len(args.variants)]
        suffix = "" if args.rounds == 1 else f"-round{k + 1}"
        rounds.append({v: run_variant(v, args, work_dir, label=v.replace("+", "-plus") + suffix) for v in order})
    return [best_of([runs[variant] for runs in rounds]) for variant in args.variants]


def best_of(runs: list[VariantRun]) -> VariantRun:
    """One variant's rounds as one result: the lowest times (noise only adds), the highest memory, the first
    round's recall (the same seed trains the same run). A failed round makes the result failed."""
    failed = [r for r in runs if r.error is not None]
    if failed:
        return failed[0]
    return VariantRun(runs[0].variant, runs[0].flags, step_s=min(r.step_s for r in runs),
                      median_step_s=min(r.median_step_s for r in runs),
                      peak_rss_mib=max(r.peak_rss_mib for r in runs), wall_s=min(r.wall_s for r in runs),
                      cpu_s=min(r.cpu_s for r in runs), recall=runs[0].recall)


def log_tail(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL:]


def read_run(out_dir: Path) -> tuple[float, dict]:
    """(seconds of the fastest and of the median optimizer step, the last evaluation) from a train.py output
    directory."""
    batch = read_run_config(out_dir).optim.batch_size
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
               if line.strip()]
    steps = [r for r in records if "examples_per_s" in r]
    evals = [r["eval"] for r in records if "eval" in r]
    if not steps or not evals:
        raise ValueError(f"metrics.jsonl holds {len(steps)} step record(s) and {len(evals)} evaluation(s); "
                         "a finished run has at least one of each")
    timed = steps[1:] or steps  # the first step pays for warm-up (allocations, the first forward)
    seconds = [batch / r["examples_per_s"] for r in timed]
    return min(seconds), statistics.median(seconds), evals[-1]


def format_table(runs: list[VariantRun]) -> str:
    """The runs as a Markdown table; a failed run gets its row, marked failed."""
    lora_step = next((r.step_s for r in runs if r.variant == "lora" and r.error is None), math.nan)
    columns = ["variant", "flags", "s/step", "xLoRA", "median", "peak MiB", "t2a R@1", "t2a R@10", "a2t R@1",
               "a2t R@10", "wall s", "cpu s"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in runs:
        flags = " ".join(r.flags) or "(none)"
        if r.error is not None:
            lines.append(f"| {r.variant} | {flags} | failed |" + "  |" * (len(columns) - 3))
            continue
        t2a, a2t = r.recall["text_to_audio"], r.recall["audio_to_text"]
        recall = " | ".join(f"{d[k]:.2f}" for d in (t2a, a2t) for k in ("R@1", "R@10"))
        lines.append(f"| {r.variant} | {flags} | {r.step_s:.3f} | {r.step_s / lora_step:.2f} | {r.median_step_s:.3f} "
                     f"| {r.peak_rss_mib:.0f} | {recall} | {r.wall_s:.1f} | {r.cpu_s:.1f} |")
    return "\n".join(lines)


def layer_timing(dim: int, tokens: str, rank: int, repeats: int, warmup: int, device: str) -> dict[str, dict]:
    """Milliseconds of one training step of a dim x dim layer, ours and PEFT's, LoRA and DoRA, dropout 0:
    {"ours LoRA": {"min": .., "median": ..}, ...}."""
    from peft import LoraConfig, get_peft_model

    batch, length = (int(n) for n in tokens.split("x"))
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(dim, dim)).to(device).requires_grad_(False)
    layers = {}
    for use_dora in (False, True):
        name = "DoRA" if use_dora else "LoRA"
        ours = copy.deepcopy(base)
        inject_lora(ours, LoRAConfig("0", r=rank, alpha=2 * rank, dropout=0.0, use_dora=use_dora))
        layers[f"ours {name}"] = ours.train()
        peft_config = LoraConfig(target_modules="0", r=rank, lora_alpha=2 * rank, lora_dropout=0.0, use_dora=use_dora)
        layers[f"PEFT {name}"] = get_peft_model(copy.deepcopy(base), peft_config).train()
    x = torch.randn(batch, length, dim, device=device, requires_grad=True)  # a layer inside the tower: grad flows on
    grad = torch.randn(batch, length, dim, device=device)
    for _ in range(warmup):
        for layer in layers.values():
            time_step(layer, x, grad)
    times = {name: [] for name in layers}
    names = list(layers)
    for repeat in range(repeats):  # alternate, and rotate who goes first, so drift and noise fall on all four
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            times[name].append(time_step(layers[name], x, grad))
    return {name: {"min": 1e3 * min(values), "median": 1e3 * statistics.median(values)}
            for name, values in times.items()}


def format_layer_timing(ms: dict[str, dict], args) -> str:
    """The four layers' times, and the ratios on the medians (the fastest repeats' beside)."""
    ratio = {stat: (ms["ours DoRA"][stat] / ms["ours LoRA"][stat], ms["PEFT DoRA"][stat] / ms["PEFT LoRA"][stat],
                    ms["ours DoRA"][stat] / ms["PEFT DoRA"][stat]) for stat in ("min", "median")}
    lines = [f"layer step (forward+backward): {args.layer_dim}x{args.layer_dim}, tokens {args.layer_tokens}, "
             f"r {args.rank}, dropout 0, input requiring grad, {args.layer_repeats} alternating repeats",
             f"  {'':9s} {'median':>9s} {'fastest':>9s}"]
    lines += [f"  {name:9s} {value['median']:9.2f} {value['min']:9.2f} ms" for name, value in ms.items()]
    ours, peft, ours_peft = ratio["median"]
    met = "met" if ours <= DORA_GOAL else "not met"
    lines.append(f"DoRA step <= {DORA_GOAL}x LoRA's step time with dropout 0: {met} (ours {ours:.3f}x; PEFT's DoRA "
                 f"{peft:.3f}x PEFT's LoRA; fastest repeats: ours {ratio['min'][0]:.3f}x, PEFT {ratio['min'][1]:.3f}x)")
    lines.append(f"ours DoRA / PEFT DoRA = {ours_peft:.3f}  (fastest repeats {ratio['min'][2]:.3f}; below 1 means "
                 "ours is faster)")
    return "\n".join(lines)


def machine() -> str:
    """The CPU model, core count and torch threads: what the figures were measured on."""
    return f"{device_name()}; {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; torch {torch.__version__}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)}; 'none' runs only the layer-level timing")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps of every variant (train.py --max-steps)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="times every variant is trained, in turn (more on a busy machine; the times are the "
                             "lowest over the rounds)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--dropout", type=float, default=0.0, help="0: DoRA's faster path, as in the layer timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, help="the global batch (default: train.py's)")
    for name in PASS_THROUGH:
        parser.add_argument(f"--{name.replace('_', '-')}", help="passed to train.py (default: the offline demo's)")
    parser.add_argument("--train-arg", action="append", default=[],
                        help="one more train.py argument for every variant, e.g. --train-arg=--workers=0 (repeatable)")
    parser.add_argument("--keep-runs", help="write the runs' output directories and logs here (default: a temporary "
                                            "directory, deleted afterwards)")
    parser.add_argument("--json", help="also write the results as JSON to this file")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the untimed warm-up run (the log-mel cache is warm already, or is off: "
                             "--train-arg=--no-feature-cache)")
    parser.add_argument("--layer-dim", type=int, default=1280, help="in = out features (Qwen2-Audio d_model is 1280)")
    parser.add_argument("--layer-tokens", default="2x1500", help="BxT tokens of the layer step (1500: one 30 s clip)")
    parser.add_argument("--layer-repeats", type=int, default=10, help="0 skips the layer timing")
    parser.add_argument("--layer-warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="device of the layer timing (the runs use train.py's)")
    args = parser.parse_args(argv)
    variants = [] if args.variants == "none" else [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)} (or 'none')")
    if len(set(variants)) != len(variants):
        parser.error(f"--variants names a variant twice ({args.variants}); use --rounds to run each more often")
    if args.layer_repeats < 0:
        parser.error(f"--layer-repeats must be 0 (no layer timing) or more, got {args.layer_repeats}")
    if args.steps < 1 or args.rounds < 1:
        parser.error(f"--steps and --rounds must be at least 1, got {args.steps} and {args.rounds}")
    args.variants = variants
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"machine: {machine()}  (wall-clock times: other work on the machine slows every row)", flush=True)
    runs = []
    if args.variants:
        with tempfile.TemporaryDirectory(prefix="lora-variants-") as scratch:
            work_dir = Path(args.keep_runs or scratch)
            work_dir.mkdir(parents=True, exist_ok=True)
            if not args.no_warmup:
                warmup = run_variant("lora", args, work_dir, label="warmup")
                if warmup.error is not None:
                    print(f"\n[warmup] failed: {warmup.error}", file=sys.stderr)
                    return 1
            runs = run_rounds(args, work_dir)
        print(f"\n{len(runs)} variant(s), {args.steps} steps each, rank {args.rank}, alpha {args.alpha:g}, "
              f"dropout {args.dropout:g}, seed {args.seed}; one fresh train.py process each, "
              f"{args.rounds} round(s)")
        print(format_table(runs))
    ms = {}
    if args.layer_repeats > 0:
        ms = layer_timing(args.layer_dim, args.layer_tokens, args.rank, args.layer_repeats, args.layer_warmup,
                          args.device)
        print()
        print(format_layer_timing(ms, args))
    if args.json:
        # NaN (a failed run's numbers) as null: JSON has no NaN
        rows = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(r).items()} for r in runs]
        results = dict(machine=machine(), steps=args.steps, rounds=args.rounds, rank=args.rank, alpha=args.alpha,
                       dropout=args.dropout, runs=rows, layer_ms=ms)
        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
    failed = [r for r in runs if r.error is not None]
    for r in failed:
        print(f"\n[{r.variant}] failed: {r.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
