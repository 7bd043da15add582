"""Fine-tune an audio-text dual encoder with LoRA on its audio tower: one explicit training loop.

    python train.py --targets 'audio_tower.*self_attn.(q|k|v|o)_proj'        # the offline demo
    python train.py --targets 'audio_tower.*self_attn\\.(q|k|v|out)_proj' \\
        --audio-model Qwen/Qwen2-Audio-7B-Instruct --text-model sentence-transformers/all-MiniLM-L6-v2 \\
        --train-data clotho_development.csv --eval-data clotho_evaluation.csv --output-dir runs/clotho

The path of one step, all of it in this file and models/audio_text.py:

    wav files --(DataLoader workers: decode, resample, log-mel, pad to the longest clip)--> features, frame_mask
    captions  --(tokenizer)--> input_ids, attention_mask
    model(features, frame_mask, input_ids, attention_mask) -> symmetric InfoNCE loss
    loss.backward() -> clip gradients -> AdamW on LoRA + heads -> warmup/cosine lr

With no model or data flags it runs the offline demo: a synthetic sound-event set and two small
random-init towers saved as real checkpoints (data/demo_sounds.py, data/demo_models.py).
"""

import argparse
import contextlib
import functools
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.audio_text import AudioTextDataset, ResumableBatchSampler, collate_audio_text, precheck
from data.manifest import read_manifest
from eval import evaluate, format_metrics
from lora import LoRAConfig, inject_lora, mark_only_lora_trainable, save_adapter, trainable_summary
from lora.atomic import atomic_write, atomic_write_text
from lora.diagnose import diagnose, first_nonfinite_module
from lora.targets import format_preview, preview_targets
from models import load_tokenizer
from models.audio_text import build_audio_text_model, save_heads
from models.tokenizer import tokenize

HEADS = ["audio_proj", "text_proj", "logit_scale"]  # trained from scratch beside LoRA
DEFAULT_TARGETS = [r"audio_tower.*self_attn\.(q|k|v|out)_proj"]
STATE_FILE = "training_state.pt"
DEMO = dict(max_steps=600, eval_every=150, save_every=300, warmup_steps=50)  # ~3 CPU minutes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["audio-text", "instructblip"], default="audio-text")
    p.add_argument("--targets", action="append", help="regex fullmatched against module paths; repeat to OR (default: audio attention q/k/v/out)")
    p.add_argument("--audio-model", help="Qwen2-Audio or Whisper checkpoint: directory or hub id (default: the demo preset)")
    p.add_argument("--text-model", help="BERT-family checkpoint with its tokenizer (default: the demo preset)")
    p.add_argument("--model", help="InstructBLIP checkpoint (--task instructblip)")
    p.add_argument("--train-data", help="manifest: JSONL, Clotho CSV or AudioCaps CSV (default: the demo set)")
    p.add_argument("--eval-data", help="manifest evaluated every --eval-every steps and at the end")
    p.add_argument("--output-dir", help="default: runs/demo for the demo, else runs/audio-text")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r) instead of alpha/r")
    p.add_argument("--train-also", action="append", default=[], help="extra module/parameter to train fully (repeatable)")
    p.add_argument("--embed-dim", type=int, default=256, help="width of the shared embedding space")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: --epochs, else the demo's 600)")
    p.add_argument("--epochs", type=float, help="passes over the training set, when --max-steps is not given")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global L2 norm of the gradients (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype; LoRA weights stay fp32")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute tower blocks in backward: less memory")
    p.add_argument("--eval-every", type=int, help="steps between evaluations (0: only before and after)")
    p.add_argument("--save-every", type=int, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--resume", action="store_true", help=f"continue from {STATE_FILE} in --output-dir")
    p.add_argument("--list-targets", action="store_true", help="print matched modules and trainable counts, then exit")
    p.add_argument("--diagnose", action="store_true", help="run the gradient-flow diagnosis on one batch, then exit")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="DataLoader workers decoding audio")
    p.add_argument("--on-bad-audio", choices=["fail", "skip"], default="fail", help="a missing/undecodable file: stop, or skip and count it")
    p.add_argument("--pad-to-30s", action="store_true", help="pad every clip to 30 s as the reference does (slower)")
    p.add_argument("--max-bad-steps", type=int, default=5, help="abort after this many non-finite steps in a row")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache-dir", default=os.environ.get("LORA_MM_CACHE", str(Path.home() / ".cache" / "lora-mm")), help="where the demo set and towers are made")
    return p.parse_args(argv)


