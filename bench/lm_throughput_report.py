"""The printed result of bench/lm_throughput.py: the training and generation tables (medians over the repeats,
every ratio against the reference of the same run), the goals met or not, and, for a goal not met, what bounds
it (the profiled operators' shares of time, the peak memory split into the loaded model and the steps).
"""

import os
import platform
import statistics
import sys

import torch

from bench.measure import device_name
from bench.lm_throughput_setup import ANSWER_TOKENS, GENERATION_SIDES, LORA, SIDES, text_config


def median_of(runs: list[dict], key: str):
    values = [r[key] for r in runs if "error" not in r]
    return statistics.median(values) if values else None


def first_of(runs: list[dict], key: str):
    return next((r[key] for r in runs if "error" not in r and r.get(key) is not None), None)


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else "met" if ok else "not met"


def shares_text(shares: dict | None) -> str:
    if not shares:
        return "not profiled"
    return (f"GEMMs {100 * shares['gemm']:.0f}%, attention {100 * shares['attention']:.0f}%, "
            f"other {100 * shares['other']:.0f}%")


def memory_text(row: dict) -> str:
    """A peak split into what both sides hold alike (the loaded model: its weights, and on CPU the process) and
    what the steps added (activations, logits, gradients, optimizer state)."""
    gib = 2**30
    return (f"{row['peak'] / gib:.2f} GiB = {row['loaded'] / gib:.2f} loaded (weights {row['weights'] / gib:.2f}) + "
            f"{(row['peak'] - row['loaded']) / gib:.2f} added by the steps")


