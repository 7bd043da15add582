"""End-to-end training throughput (data loading + train step): train.py against a plain
transformers + PEFT + WhisperFeatureExtractor + soxr loop, on the same files, same recipe.

A benchmark, not a test. Each measurement is a fresh process, so peak memory is per side, and the
two sides alternate in one run (ours, reference, ours, reference ... for each clip mix; the order
flips every repeat), so machine noise and drift fall on both alike.

    python bench/train_throughput.py                  # CPU, fp32, whisper-base + MiniLM shapes, batch 16:
                                                      # ~15-20 min on 2 cores
    python bench/train_throughput.py --quick          # tiny towers, batch 4, one measured step: a smoke test, ~1 min
    python bench/train_throughput.py --mixes 10s --repeats 3 --steps 4
    python bench/train_throughput.py --device cuda --precision bf16 --tower qwen2-audio-7b \\
        --batch-size 16 --steps 20 --warmup 3 --repeats 1 --workers 8 --peak-tflops 989 [--no-reference]

On 2 CPU cores nearly all of the default run is the audio tower at 30 s (every reference step, and
ours on the 30 s mix): ~3.2 TFLOP a step at batch 16, about half a minute; `--repeats 1` halves the
run. On the GPU line, 989 TFLOPS is an H100 / H200 SXM's dense bf16 peak; batch 16 of 30 s clips
keeps the 7B-shaped tower's activations (both sides hold them for LoRA's backward) well inside 80 GB.

The recipe, the same on both sides: LoRA r 16, alpha 32, dropout 0.1 on the audio encoder's
q/k/v/out projections; a frozen BERT text tower, mean-pooled over real tokens; linear heads to a
256-wide space; L2-normalised embeddings; symmetric InfoNCE with a learnable temperature (1/0.07,
capped at 100); AdamW lr 1e-3, weight decay 0.01 (ours spares biases and logit_scale, as open_clip;
the reference decays every trainable tensor, as a plain AdamW does), warmup + cosine schedule,
gradient clipping at 1.0; the same global batch, the same number of DataLoader workers, the same --precision and device.
Both load the same random-init checkpoints, written once with transformers' `save_pretrained`: a
`Qwen2AudioEncoder` (whisper-base shape by default: d_model 512, 6 layers, 8 heads, ffn 2048, 80 mels;
Qwen2-Audio's tower is Whisper's encoder plus an average pool) and a `BertModel` (all-MiniLM-L6-v2
shape: hidden 384, 6 layers, 12 heads, ffn 1536, vocab 30522) with a WordPiece tokenizer.

ours (`train.train(train.parse_args([...]))`, the real code path, nothing patched on the CPU):
  workers decode with soundfile, resample 44.1 -> 16 kHz with soxr, compute the log-mel in torch
  and cache it on disk (data/feature_cache.py; a fresh, empty cache dir per run, so epoch 1 is cold
  and epoch 2 warm), pad each batch only to its longest clip and tokenize; batches are
  length-bucketed (--bucket-by-length, on by default); the frozen text tower's pooled features are
  computed once per distinct caption before training and reused (models/text_cache.py); the tower
  (models/qwen2_audio_encoder.py) masks padded frames. Two epochs of --warmup + --steps steps each.
reference (one epoch of --warmup + --steps steps over the same files, shuffled):
  a Dataset that decodes with soundfile, averages channels and resamples with
  `soxr.resample(..., "HQ")`; a collate_fn, in the workers, that calls
  `WhisperFeatureExtractor(feature_size=n_mels)(clips, sampling_rate=16000, return_tensors="pt",
  return_attention_mask=True)` (its torch path), which pads every clip to 30 s; in the main loop the
  captions are tokenized (`AutoTokenizer`, fast), `Qwen2AudioEncoder.from_pretrained` wrapped by
  `peft.get_peft_model` runs on the 3000 frames with the padded frames masked as attention keys
  exactly as `Qwen2AudioModel` builds the mask (`create_bidirectional_mask`, SDPA), its output is
  mean-pooled over each clip's valid outputs, and the frozen `BertModel` (eval mode, no_grad, no
  pooler) runs on every step's captions; `loss.item()` is read each step. On a GPU the
  reference loads the towers in bf16 under --precision bf16 (PEFT keeps the adapters fp32), uses
  pin_memory, and TF32 for fp32 matmuls, as ours does.

Measured per step: wall time since the previous step ended (so waiting for data counts), and the
share of it spent waiting for the batch. On CUDA every step of both sides ends with
torch.cuda.synchronize() (ours through a wrapper around train.train_step), so per-step times are
exact; that costs ours its host/device overlap, a choice against ours. examples/s of a run =
examples / seconds over its steps after the first --warmup of each epoch; the table gives the
median over --repeats runs. Peak RSS is the main process's VmHWM (DataLoader workers not included:
their pages are mostly shared with it). Padding is the share of log-mel frames in a batch that are
padding (what train.py logs); the sampler's padding on a set of realistic size is computed too,
from the same sampler and clip lengths, without training.

Share of the GPU's bf16 peak (--peak-tflops): useful model FLOPs per second / peak. The FLOPs of
one clip with V valid log-mel frames count only that clip's own frames (T = ceil(V / 2) tokens after
the stride-2 conv), never padding, for both sides:
  forward  = convs (2 * n_mels * 3 * D * V + 2 * D * 3 * D * T)
           + layers * (2 * (4 D^2 + 2 D F) * T   [q, k, v, out, fc1, fc2]
                       + 4 * T^2 * D             [QK^T and AV]
                       + 2 * r * 2 D * 4 * T)    [LoRA A and B on four projections]
  backward = layers * (linear + 2 * attention + 2 * LoRA)
The base is frozen, so the backward computes only gradients with respect to activations (one GEMM
per frozen Linear, as many FLOPs as its forward; 6 * params * tokens would count the weight
gradients, which LoRA never computes); attention's backward is twice its forward; LoRA's own
weights get both kinds; nothing before the first block needs a gradient, so the convolutions have
no backward. Recomputation (flash attention's, gradient checkpointing's) and the text tower are
not counted.
"""

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.train_throughput_setup import (  # noqa: E402
    LORA, MIXES, TEXT_TOWERS, TOWERS, ensure_mix, ensure_towers, read_manifest, tower_flops, valid_frames,
)
from bench.train_throughput_sides import child_ours, child_reference  # noqa: E402