def resolve_sources(args) -> dict:
    """Models and manifests of this run; the demo's are generated (once) when none are given."""
    demo = not any([args.audio_model, args.text_model, args.train_data])
    if not demo and not all([args.audio_model, args.text_model, args.train_data]):
        sys.exit("give --audio-model, --text-model and --train-data together, or none of them for the offline demo")
    if not demo:
        return dict(demo=False, audio_model=args.audio_model, text_model=args.text_model, train_data=str(Path(args.train_data).resolve()),
                    eval_data=str(Path(args.eval_data).resolve()) if args.eval_data else None)
    from data.demo_models import ensure_demo_models
    from data.demo_sounds import ensure_demo_set

    sounds = ensure_demo_set(Path(args.cache_dir) / "demo" / "sounds", seed=args.seed)
    towers = ensure_demo_models(Path(args.cache_dir) / "demo" / "towers", sounds["captions"], seed=args.seed)
    print("offline demo: synthetic sound events and small RANDOM-INIT towers (a pipeline check, not a pretrained model)")
    return dict(demo=True, **towers, train_data=sounds["train"], eval_data=args.eval_data and str(Path(args.eval_data).resolve()) or sounds["eval"])


def load_clips(manifest: str, on_bad_audio: str, role: str):
    clips, problems = precheck(read_manifest(manifest))
    for clip, reason in problems[:10]:
        print(f"  {clip.where}: {reason}: {clip.audio}", file=sys.stderr)
    if problems and (on_bad_audio == "fail" or role == "eval"):
        sys.exit(f"{len(problems)} {role} clip(s) cannot be read (listed above); fix {manifest}"
                 + (" or pass --on-bad-audio skip" if role == "train" else ""))
    if problems:
        print(f"skipping {len(problems)} unreadable train clip(s) of {manifest}", file=sys.stderr)
    return clips, len(problems)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup from 0 to 1 over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def set_train_mode(model):
    """Train mode where something trains (LoRA dropout is on); eval mode for a fully frozen tower,
    whose dropout would only add noise to fixed features."""
    model.train()
    for child in model.children():
        if not any(p.requires_grad for p in child.parameters()):
            child.eval()