def report(args, training: dict, generation: dict, seconds: float) -> None:
    from importlib.metadata import version

    gib = 2**30
    command = "python bench/lm_throughput.py" + "".join(f" {a}" for a in sys.argv[1:])
    device = device_name(args.device)
    print(f"\n$ {command}\n{device}; {os.cpu_count()} CPUs ({torch.get_num_threads()} torch threads); torch "
          f"{torch.__version__}, transformers {version('transformers')}, peft {version('peft')}, "
          f"python {platform.python_version()}")
    text = text_config(args)
    shapes = ("TINY widths (--tiny): a smoke test, the numbers say nothing" if args.tiny else
              f"Qwen2-0.5B's widths with {args.layers} of its 24 layers" + (
                  "" if args.layers == 24 and args.seq_len == 2048 else
                  f" and sequences up to {args.seq_len} tokens: REDUCED for this machine, the goals are for 24 layers "
                  "at 2048 (--layers 24 --seq-len 2048)"))
    print(f"{shapes}; hidden {text['hidden_size']}, vocab {text['vocab_size']}; LoRA r {LORA['r']} on q/k/v/o; "
          f"{args.precision} on {args.device}; {args.warmup} warm-up + {args.steps} measured step(s), medians of "
          f"{args.repeats} run(s), every run a fresh process")
    print(f"text: {args.batch_size} examples of {max(ANSWER_TOKENS + 1, args.seq_len // 4)}-{args.seq_len} tokens, "
          f"{ANSWER_TOKENS} answer tokens each, packed into rows of <= {args.seq_len}; audio: {args.audio_batch} "
          f"clips of {args.clip_seconds:g} s, the chat prompt and a {ANSWER_TOKENS}-token answer, packed into rows "
          f"of <= {args.audio_pack}\n")

    print("Training (one step: forward, backward, AdamW on the LoRA weights)\n")
    head = ["case", "side", "tokens/s", "s/step", "peak GiB", "rows x width", "padding", "first loss", "LoRA layers",
            "tokens/s / ref", "peak / ref"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    rows = {}
    for case in args.cases:
        ref = training[case, "hf"]
        for side in SIDES:
            runs = training[case, side]
            if all("error" in r for r in runs):
                print(f"| {case} | {SIDES[side]} | failed: {runs[0]['error']} |" + " |" * (len(head) - 3))
                continue
            step = median_of(runs, "step_s")
            row = dict(rate=first_of(runs, "tokens") / step, step=step, peak=median_of(runs, "peak"),
                       loaded=median_of(runs, "loaded"), weights=first_of(runs, "weights"),
                       padding=first_of(runs, "padding"), loss=first_of(runs, "first_loss"),
                       shares=first_of(runs, "shares"), layers=first_of(runs, "lora_layers"),
                       shape=f"{first_of(runs, 'rows')} x {first_of(runs, 'width')}")
            rows[case, side] = row
            ref_step, ref_peak = median_of(ref, "step_s"), median_of(ref, "peak")
            ref_rate = first_of(ref, "tokens") / ref_step if ref_step else None
            cells = [case, SIDES[side], f"{row['rate']:.1f}", f"{row['step']:.3f}", f"{row['peak'] / gib:.2f}",
                     row["shape"], f"{100 * row['padding']:.1f}%", f"{row['loss']:.4f}", str(row["layers"]),
                     f"{row['rate'] / ref_rate:.2f}x" if ref_rate else "-",
                     f"{row['peak'] / ref_peak:.2f}x" if ref_peak else "-"]
            print("| " + " | ".join(cells) + " |")

    generated = {}
    if args.generation_batches:
        print(f"\nGreedy generation ({args.new_tokens} new tokens after a {args.prompt_len}-token prompt, "
              "text model)\n")
        head = ["batch", "side", "new tokens/s", f"s for {args.new_tokens}", "tokens/s / ref", "same tokens as ref"]
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for batch in map(str, args.generation_batches):
            ref_runs = [r[batch] for r in generation["hf"] if "error" not in r]
            for side in GENERATION_SIDES:
                runs = [r[batch] for r in generation[side] if "error" not in r]
                if not runs:
                    print(f"| {batch} | {GENERATION_SIDES[side]} | failed: {generation[side][0]['error']} |" + " |" * 3)
                    continue
                taken, new = median_of(runs, "seconds"), int(batch) * args.new_tokens
                rate = new / taken
                ref_rate = new / median_of(ref_runs, "seconds") if ref_runs else None
                same = "yes" if ref_runs and runs[0]["tokens"] == ref_runs[0]["tokens"] else "no" if ref_runs else "-"
                generated[batch, side] = dict(rate=rate, shares=runs[0]["shares"])
                cells = [batch, GENERATION_SIDES[side], f"{rate:.1f}", f"{taken:.2f}",
                         f"{rate / ref_rate:.2f}x" if ref_rate else "-", same]
                print("| " + " | ".join(cells) + " |")

    tiny = ", tiny widths" if args.tiny else ""
    at = "" if args.seq_len == 2048 and args.layers == 24 and not args.tiny else \
        f" (measured at {args.seq_len} tokens, {args.layers} layers{tiny}: the goal is for 2048, 24)"
    lines, bounds = [], []
    ref = rows.get(("text", "hf"))
    for side in ("ours", "ours-packed"):
        ours = rows.get(("text", side))
        known = ours is not None and ref is not None
        speed = ours["rate"] / ref["rate"] if known else None
        memory = ours["peak"] / ref["peak"] if known else None
        lines.append(f"- training, {SIDES[side]}: >= 1.3x transformers + PEFT's tokens/s: "
                     f"{verdict(speed >= 1.3 if known else None)} ({speed or float('nan'):.3f}x){at}")
        lines.append(f"- training, {SIDES[side]}: <= 0.6x transformers + PEFT's peak memory: "
                     f"{verdict(memory <= 0.6 if known else None)} ({memory or float('nan'):.3f}x){at}")
        if known and speed < 1.3:
            bounds.append(f"  training step time, {SIDES[side]}: {shares_text(ours['shares'])}; transformers + PEFT: "
                          f"{shares_text(ref['shares'])}")
        if known and memory > 0.6:
            bounds.append(f"  peak memory, {SIDES[side]}: {memory_text(ours)}; transformers + PEFT: {memory_text(ref)}")
    if "1" in map(str, args.generation_batches):
        ours, ref_gen = generated.get(("1", "ours")), generated.get(("1", "hf"))
        known = ours is not None and ref_gen is not None
        speed = ours["rate"] / ref_gen["rate"] if known else None
        lines.append(f"- generation at batch 1 >= 1.5x transformers' tokens/s: "
                     f"{verdict(speed >= 1.5 if known else None)} ({speed or float('nan'):.3f}x)")
        if known and speed < 1.5:
            bounds.append(f"  generation at batch 1, ours: {shares_text(ours['shares'])}; transformers: "
                          f"{shares_text(ref_gen['shares'])}")
    print("\nGoals:\n" + "\n".join(lines))
    if bounds:
        print("What bounds the goals not met (time: shares of the profiled operators' time; memory: the peak split):\n"
              + "\n".join(bounds))
    print(f"\nbenchmark wall time {seconds / 60:.1f} min")