SAMPLER_SET = 3200  # clips of the "realistic size" set for the sampler's padding (4 bucket windows at batch 16)


# ---- the parent: data, alternation, report -----------------------------------------------------


def run_child(side: str, spec: dict) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", side, "--spec", json.dumps(spec)], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{side} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - start
    return result


def window(steps: list[dict], warmup: int) -> dict:
    """examples/s-ready sums over the steps after `warmup`."""
    kept = steps[warmup:]
    return dict(n=len(kept), seconds=sum(s["seconds"] for s in kept), wait=sum(s["data_wait"] for s in kept))


def summarize(side: str, result: dict, batch: int, warmup: int) -> dict:
    """One run's numbers; ours has a cold (epoch 1) and a warm (epoch 2) measurement."""
    by_epoch = [[s for s in result["steps"] if s["epoch"] == e] for e in sorted({s["epoch"] for s in result["steps"]})]
    out = dict(peak_rss=result["peak_rss"], cuda_peak=result["cuda_peak"], first_loss=result["steps"][0]["loss"],
               padding=statistics.fmean(s["padding"] for s in result["steps"]), device_name=result["device_name"])
    names = ["cold", "warm"] if side == "ours" else ["all"]
    for name, steps in zip(names, by_epoch):
        w = window(steps, warmup)
        out[f"{name}_rate"] = batch * w["n"] / w["seconds"]
        out[f"{name}_wait"] = w["wait"] / w["seconds"]
        out[f"{name}_epoch_s"] = sum(s["seconds"] for s in steps)  # the whole epoch, its warm-up steps included
        out[f"{name}_epoch_wait"] = sum(s["data_wait"] for s in steps) / out[f"{name}_epoch_s"]
    return out