def plot_curves(metrics_path: Path, png_path: Path):
    """Loss and recall against steps, from metrics.jsonl, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if r.get("eval")]
    fig, (ax_loss, ax_recall) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8)
    ax_loss.set(xlabel="step", ylabel="contrastive loss", title="training loss")
    for direction in ("text_to_audio", "audio_to_text"):
        for k in ("R@1", "R@10"):
            ax_recall.plot([r["step"] for r in evals], [r["eval"][direction][k] for r in evals], marker="o", label=f"{direction} {k}")
    ax_recall.set(xlabel="step", ylabel="recall (%)", title="retrieval on the eval set")
    ax_recall.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def save_outputs(out: Path, model, lora_config, run: dict, state: dict):
    """Adapter (PEFT format), heads, run config, then the resumable state last: each file atomic."""
    save_adapter(model, out, lora_config, base_model_name_or_path=run["audio_model"])
    save_heads(model, out / "heads.safetensors")
    atomic_write_text(out / "run_config.json", json.dumps(run, indent=2) + "\n")
    atomic_write(out / STATE_FILE, lambda tmp: torch.save(state, tmp))


def main(argv=None):
    return train(parse_args(argv))[1]


def train(args):
    """The whole run; returns (model, history) so tests can inspect what training changed."""
    if args.task == "instructblip":
        sys.exit("--task instructblip is not built yet (issue #6: InstructBLIP with LoRA on the Q-Former)")
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    src = resolve_sources(args)
    targets = args.targets or DEFAULT_TARGETS
    out = Path(args.output_dir or ("runs/demo" if src["demo"] else "runs/audio-text")).resolve()
    if (out / STATE_FILE).exists() and not (args.resume or args.list_targets or args.diagnose):
        sys.exit(f"{out} already holds a run: pass --resume to continue it, or another --output-dir")
    if args.resume and not (out / STATE_FILE).exists():
        sys.exit(f"--resume: no {STATE_FILE} in {out}")

    model = build_audio_text_model(src["audio_model"], src["text_model"], args.embed_dim, seed=args.seed)
    if args.list_targets:  # before injection, so a bad pattern is explained rather than refused
        preview = preview_targets(model, targets, args.rank)
        heads = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in HEADS + args.train_also)
        print(format_preview(preview, targets, extra_trainable=heads))
        sys.exit(0 if preview.ok else 1)
    lora_config = LoRAConfig(targets, r=args.rank, alpha=args.alpha, dropout=args.dropout, rslora=args.rslora)
    try:
        injected = inject_lora(model, lora_config)
        mark_only_lora_trainable(model, also=HEADS + args.train_also)
    except ValueError as error:
        sys.exit(f"--targets: {error}")
    tokenizer = load_tokenizer(src["text_model"])
    model.to(args.device)
    model.audio_tower.gradient_checkpointing = model.text_tower.gradient_checkpointing = args.grad_checkpointing

    train_clips, prechecked_out = load_clips(src["train_data"], args.on_bad_audio, "train")
    eval_clips = load_clips(src["eval_data"], "fail", "eval")[0] if src["eval_data"] else None
    dataset = AudioTextDataset(train_clips, seed=args.seed, on_bad_audio=args.on_bad_audio)
    sampler = ResumableBatchSampler(len(dataset), args.batch_size, seed=args.seed)
    loader_generator = torch.Generator()  # worker seeds come from here, never from the global RNG
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers, generator=loader_generator,
                        collate_fn=functools.partial(collate_audio_text, n_mels=model.audio_tower.config.num_mel_bins, pad_to_30s=args.pad_to_30s))
    demo = DEMO if src["demo"] else {}
    max_steps = args.max_steps or (math.ceil(args.epochs * sampler.batches_per_epoch) if args.epochs else demo.get("max_steps", 1000))
    warmup = args.warmup_steps if args.warmup_steps is not None else demo.get("warmup_steps", min(100, max_steps // 10))
    eval_every = args.eval_every if args.eval_every is not None else demo.get("eval_every", 500)
    save_every = args.save_every if args.save_every is not None else demo.get("save_every", 500)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, warmup=warmup, total=max_steps))
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    device_type = torch.device(args.device).type
    scaler = torch.amp.GradScaler(device_type, enabled=args.precision == "fp16")  # fp16 gradients underflow without it
    autocast = (lambda: torch.autocast(device_type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext

    def batch_loss(m, batch):
        """One forward on a collated batch: the captions are tokenized here, by the text tower's tokenizer."""
        input_ids, attention_mask = tokenize(tokenizer, batch["captions"])
        with autocast():
            return m(batch["features"].to(args.device), batch["frame_mask"].to(args.device),
                     input_ids.to(args.device), attention_mask.to(args.device)).loss

    if args.diagnose:  # one real batch through the real forward, then exit
        set_train_mode(model)
        report = diagnose(model, functools.partial(batch_loss, batch=next(b for b in loader if b["features"] is not None)))
        print(report)
        sys.exit(0 if report.ok else 1)
    eval_kwargs = dict(batch_size=args.batch_size, pad_to_30s=args.pad_to_30s, device=args.device, workers=args.workers, autocast_dtype=amp_dtype)
    run = dict(task="audio-text", **{k: v for k, v in src.items() if k != "demo"}, demo=src["demo"], targets=targets, rank=args.rank,
               alpha=args.alpha, dropout=args.dropout, rslora=args.rslora, embed_dim=args.embed_dim, train_also=args.train_also,
               pad_to_30s=args.pad_to_30s, precision=args.precision, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
               max_steps=max_steps, warmup_steps=warmup)

    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    step, epoch, batches_done, skipped, bad_in_a_row, elapsed, history = 0, 0, 0, 0, 0, 0.0, {}
    if args.resume:
        state = torch.load(out / STATE_FILE, weights_only=False)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                params[name].copy_(tensor)
        optimizer.load_state_dict(state["optimizer"]), scheduler.load_state_dict(state["scheduler"]), scaler.load_state_dict(state["scaler"])
        step, epoch, batches_done, skipped, elapsed, history = (state[k] for k in ("step", "epoch", "batches_done", "skipped", "elapsed", "history"))
        torch.set_rng_state(state["rng"]["torch"]), np.random.set_state(state["rng"]["numpy"]), random.setstate(state["rng"]["python"])
        # a crash after the checkpoint left later lines: drop them, the resumed run writes them again
        lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
        atomic_write_text(metrics_path, "".join(line + "\n" for line in lines if json.loads(line)["step"] <= step))
        print(f"resumed {out} at step {step} (epoch {epoch}, batch {batches_done})")
    elif metrics_path.exists():
        metrics_path.unlink()

    print(trainable_summary(model))
    print(f"LoRA on {len(injected)} layers (r={args.rank}, alpha={args.alpha}); {max_steps} steps of {args.batch_size} clips "
          f"({sampler.batches_per_epoch} per epoch); output {out}")

    def log(record: dict):
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def run_eval(label: str):
        if not eval_clips:
            return None
        with torch.random.fork_rng(devices=[]):  # evaluation must not shift the training RNG
            metrics = evaluate(model, tokenizer, eval_clips, progress=False, **eval_kwargs)
        set_train_mode(model)
        print(format_metrics(metrics, f"{label}, step {step}"))
        log({"step": step, "eval": metrics})
        return metrics

    def checkpoint():
        state = dict(step=step, epoch=epoch, batches_done=batches_done, skipped=skipped, elapsed=elapsed, history=history,
                     trainable={n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
                     optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                     rng=dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate()))
        save_outputs(out, model, lora_config, run, state)

    if not args.resume:
        history["before"] = run_eval("recall before training")
    set_train_mode(model)
    bar = tqdm(total=max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True, disable=None)
    started = time.perf_counter() - elapsed
    while step < max_steps:
        dataset.set_epoch(epoch)
        sampler.set_state(epoch, batches_done)
        loader_generator.manual_seed(args.seed * 1_000_003 + epoch)
        for batch in loader:
            batches_done += 1
            skipped += len(batch["skipped"])
            for path, line, reason in batch["skipped"]:
                tqdm.write(f"skipped {path} (manifest line {line}): {reason}")
            if batch["features"] is None:
                continue  # every clip of this batch was unreadable
            tick = time.perf_counter()
            loss = batch_loss(model, batch)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip if args.grad_clip > 0 else float("inf"))
            # Under fp16 an inf gradient with a finite loss is the scaler's business: it skips and lowers the scale.
            if not torch.isfinite(loss) or (not torch.isfinite(grad_norm) and args.precision != "fp16"):
                # skip the update entirely: optimizer and scheduler state stay as they were
                optimizer.zero_grad(set_to_none=True)
                scaler.update()
                bad_in_a_row += 1
                culprit = first_nonfinite_module(model, functools.partial(batch_loss, batch=batch))
                where = ", ".join(f"{p} (line {n})" for p, n in zip(batch["paths"], batch["lines"]))
                tqdm.write(f"step {step + 1}: non-finite loss {loss.item():.4g} / grad norm {grad_norm.item():.4g}; first non-finite "
                           f"output: {culprit}; step skipped ({bad_in_a_row} in a row); batch: {where}")
                log({"step": step, "nonfinite": {"loss": str(loss.item()), "first_module": culprit, "paths": batch["paths"]}})
                if bad_in_a_row >= args.max_bad_steps:
                    sys.exit(f"aborting: {bad_in_a_row} non-finite steps in a row (first non-finite output: {culprit}); "
                             f"the last good checkpoint is kept in {out}")
                continue
            bad_in_a_row = 0
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if scaler.get_scale() < scale:
                continue  # fp16: the scaler found inf gradients and skipped this update; so does the schedule
            scheduler.step()
            step += 1
            clips_per_s = len(batch["captions"]) / (time.perf_counter() - tick)
            log({"step": step, "epoch": epoch, "loss": loss.item(), "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm.item(),
                 "logit_scale": model.logit_scale.exp().item(), "clips_per_s": clips_per_s})
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", clips_s=f"{clips_per_s:.0f}")
            if bar.disable and (step % max(1, max_steps // 20) == 0 or step == 1):  # no terminal: a plain line instead
                print(f"step {step}/{max_steps}  loss {loss.item():.4f}  lr {scheduler.get_last_lr()[0]:.2e}  {clips_per_s:.0f} clips/s", flush=True)
            if eval_every and step % eval_every == 0 and step < max_steps:
                run_eval("recall")
            if save_every and step % save_every == 0 and step < max_steps:
                elapsed = time.perf_counter() - started
                checkpoint()
            if step >= max_steps:
                break
        else:  # the epoch ran out before max_steps
            epoch, batches_done = epoch + 1, 0
    bar.close()
    elapsed = time.perf_counter() - started
    history["after"] = run_eval("recall after training")
    checkpoint()
    plot_curves(metrics_path, out / "training_curves.png")
    summary = trainable_summary(model)
    print(f"\ndone: {step} steps in {elapsed / 60:.1f} min; trainable {summary.trainable:,} parameters ({100 * summary.share:.3f}%)")
    print(f"skipped inputs: {skipped + prechecked_out}")
    if history.get("before") and history.get("after"):
        for direction in ("text_to_audio", "audio_to_text"):
            b, a = history["before"][direction], history["after"][direction]
            print(f"{direction}: R@1 {b['R@1']:.2f} -> {a['R@1']:.2f}, R@10 {b['R@10']:.2f} -> {a['R@10']:.2f}")
    print(f"outputs in {out}: adapter_model.safetensors, adapter_config.json, heads.safetensors, run_config.json, "
          f"metrics.jsonl, training_curves.png, {STATE_FILE}")
    print(f"evaluate again with: python eval.py --checkpoint {out}" + (f" --data {src['eval_data']}" if src["eval_data"] else ""))
    return model, history


if __name__ == "__main__":
    main()
