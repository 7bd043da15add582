"""Fine-tune with LoRA: one explicit training loop for both tasks.

    python train.py --targets 'audio_tower.*self_attn.(q|k|v|o)_proj'        # the offline audio-text demo
    python train.py --targets 'audio_tower.*self_attn\\.(q|k|v|out)_proj' \\
        --audio-model Qwen/Qwen2-Audio-7B-Instruct --text-model sentence-transformers/all-MiniLM-L6-v2 \\
        --train-data clotho_development.csv --eval-data clotho_evaluation.csv --output-dir runs/clotho
    python train.py --task instructblip --targets 'qformer.*\\.(query|key|value)'  # the offline VQA demo

The path of one step (the task's setup below; the models in models/audio_text.py, models/instructblip.py):

    audio-text:   wav --(DataLoader workers: decode, resample, log-mel, pad to the longest clip)--> features,
                  frame_mask; captions --(tokenizer)--> ids; model(...) -> symmetric InfoNCE loss
    instructblip: image --(workers: RGB, bicubic resize, CLIP normalise)--> pixel_values; prompt --> Q-Former
                  and T5 ids; answer --> labels; model(...) -> T5 cross-entropy on the answer
    loss.backward() -> clip gradients -> AdamW on LoRA + heads -> warmup/cosine lr

With no model or data flags it runs the task's offline demo: synthetic data and small random-init
models saved as real checkpoints (data/demo_sounds.py, data/demo_shapes.py, data/demo_models.py).
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.audio_text import AudioTextDataset, ResumableBatchSampler, collate_audio_text, precheck
from data.instructblip import VQADataset, check_images, collate_vqa, read_vqa_manifest
from data.manifest import read_manifest
from eval import evaluate, evaluate_vqa, format_metrics, format_vqa
from lora import LoRAConfig, inject_lora, mark_only_lora_trainable, save_adapter, trainable_summary
from lora.atomic import atomic_write, atomic_write_text
from lora.diagnose import diagnose, first_nonfinite_module
from lora.summary import lora_placement
from lora.targets import format_preview, preview_targets
from models import load_instructblip, load_instructblip_tokenizers, load_tokenizer
from models.audio_text import build_audio_text_model, save_heads
from models.tokenizer import tokenize

HEADS = ["audio_proj", "text_proj", "logit_scale"]  # audio-text: trained from scratch beside LoRA
DEFAULT_TARGETS = {"audio-text": [r"audio_tower.*self_attn\.(q|k|v|out)_proj"], "instructblip": [r"qformer.*\.(query|key|value)"]}
STATE_FILE = "training_state.pt"
DEMO = {  # steps that fit a few CPU minutes
    "audio-text": dict(max_steps=600, eval_every=150, save_every=300, warmup_steps=50),
    "instructblip": dict(max_steps=1500, eval_every=300, save_every=750, warmup_steps=50, batch_size=16, lr=3e-3,
                         train_also=["language_projection"]),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["audio-text", "instructblip"], default="audio-text")
    p.add_argument("--targets", action="append", help="regex fullmatched against module paths; repeat to OR "
                   "(default: the audio attention's q/k/v/out, or the Q-Former's query/key/value)")
    p.add_argument("--audio-model", help="Qwen2-Audio or Whisper checkpoint: directory or hub id (default: the demo preset)")
    p.add_argument("--text-model", help="BERT-family checkpoint with its tokenizer (default: the demo preset)")
    p.add_argument("--model", help="InstructBLIP checkpoint (--task instructblip)")
    p.add_argument("--language-model-dtype", choices=["fp32", "bf16"], default="fp32", help="instructblip: the frozen T5's dtype (fp16 overflows flan-t5)")
    p.add_argument("--train-data", help="manifest: JSONL, Clotho CSV or AudioCaps CSV; instructblip: JSONL (default: the demo set)")
    p.add_argument("--eval-data", help="manifest evaluated every --eval-every steps and at the end")
    p.add_argument("--output-dir", help="default: runs/demo (runs/demo-instructblip), else runs/<task>")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r) instead of alpha/r")
    p.add_argument("--train-also", action="append", default=[], help="extra module/parameter to train fully (repeatable)")
    p.add_argument("--embed-dim", type=int, default=256, help="width of the shared embedding space")
    p.add_argument("--batch-size", type=int, help="default: 32 (the instructblip demo: 16)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3; the instructblip demo: 3e-3)")
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
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="DataLoader workers decoding audio or images")
    p.add_argument("--on-bad-audio", "--on-bad-image", dest="on_bad_input", choices=["fail", "skip"], default="fail",
                   help="a missing/undecodable file: stop, or skip and count it")
    p.add_argument("--pad-to-30s", action="store_true", help="pad every clip to 30 s as the reference does (slower)")
    p.add_argument("--max-bad-steps", type=int, default=5, help="abort after this many non-finite steps in a row")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache-dir", default=os.environ.get("LORA_MM_CACHE", str(Path.home() / ".cache" / "lora-mm")), help="where the demo set and towers are made")
    return p.parse_args(argv)


@dataclass
class TaskSetup:
    """What the loop needs from a task; everything else in train() is shared by both tasks."""

    model: nn.Module
    run: dict  # run_config.json: what eval.py needs to rebuild the model
    heads: list[str]  # modules trained fully beside LoRA
    dataset: object  # a Dataset with set_epoch(epoch)
    collate: object  # the DataLoader's collate_fn
    batch_loss: object  # (model, batch, autocast) -> scalar loss
    evaluate: object  # (model, **kwargs) -> metrics dict, or None without eval data
    format: object  # (metrics, title) -> str
    headline: object  # metrics -> one line for the summary
    skipped_up_front: int = 0  # unreadable training files left out before training


def check_inputs(problems, manifest: str, policy: str, role: str, what: str) -> int:
    """Report (item, reason) problems found before training: fatal, or counted when skipping."""
    for item, reason in problems[:10]:
        print(f"  {item.where}: {reason}", file=sys.stderr)
    if problems and (policy == "fail" or role == "eval"):
        sys.exit(f"{len(problems)} {role} {what}(s) cannot be read (listed above); fix {manifest}"
                 + (f" or pass {'--on-bad-audio' if what == 'clip' else '--on-bad-image'} skip" if role == "train" else ""))
    if problems:
        print(f"skipping {len(problems)} unreadable train {what}(s) of {manifest}", file=sys.stderr)
    return len(problems)


def resolved(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None


def is_demo(args) -> bool:
    """No model and no data given for this task: run its offline demo."""
    given = [args.audio_model, args.text_model] if args.task == "audio-text" else [args.model]
    return not any(given + [args.train_data])


def setup_audio_text(args, demo: bool) -> TaskSetup:
    """The dual encoder (models/audio_text.py) on audio-caption manifests; recall on eval data."""
    if not demo and not all([args.audio_model, args.text_model, args.train_data]):
        sys.exit("give --audio-model, --text-model and --train-data together, or none of them for the offline demo")
    src = dict(audio_model=args.audio_model, text_model=args.text_model, train_data=resolved(args.train_data), eval_data=resolved(args.eval_data))
    if demo:
        from data.demo_models import ensure_demo_models
        from data.demo_sounds import ensure_demo_set

        sounds = ensure_demo_set(Path(args.cache_dir) / "demo" / "sounds", seed=args.seed)
        src.update(ensure_demo_models(Path(args.cache_dir) / "demo" / "towers", sounds["captions"], seed=args.seed))
        src.update(train_data=sounds["train"], eval_data=src["eval_data"] or sounds["eval"])
        print("offline demo: synthetic sound events and small RANDOM-INIT towers (a pipeline check, not a pretrained model)")
    model = build_audio_text_model(src["audio_model"], src["text_model"], args.embed_dim, seed=args.seed)
    tokenizer = load_tokenizer(src["text_model"])
    clips, problems = precheck(read_manifest(src["train_data"]))
    skipped = check_inputs([(c, f"{r}: {c.audio}") for c, r in problems], src["train_data"], args.on_bad_input, "train", "clip")
    eval_clips = None
    if src["eval_data"]:
        eval_clips, problems = precheck(read_manifest(src["eval_data"]))
        check_inputs([(c, f"{r}: {c.audio}") for c, r in problems], src["eval_data"], "fail", "eval", "clip")

    def batch_loss(m, batch, autocast):
        input_ids, attention_mask = tokenize(tokenizer, batch["captions"])  # the text tower's own tokenizer
        with autocast():
            return m(batch["features"].to(args.device), batch["frame_mask"].to(args.device),
                     input_ids.to(args.device), attention_mask.to(args.device)).loss

    def headline(m):
        return ", ".join(f"{d} R@1 {m[d]['R@1']:.2f} R@10 {m[d]['R@10']:.2f}" for d in ("text_to_audio", "audio_to_text"))

    return TaskSetup(
        model=model, heads=HEADS, batch_loss=batch_loss, format=format_metrics, headline=headline, skipped_up_front=skipped,
        run=dict(task="audio-text", demo=demo, **src, embed_dim=args.embed_dim, pad_to_30s=args.pad_to_30s),
        dataset=AudioTextDataset(clips, seed=args.seed, on_bad_audio=args.on_bad_input),
        collate=functools.partial(collate_audio_text, n_mels=model.audio_tower.config.num_mel_bins, pad_to_30s=args.pad_to_30s),
        evaluate=(lambda m, **kw: evaluate(m, tokenizer, eval_clips, pad_to_30s=args.pad_to_30s, **kw)) if eval_clips else None,
    )


def setup_instructblip(args, demo: bool) -> TaskSetup:
    """InstructBLIP (models/instructblip.py) on image-prompt-answer manifests; exact match on eval data."""
    if args.precision == "fp16":
        sys.exit("--precision fp16 is refused for instructblip: flan-t5 activations overflow fp16; use bf16 or fp32")
    if not demo and not all([args.model, args.train_data]):
        sys.exit("give --model and --train-data together, or neither for the offline demo")
    src = dict(model=args.model, train_data=resolved(args.train_data), eval_data=resolved(args.eval_data))
    if demo:
        from data.demo_models import ensure_demo_instructblip
        from data.demo_shapes import ensure_shapes_set

        shapes = ensure_shapes_set(Path(args.cache_dir) / "demo" / "shapes", seed=args.seed)
        src.update(model=ensure_demo_instructblip(Path(args.cache_dir) / "demo" / "instructblip", shapes["texts"], seed=args.seed),
                   train_data=shapes["train"], eval_data=src["eval_data"] or shapes["eval"])
        print("offline demo: synthetic coloured shapes and a small RANDOM-INIT InstructBLIP (a pipeline check, not a pretrained model)")
    model = load_instructblip(src["model"], language_model_dtype=args.language_model_dtype)
    tokenizers = load_instructblip_tokenizers(src["model"])
    examples = read_vqa_manifest(src["train_data"])
    problems = check_images(examples)
    skipped = check_inputs([(e, f"{r}: {e.image}") for e, r in problems], src["train_data"], args.on_bad_input, "train", "example")
    examples = [e for e in examples if e not in {p for p, _ in problems}]
    eval_examples = None
    if src["eval_data"]:
        eval_examples = read_vqa_manifest(src["eval_data"])
        check_inputs([(e, f"{r}: {e.image}") for e, r in check_images(eval_examples)], src["eval_data"], "fail", "eval", "example")
    keys = ("pixel_values", "qformer_input_ids", "qformer_attention_mask", "input_ids", "attention_mask", "labels")

    def batch_loss(m, batch, autocast):
        with autocast():
            return m(**{k: batch[k].to(args.device) for k in keys}).loss

    return TaskSetup(
        model=model, heads=[], batch_loss=batch_loss, format=format_vqa, skipped_up_front=skipped,
        headline=lambda m: f"exact match {m['exact_match']:.2f}%, answer loss {m['loss']:.4f}",
        run=dict(task="instructblip", demo=demo, **src, language_model_dtype=args.language_model_dtype),
        dataset=VQADataset(examples, on_bad_image=args.on_bad_input),
        collate=functools.partial(collate_vqa, image_size=model.config.vision.image_size, qformer_tokenizer=tokenizers[0], t5_tokenizer=tokenizers[1]),
        evaluate=(lambda m, **kw: evaluate_vqa(m, tokenizers, eval_examples, **kw)) if eval_examples else None,
    )


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
    if evals and "text_to_audio" in evals[0]["eval"]:
        curves = {f"{d} {k}": (lambda e, d=d, k=k: e[d][k]) for d in ("text_to_audio", "audio_to_text") for k in ("R@1", "R@10")}
        ax_eval.set(ylabel="recall (%)", title="retrieval on the eval set")
    else:
        curves = {"exact match": lambda e: e["exact_match"]}
        ax_eval.set(ylabel="exact match (%)", title="answers on the eval set")
    for label, value in curves.items():
        ax_eval.plot([r["step"] for r in evals], [value(r["eval"]) for r in evals], marker="o", label=label)
    ax_eval.set(xlabel="step")
    ax_eval.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def save_outputs(out: Path, model, lora_config, run: dict, state: dict):
    """Adapter (PEFT format), heads, run config, then the resumable state last: each file atomic."""
    save_adapter(model, out, lora_config, base_model_name_or_path=run.get("model") or run.get("audio_model"))
    save_heads(model, out / "heads.safetensors")
    atomic_write_text(out / "run_config.json", json.dumps(run, indent=2) + "\n")
    atomic_write(out / STATE_FILE, lambda tmp: torch.save(state, tmp))


def main(argv=None):
    return train(parse_args(argv))[1]


def train(args):
    """The whole run; returns (model, history) so tests can inspect what training changed."""
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    demo = is_demo(args)
    demo_defaults = DEMO[args.task] if demo else {}
    args.batch_size = args.batch_size or demo_defaults.get("batch_size", 32)
    args.lr = args.lr or demo_defaults.get("lr", 1e-3)
    args.train_also = args.train_also or demo_defaults.get("train_also", [])
    targets = args.targets or DEFAULT_TARGETS[args.task]
    default_out = ("runs/demo" if args.task == "audio-text" else "runs/demo-instructblip") if demo_defaults else f"runs/{args.task}"
    out = Path(args.output_dir or default_out).resolve()
    if (out / STATE_FILE).exists() and not (args.resume or args.list_targets or args.diagnose):
        sys.exit(f"{out} already holds a run: pass --resume to continue it, or another --output-dir")
    if args.resume and not (out / STATE_FILE).exists():
        sys.exit(f"--resume: no {STATE_FILE} in {out}")

    task = (setup_audio_text if args.task == "audio-text" else setup_instructblip)(args, demo)
    model, also = task.model, task.heads + args.train_also
    if args.list_targets:  # before injection, so a bad pattern is explained rather than refused
        preview = preview_targets(model, targets, args.rank)
        heads = sum(p.numel() for n, p in model.named_parameters() if any(n == h or n.startswith(h + ".") for h in also))
        print(format_preview(preview, targets, extra_trainable=heads))
        sys.exit(0 if preview.ok else 1)
    lora_config = LoRAConfig(targets, r=args.rank, alpha=args.alpha, dropout=args.dropout, rslora=args.rslora)
    try:
        inject_lora(model, lora_config)
        mark_only_lora_trainable(model, also=also)
    except ValueError as error:
        sys.exit(f"--targets: {error}")
    model.to(args.device)
    for module in model.modules():  # every ported tower has the switch
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = args.grad_checkpointing

    dataset = task.dataset
    sampler = ResumableBatchSampler(len(dataset), args.batch_size, seed=args.seed)
    loader_generator = torch.Generator()  # worker seeds come from here, never from the global RNG
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers, generator=loader_generator, collate_fn=task.collate)
    max_steps = args.max_steps or (math.ceil(args.epochs * sampler.batches_per_epoch) if args.epochs else demo_defaults.get("max_steps", 1000))
    warmup = args.warmup_steps if args.warmup_steps is not None else demo_defaults.get("warmup_steps", min(100, max_steps // 10))
    eval_every = args.eval_every if args.eval_every is not None else demo_defaults.get("eval_every", 500)
    save_every = args.save_every if args.save_every is not None else demo_defaults.get("save_every", 500)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, warmup=warmup, total=max_steps))
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    device_type = torch.device(args.device).type
    scaler = torch.amp.GradScaler(device_type, enabled=args.precision == "fp16")  # fp16 gradients underflow without it
    autocast = (lambda: torch.autocast(device_type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext

    def batch_loss(m, batch):
        return task.batch_loss(m, batch, autocast)

    if args.diagnose:  # one real batch through the real forward, then exit
        set_train_mode(model)
        report = diagnose(model, functools.partial(batch_loss, batch=next(b for b in loader if b["index"].numel())))
        print(report)
        sys.exit(0 if report.ok else 1)
    eval_kwargs = dict(batch_size=args.batch_size, device=args.device, workers=args.workers, autocast_dtype=amp_dtype, progress=False)
    run = dict(task.run, targets=targets, rank=args.rank, alpha=args.alpha, dropout=args.dropout, rslora=args.rslora,
               train_also=args.train_also, precision=args.precision, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
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
    print(lora_placement(model))
    print(f"{max_steps} steps of {args.batch_size} examples ({sampler.batches_per_epoch} per epoch); output {out}")

    metrics_file = open(metrics_path, "a", encoding="utf-8", buffering=1)  # line-buffered: each record reaches the file

    def log(record: dict):
        metrics_file.write(json.dumps(record) + "\n")

    def run_eval(label: str):
        if task.evaluate is None:
            return None
        with torch.random.fork_rng(devices=[]):  # evaluation must not shift the training RNG
            metrics = task.evaluate(model, **eval_kwargs)
        set_train_mode(model)
        tqdm.write(task.format(metrics, f"{label}, step {step}"))
        log({"step": step, "eval": metrics})
        return metrics

    def checkpoint():
        state = dict(step=step, epoch=epoch, batches_done=batches_done, skipped=skipped, elapsed=elapsed, history=history,
                     trainable={n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
                     optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                     rng=dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate()))
        save_outputs(out, model, lora_config, run, state)

    if not args.resume:
        history["before"] = run_eval("before training")
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
            if not batch["index"].numel():
                continue  # every item of this batch was unreadable
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
            per_s = batch["index"].numel() / (time.perf_counter() - tick)
            log({"step": step, "epoch": epoch, "loss": loss.item(), "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm.item(),
                 "examples_per_s": per_s})
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", per_s=f"{per_s:.0f}")
            if bar.disable and (step % max(1, max_steps // 20) == 0 or step == 1):  # no terminal: a plain line instead
                print(f"step {step}/{max_steps}  loss {loss.item():.4f}  lr {scheduler.get_last_lr()[0]:.2e}  {per_s:.0f} examples/s", flush=True)
            if eval_every and step % eval_every == 0 and step < max_steps:
                run_eval("eval")
            if save_every and step % save_every == 0 and step < max_steps:
                elapsed = time.perf_counter() - started
                checkpoint()
            if step >= max_steps:
                break
        else:  # the epoch ran out before max_steps
            epoch, batches_done = epoch + 1, 0
    bar.close()
    elapsed = time.perf_counter() - started
    history["after"] = run_eval("after training")
    metrics_file.close()
    checkpoint()
    plot_curves(metrics_path, out / "training_curves.png")
    summary = trainable_summary(model)
    print(f"\ndone: {step} steps in {elapsed / 60:.1f} min; trainable {summary.trainable:,} parameters ({100 * summary.share:.3f}%)")
    print(f"skipped inputs: {skipped + task.skipped_up_front}")
    if history.get("before") and history.get("after"):
        print(f"before: {task.headline(history['before'])}")
        print(f"after:  {task.headline(history['after'])}")
    print(f"outputs in {out}: adapter_model.safetensors, adapter_config.json, heads.safetensors, run_config.json, "
          f"metrics.jsonl, training_curves.png, {STATE_FILE}")
    print(f"evaluate again with: python eval.py --checkpoint {out}" + (f" --data {run['eval_data']}" if run["eval_data"] else ""))
    return model, history


if __name__ == "__main__":
    main()