def sampler_padding(batch: int, seed: int, micro: int | None = None, bucket: bool = False,
                    across: bool = False) -> float:
    """Mean padding share of train.py's forwards (GlobalBatchSampler's micro-batches) over one epoch of
    SAMPLER_SET clips of 2-5 s, each padded to its micro-batch's longest + 2 frames, as train.py logs it."""
    from data.sampling import GlobalBatchSampler

    rng = np.random.default_rng(seed)
    frames = [-(-round(s * 16000) // 160) for s in rng.uniform(2.0, 5.0, SAMPLER_SET)]
    lengths = [float(f) for f in frames] if bucket or across else None
    sampler = GlobalBatchSampler(SAMPLER_SET, batch, micro or batch, seed=seed, lengths=lengths, across_batches=across)
    shares = [1 - sum(frames[i] for i in b) / (len(b) * min(3000, max(frames[i] for i in b) + 2)) for b in sampler]
    return statistics.fmean(shares)


def measure(args) -> None:
    data_dir = Path(args.data_dir)
    per_epoch = args.warmup + args.steps
    n_clips = per_epoch * args.batch_size
    start = time.perf_counter()
    print(f"data and towers in {data_dir} (generated once, reused)", flush=True)
    audio_dir, text_dir = ensure_towers(data_dir, args.tower, args.text_tower, args.seed)
    manifests = {mix: ensure_mix(data_dir, mix, n_clips, args.seed) for mix in args.mixes}
    print(f"  ready in {time.perf_counter() - start:.0f} s", flush=True)
    sides = ["ours"] + ([] if args.no_reference else ["reference"])
    results = {(mix, side): [] for mix in args.mixes for side in sides}
    for repeat in range(args.repeats):
        for mix in args.mixes:
            for side in (sides if repeat % 2 == 0 else sides[::-1]):
                work = Path(tempfile.mkdtemp(prefix=f"run-{mix}-{side}-", dir=data_dir))
                spec = dict(audio_model=audio_dir, text_model=text_dir, manifest=str(manifests[mix]),
                            work_dir=str(work),
                            batch_size=args.batch_size, steps_per_epoch=per_epoch, lr_warmup=max(1, per_epoch // 10),
                            workers=args.workers, device=args.device, precision=args.precision, seed=args.seed)
                try:
                    raw = run_child(side, spec)
                finally:
                    shutil.rmtree(work, ignore_errors=True)  # ours' feature cache and outputs: the next run starts cold
                results[mix, side].append(summarize(side, raw, args.batch_size, args.warmup))
                rate = results[mix, side][-1]["warm_rate" if side == "ours" else "all_rate"]
                print(f"  repeat {repeat + 1}/{args.repeats} {MIXES[mix][0]:18s} {side:9s} {rate:8.2f} examples/s "
                      f"(process {raw['wall']:.0f} s)", flush=True)
    report(args, results, manifests, time.perf_counter() - start)


def median(runs: list[dict], key: str):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def report(args, results: dict, manifests: dict, seconds: float) -> None:
    import transformers
    import peft

    tower, text = TOWERS[args.tower], TEXT_TOWERS[args.text_tower]
    reference = not args.no_reference
    device_name = results[args.mixes[0], "ours"][0]["device_name"]
    gb = 1e9
    command = "python bench/train_throughput.py" + "".join(f" {a}" for a in sys.argv[1:])
    machine = (f"{device_name}; {os.cpu_count()} CPUs ({torch.get_num_threads()} torch threads); "
               f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
               f"python {platform.python_version()}")
    setup = (f"audio tower {args.tower} (d_model {tower['d_model']}, {tower['encoder_layers']} layers, "
             f"{tower['encoder_attention_heads']} heads, {tower['num_mel_bins']} mels), text tower {args.text_tower} "
             f"(hidden {text['hidden_size']}, {text['num_hidden_layers']} layers); LoRA r {LORA['rank']} on q/k/v/out; "
             f"batch {args.batch_size}, {args.workers} workers, {args.precision} on {args.device}; "
             f"{args.warmup + args.steps} steps an epoch ({args.warmup} warm-up), medians of {args.repeats} run(s)")
    print(f"\n$ {command}\n{machine}\n{setup}\n")

    rows = []
    for mix in args.mixes:
        ours = results[mix, "ours"]
        ref = results[mix, "reference"] if reference else []
        flops = statistics.fmean(tower_flops(tower, valid_frames(p)) for p, _ in read_manifest(manifests[mix]))
        row = dict(mix=mix, label=MIXES[mix][0], warm=median(ours, "warm_rate"), cold=median(ours, "cold_rate"),
                   ref=median(ref, "all_rate") if reference else None, rss=median(ours, "peak_rss"),
                   ref_rss=median(ref, "peak_rss") if reference else None, padding=median(ours, "padding"),
                   ref_padding=median(ref, "padding") if reference else None,
                   wait=median(ours, "warm_wait"), epoch_wait=median(ours, "warm_epoch_wait"),
                   cold_wait=median(ours, "cold_wait"),
                   ref_wait=median(ref, "all_wait") if reference else None,
                   epoch1=median(ours, "cold_epoch_s"), epoch2=median(ours, "warm_epoch_s"), flops=flops,
                   cuda=median(ours, "cuda_peak"), ref_cuda=median(ref, "cuda_peak") if reference else None,
                   loss=median(ours, "first_loss"), ref_loss=median(ref, "first_loss") if reference else None)
        rows.append(row)
        print(f"{row['label']} ({args.batch_size * (args.warmup + args.steps)} clips, "
              f"{flops / 1e9:.1f} useful GFLOP a clip per step):")
        print(f"  ours, warm cache (epoch 2)  {row['warm']:8.2f} examples/s   "
              f"data wait {100 * row['wait']:5.1f}% of step time "
              f"({100 * row['epoch_wait']:.1f}% over the whole epoch, its first batch included)")
        print(f"  ours, cold cache (epoch 1)  {row['cold']:8.2f} examples/s   data wait {100 * row['cold_wait']:5.1f}%")
        if reference:
            print(f"  reference                   {row['ref']:8.2f} examples/s   "
                  f"data wait {100 * row['ref_wait']:5.1f}%")
            print(f"  ratio ours/reference: {row['warm'] / row['ref']:.2f}x warm cache, "
                  f"{row['cold'] / row['ref']:.2f}x cold")
        print(f"  ours epoch 1 (cold cache) {row['epoch1']:.1f} s -> epoch 2 (warm) {row['epoch2']:.1f} s, "
              f"{args.warmup + args.steps} steps each, warm-up steps included")
        print(f"  padding: ours {100 * row['padding']:.1f}% of log-mel frames" +
              (f", reference {100 * row['ref_padding']:.1f}% (every clip padded to 30 s)" if reference else ""))
        print(f"  peak RSS: ours {row['rss'] / gb:.2f} GB" +
              (f", reference {row['ref_rss'] / gb:.2f} GB" if reference else "") +
              (f"; peak CUDA memory: ours {row['cuda'] / gb:.2f} GB" if row["cuda"] else "") +
              (f", reference {row['ref_cuda'] / gb:.2f} GB" if row["ref_cuda"] else ""))
        print(f"  first-step loss (ln {args.batch_size} = {math.log(args.batch_size):.3f} at init): "
              f"ours {row['loss']:.3f}" +
              (f", reference {row['ref_loss']:.3f}" if reference else ""))
        if args.peak_tflops:
            share = lambda rate: 100 * rate * flops / (args.peak_tflops * 1e12)  # noqa: E731
            print(f"  share of the {args.peak_tflops:g} TFLOPS peak (useful model FLOPs): "
                  f"ours {share(row['warm']):.1f}% warm, "
                  f"{share(row['cold']):.1f}% cold" + (f", reference {share(row['ref']):.1f}%" if reference else ""))
    micro = max(1, args.batch_size // 4)
    unbucketed = sampler_padding(args.batch_size, args.seed)
    within = sampler_padding(args.batch_size, args.seed, micro, bucket=True)
    bucketed = sampler_padding(args.batch_size, args.seed, across=True)
    print(f"\npadding of train.py's forwards on {SAMPLER_SET} clips of 2-5 s at batch {args.batch_size}: "
          f"{100 * unbucketed:.1f}% unbucketed; {100 * within:.1f}% with --bucket-by-length and "
          f"--micro-batch-size {micro}; {100 * bucketed:.1f}% with "
          f"--bucket-across-batches (one micro-batch a step)")

    by_mix = {row["mix"]: row for row in rows}
    lines = []
    if reference and "10s" in by_mix:
        r = by_mix["10s"]
        lines.append(f"- end to end >= 4x the reference on 10 s clips: {verdict(r['warm'] / r['ref'] >= 4)} "
                     f"({r['warm'] / r['ref']:.2f}x with a warm feature cache, {r['cold'] / r['ref']:.2f}x cold)")
    if reference and "30s" in by_mix:
        r = by_mix["30s"]
        lines.append(f"- end to end >= 1.2x at 30 s: {verdict(r['warm'] / r['ref'] >= 1.2)} "
                     f"({r['warm'] / r['ref']:.2f}x warm, {r['cold'] / r['ref']:.2f}x cold)")
    worst = max(rows, key=lambda r: r["wait"])
    lines.append(f"- data wait under 5% of step time from epoch 2 on, {args.workers} workers"
                 f"{'' if args.workers == 2 else ' (the goal says 2)'}: {verdict(worst['wait'] < 0.05)} "
                 f"(at most {100 * worst['wait']:.1f}%, {worst['label']}; over whole epochs, each epoch's first batch "
                 f"included, at most {100 * max(r['epoch_wait'] for r in rows):.1f}%)")
    if "speech" in by_mix:
        measured = by_mix["speech"]["padding"]
        lines.append(f"- padding under 10% on the mixed-length 2-5 s set: {verdict(measured < 0.10)} in this run "
                     f"({100 * measured:.1f}%: batch {args.batch_size} in one micro-batch a step, the default, "
                     f"keeps each batch a random sample); on {SAMPLER_SET} clips from the same sampler, "
                     f"{100 * within:.1f}% with --micro-batch-size {micro} and {100 * bucketed:.1f}% with "
                     f"--bucket-across-batches, against {100 * unbucketed:.1f}% unbucketed")

    print("\n---- summary for the README " + "-" * 60)
    print(f"```\n$ {command}\n{machine}\n{setup}\n```\n")
    head = "| clips | ours, warm cache | ours, cold cache |" + (
        " transformers + PEFT | speed-up (warm / cold) |" if reference else "")
    head += " epoch 1 -> 2 (s) | data wait, epoch 2 | padding | peak RSS ours" + (" / ref" if reference else "") + " |"
    if args.peak_tflops:
        head += f" share of {args.peak_tflops:g} TFLOPS (ours warm" + (" / ref" if reference else "") + ") |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        cells = [r["label"], f"{r['warm']:.2f}/s", f"{r['cold']:.2f}/s"]
        if reference:
            cells += [f"{r['ref']:.2f}/s", f"{r['warm'] / r['ref']:.2f}x / {r['cold'] / r['ref']:.2f}x"]
        cells += [f"{r['epoch1']:.1f} -> {r['epoch2']:.1f}", f"{100 * r['wait']:.1f}%", f"{100 * r['padding']:.1f}%",
                  f"{r['rss'] / gb:.2f}" + (f" / {r['ref_rss'] / gb:.2f} GB" if reference else " GB")]
        if args.peak_tflops:
            share = lambda rate: 100 * rate * r["flops"] / (args.peak_tflops * 1e12)  # noqa: E731
            cells.append(f"{share(r['warm']):.1f}%" + (f" / {share(r['ref']):.1f}%" if reference else ""))
        print("| " + " | ".join(cells) + " |")
    print("\nGoals:\n" + "\n".join(lines))
    print("-" * 88 + f"\nbenchmark wall time {seconds / 60:.1f} min")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixes", default="speech,10s,30s", help=f"comma-separated, of {', '.join(MIXES)}")
    parser.add_argument("--steps", type=int, help="measured steps per epoch, after --warmup (default 2; --quick 1)")
    parser.add_argument("--warmup", type=int, help="steps of each epoch left out of examples/s (default 1)")
    parser.add_argument("--repeats", type=int, help="runs of each side per mix, alternating (default 2; --quick 1)")
    parser.add_argument("--batch-size", type=int, help="global batch (default 16; --quick 4)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, both sides")
    parser.add_argument("--tower", choices=sorted(TOWERS),
                        help="audio tower shape (default whisper-base; --quick tiny)")
    parser.add_argument("--text-tower", choices=sorted(TEXT_TOWERS),
                        help="text tower shape (default minilm; --quick tiny)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's dense peak for --precision, to print the share of it reached")
    parser.add_argument("--no-reference", action="store_true",
                        help="measure ours only (e.g. a GPU without time for the reference)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny towers, batch 4, one measured step, one repeat: a smoke test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "lora-mm-bench-throughput"),
                        help="where the clips and towers are generated once and the runs work")
    parser.add_argument("--child", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = (child_ours if args.child == "ours" else child_reference)(json.loads(args.spec))
        print(json.dumps(result))
        return
    defaults = dict(steps=1, warmup=1, repeats=1, batch_size=4, tower="tiny", text_tower="tiny") if args.quick else \
        dict(steps=2, warmup=1, repeats=2, batch_size=16, tower="whisper-base", text_tower="minilm")
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.mixes = [m.strip() for m in args.mixes.split(",") if m.strip()]
    unknown = [m for m in args.mixes if m not in MIXES]
    if unknown or not args.mixes:
        parser.error(f"--mixes: unknown {unknown}; choose from {', '.join(MIXES)}")
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1, --warmup >= 0")
    measure(args)


if __name__ == "__main__":
    main()
