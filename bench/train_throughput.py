"""End-to-end training throughput (data loading + train step): train.py against a plain
transformers + PEFT + WhisperFeatureExtractor + soxr loop, on the same files, same recipe.

A benchmark, not a test. Each measurement is a fresh process, so peak memory is per side, and the
two sides alternate in one run (ours, reference, ours, reference ... for each clip mix; the order
flips every repeat), so machine noise and drift fall on both alike.

    python bench/train_throughput.py                  # CPU, fp32, whisper-base + MiniLM shapes, batch 16: ~15-20 min on 2 cores
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
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lora.atomic import atomic_write_text  # noqa: E402

VERSION = 1  # bump when the generated clips or towers change, so cached ones are rebuilt
SOURCE_RATE = 44100  # files are written at 44.1 kHz, so both sides resample to 16 kHz
TARGETS = r"audio_tower.*self_attn\.(q|k|v|out)_proj"  # ours; the reference's PEFT pattern drops the prefix
LORA = dict(rank=16, alpha=32, dropout=0.1)
EMBED_DIM, LR, WEIGHT_DECAY, GRAD_CLIP = 256, 1e-3, 0.01, 1.0
MIXES = {  # name: (label, shortest s, longest s); every clip is speech-like, see speech_like()
    "speech": ("2-5 s speech-like", 2.0, 5.0),
    "10s": ("10 s", 10.0, 10.0),
    "30s": ("30 s", 30.0, 30.0),
}
TOWERS = {  # Qwen2AudioEncoderConfig fields
    "whisper-base": dict(num_mel_bins=80, d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048),
    "qwen2-audio-7b": dict(num_mel_bins=128, d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120),
    "tiny": dict(num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=256),
}
TEXT_TOWERS = {  # BertConfig fields: all-MiniLM-L6-v2's shape, and a tiny one for --quick
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, vocab_size=1024),
}
# Captions: "<who> <does> <how> <where>", 10 x 10 x 8 x 10 = 8000 phrases, drawn without replacement
# so no two clips share one (the reference's plain InfoNCE has one positive per row, as ours then has).
WHO = ["a man", "a woman", "a child", "an old man", "a girl", "a boy", "two people", "a crowd", "a teacher", "a speaker"]
DOES = ["speaks", "talks", "whispers", "shouts", "laughs", "reads aloud", "sings", "argues", "murmurs", "announces"]
HOW = ["quietly", "loudly", "slowly", "quickly", "calmly", "angrily", "softly", "clearly"]
WHERE = ["in a small room", "outside", "on the phone", "in a hall", "near a road", "over music", "in the rain",
         "at a station", "in a car", "by the sea"]
SAMPLER_SET = 3200  # clips of the "realistic size" set for the sampler's padding (4 bucket windows at batch 16)


# ---- data: speech-like clips and captions, written once ----------------------------------------


def speech_like(seconds: float, rng: np.random.Generator, sr: int = SOURCE_RATE) -> np.ndarray:
    """A mono float32 clip of syllable-like bursts: vowels (harmonics of a gliding pitch, weighted by
    three formant bumps), some fricatives (high-passed noise), short gaps and a few pauses, over a
    faint noise floor. Only its spectro-temporal texture matters here, not its content."""
    n = int(round(seconds * sr))
    out = np.zeros(n, dtype=np.float32)
    pitch = rng.uniform(90, 240)  # the speaker's mean f0, Hz
    pos = int(rng.uniform(0.0, 0.15) * sr)
    while pos < n:
        m = min(int(rng.uniform(0.08, 0.30) * sr), n - pos)
        t = np.arange(m, dtype=np.float32) / sr
        if rng.random() < 0.2:  # fricative: a first difference of white noise is high-passed noise
            burst = 0.3 * np.diff(rng.standard_normal(m + 1).astype(np.float32))
        else:
            glide = 1 + rng.uniform(-0.15, 0.15) * t / max(float(t[-1]), 1e-3)
            f0 = pitch * glide * (1 + 0.02 * np.sin(2 * np.pi * 5 * t))  # (m,), 5 Hz vibrato
            phase = (2 * np.pi * np.cumsum(f0) / sr).astype(np.float32)
            k = np.arange(1, int(4000 // pitch) + 1, dtype=np.float32)  # harmonics up to 4 kHz
            formants = (rng.uniform(300, 900), rng.uniform(900, 2500), rng.uniform(2500, 3500))
            weights = 0.02 + sum(g * np.exp(-0.5 * ((k * pitch - f) / 120.0) ** 2) for f, g in zip(formants, (1.0, 0.6, 0.3)))
            burst = np.sin(np.outer(phase, k)) @ weights.astype(np.float32) / weights.sum()  # (m, K) @ (K,)
        out[pos : pos + m] += np.hanning(m).astype(np.float32) * burst * rng.uniform(0.3, 1.0)
        pos += m + int(sr * (rng.uniform(0.3, 0.7) if rng.random() < 0.1 else rng.uniform(0.02, 0.15)))
    out += 0.003 * rng.standard_normal(n).astype(np.float32)
    return (0.8 * out / max(float(np.abs(out).max()), 1e-6)).astype(np.float32)


def ensure_mix(data_dir: Path, mix: str, n: int, seed: int) -> Path:
    """The manifest of `n` clips of `mix` under data_dir, generated unless already there."""
    folder = data_dir / f"{mix}-n{n}-seed{seed}"
    record = {"version": VERSION, "mix": mix, "n": n, "seed": seed}
    done, manifest = folder / "DONE.json", folder / "train.jsonl"
    if done.is_file() and json.loads(done.read_text()) == record:
        return manifest
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "clips").mkdir(parents=True)
    _, low, high = MIXES[mix]
    rng = np.random.default_rng([seed, list(MIXES).index(mix)])
    phrases = [f"{w} {d} {h} {p}" for w in WHO for d in DOES for h in HOW for p in WHERE]
    captions = [phrases[i] for i in rng.choice(len(phrases), n, replace=False)]
    lines = []
    for i, caption in enumerate(captions):
        name = f"clips/{i:05d}.wav"
        sf.write(folder / name, speech_like(rng.uniform(low, high), rng), SOURCE_RATE, subtype="PCM_16")
        lines.append(json.dumps({"audio": name, "text": caption}) + "\n")
    atomic_write_text(manifest, "".join(lines))
    atomic_write_text(done, json.dumps(record))
    return manifest


def read_manifest(manifest: Path) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    return [(str(manifest.parent / row["audio"]), row["text"]) for row in rows]


def valid_frames(path: str) -> int:
    """Log-mel frames the frame mask marks valid for a file, after resampling to 16 kHz."""
    info = sf.info(path)
    samples = min(480000, round(info.frames * 16000 / info.samplerate))  # clips over 30 s are cut there
    return -(-samples // 160)


# ---- towers: random-init checkpoints both sides load ------------------------------------------


def ensure_towers(data_dir: Path, tower: str, text: str, seed: int) -> tuple[str, str]:
    """(audio dir, text dir): a Qwen2AudioEncoder and a BertModel saved by transformers, random init."""
    import transformers
    from data.demo_models import SPECIAL_TOKENS, build_wordpiece

    folder = data_dir / "towers" / f"{tower}-{text}-seed{seed}"
    audio_dir, text_dir, done = folder / "audio", folder / "text", folder / "DONE.json"
    record = {"version": VERSION, "tower": TOWERS[tower], "text": TEXT_TOWERS[text], "seed": seed}
    if done.is_file() and json.loads(done.read_text()) == record:
        return str(audio_dir), str(text_dir)
    shutil.rmtree(folder, ignore_errors=True)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    config = transformers.Qwen2AudioEncoderConfig(**TOWERS[tower], max_source_positions=1500)
    encoder = transformers.Qwen2AudioEncoder(config)
    if tower == "qwen2-audio-7b":
        encoder = encoder.to(torch.bfloat16)  # as the hub ships it: half the bytes to write and read
    encoder.save_pretrained(audio_dir)
    del encoder
    bert = transformers.BertModel(transformers.BertConfig(**TEXT_TOWERS[text], max_position_embeddings=512))
    bert.save_pretrained(text_dir)
    tokenizer = build_wordpiece(WHO + DOES + HOW + WHERE, SPECIAL_TOKENS, "[UNK]", "[CLS] $A [SEP]")
    atomic_write_text(text_dir / "tokenizer.json", tokenizer.to_str())
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    atomic_write_text(text_dir / "vocab.txt", "".join(f"{token}\n" for token, _ in vocab))
    atomic_write_text(text_dir / "tokenizer_config.json",
                      json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}))
    atomic_write_text(done, json.dumps(record))
    return str(audio_dir), str(text_dir)


def tower_flops(tower: dict, frames: int, rank: int = LORA["rank"]) -> float:
    """Useful model FLOPs of one training step's forward and backward for one clip of `frames`
    valid log-mel frames (see the module docstring for the count and why)."""
    d, ffn, layers, mels = tower["d_model"], tower["encoder_ffn_dim"], tower["encoder_layers"], tower["num_mel_bins"]
    tokens = (frames - 1) // 2 + 1  # after conv2 (stride 2)
    conv = 2 * mels * 3 * d * frames + 2 * d * 3 * d * tokens
    linear = 2 * (4 * d * d + 2 * d * ffn) * tokens
    attention = 4 * tokens * tokens * d
    lora = 2 * rank * 2 * d * 4 * tokens
    forward = conv + layers * (linear + attention + lora)
    backward = layers * (linear + 2 * attention + 2 * lora)
    return float(forward + backward)


# ---- the children: one side, one run, in a fresh process --------------------------------------


def memory_peak() -> int:
    """This process's peak RSS (VmHWM) in bytes. Not ru_maxrss: Linux carries that over fork and
    exec, so a child would report at least its parent's RSS at the fork."""
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")).split()[1]) * 1024


def child_ours(spec: dict) -> dict:
    """Two epochs of train.py on the manifest, with a fresh (cold) feature cache."""
    import train

    work, device = Path(spec["work_dir"]), torch.device(spec["device"])
    steps = 2 * spec["steps_per_epoch"]
    argv = ["--audio-model", spec["audio_model"], "--text-model", spec["text_model"], "--train-data", spec["manifest"],
            "--output-dir", str(work / "out"), "--cache-dir", str(work / "cache"), "--targets", TARGETS,
            "--rank", str(LORA["rank"]), "--alpha", str(LORA["alpha"]), "--dropout", str(LORA["dropout"]),
            "--embed-dim", str(EMBED_DIM), "--lr", str(LR), "--weight-decay", str(WEIGHT_DECAY), "--grad-clip", str(GRAD_CLIP),
            "--batch-size", str(spec["batch_size"]), "--max-steps", str(steps), "--warmup-steps", str(spec["lr_warmup"]),
            "--workers", str(spec["workers"]), "--precision", spec["precision"], "--device", spec["device"],
            "--seed", str(spec["seed"]), "--eval-every", "0", "--save-every", "0", "--log-every", "1"]
    if device.type == "cuda":  # exact per-step times (see the module docstring)
        launch = train.train_step

        def train_step_synchronized(*args, **kwargs):
            step = launch(*args, **kwargs)
            torch.cuda.synchronize()
            return step

        train.train_step = train_step_synchronized
    train.train(train.parse_args(argv))
    records = [json.loads(line) for line in (work / "out" / "metrics.jsonl").read_text().splitlines()]
    # train.py logs examples_per_s = examples / (wall seconds since the previous step, data wait included)
    steps = [dict(epoch=r["epoch"], seconds=spec["batch_size"] / r["examples_per_s"], data_wait=r["data_wait_s"],
                  padding=r.get("padding", 0.0), loss=r["loss"]) for r in records if "loss" in r]
    return dict(steps=steps, peak_rss=memory_peak(), **device_report(device))


def device_report(device: torch.device) -> dict:
    if device.type != "cuda":
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        return dict(device_name=names[0] if names else platform.machine(), cuda_peak=None)
    return dict(device_name=torch.cuda.get_device_name(device), cuda_peak=torch.cuda.max_memory_allocated(device))


class ReferenceClips(torch.utils.data.Dataset):
    """(16 kHz float32 waveform, caption): soundfile, channel mean, soxr "HQ"."""

    def __init__(self, rows: list[tuple[str, str]]):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        import soxr

        path, caption = self.rows[i]
        data, sr = sf.read(path, dtype="float32", always_2d=True)
        return soxr.resample(data.mean(axis=1), sr, 16000, quality="HQ"), caption


class WhisperCollate:
    """The reference front end, run in the DataLoader workers: every clip padded to 30 s."""

    def __init__(self, extractor):
        self.extractor = extractor

    def __call__(self, items):
        out = self.extractor([audio for audio, _ in items], sampling_rate=16000, return_tensors="pt", return_attention_mask=True)
        return out.input_features, out.attention_mask, [caption for _, caption in items]


class ReferenceDualEncoder(torch.nn.Module):
    """What one writes with transformers + PEFT for the same recipe (see the module docstring)."""

    def __init__(self, audio_dir: str, text_dir: str, dtype: torch.dtype):
        import transformers
        from peft import LoraConfig, get_peft_model

        super().__init__()
        tower = transformers.Qwen2AudioEncoder.from_pretrained(audio_dir, dtype=dtype)
        peft_config = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules=TARGETS.removeprefix("audio_tower"))
        self.audio_tower = get_peft_model(tower, peft_config)
        self.text_tower = transformers.BertModel.from_pretrained(text_dir, add_pooling_layer=False, dtype=dtype)
        self.text_tower.requires_grad_(False).eval()
        self.audio_proj = torch.nn.Linear(tower.config.d_model, EMBED_DIM)
        self.text_proj = torch.nn.Linear(self.text_tower.config.hidden_size, EMBED_DIM)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def train(self, mode: bool = True):
        super().train(mode)
        self.text_tower.eval()  # frozen: no dropout noise on fixed features
        return self

    def forward(self, features, feature_mask, text: dict) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        tower = self.audio_tower.get_base_model()
        # as Qwen2AudioModel.forward masks the padded frames of a 30 s input
        conv_lengths, out_lengths = tower._get_feat_extract_output_lengths(feature_mask.sum(-1))
        batch, _, frames = features.shape
        positions = (frames - 2) // 2 + 1
        keep = (torch.arange(positions, device=features.device)[None, :] < conv_lengths[:, None]).long()  # (B, T')
        shape_only = torch.zeros(batch, positions, 1, dtype=tower.conv1.weight.dtype, device=features.device)
        mask = create_bidirectional_mask(config=tower.config, inputs_embeds=shape_only, attention_mask=keep)  # None if nothing is padded
        hidden = self.audio_tower(input_features=features, attention_mask=mask).last_hidden_state  # (B, T'/2, D)
        valid = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < out_lengths[:, None]  # (B, T'/2)
        # counted in fp32: bf16 cannot hold 750 exactly
        audio = (hidden * valid[..., None].to(hidden.dtype)).sum(1) / valid.sum(1, keepdim=True).float().clamp(min=1)  # (B, D)
        with torch.no_grad():
            words = self.text_tower(**text).last_hidden_state  # (B, L, H)
            real = text["attention_mask"][..., None].to(words.dtype)
            pooled = (words * real).sum(1) / real.sum(1)
        audio = torch.nn.functional.normalize(self.audio_proj(audio), dim=-1)
        text_embeds = torch.nn.functional.normalize(self.text_proj(pooled), dim=-1)
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * audio @ text_embeds.T  # (B, B)
        labels = torch.arange(batch, device=logits.device)
        return (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2


def child_reference(spec: dict) -> dict:
    """One epoch of the reference loop over the manifest."""
    import transformers
    from torch.utils.data import DataLoader

    transformers.logging.set_verbosity_error()
    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bf16 = spec["precision"] == "bf16"
    model = ReferenceDualEncoder(spec["audio_model"], spec["text_model"], torch.bfloat16 if bf16 else torch.float32).to(device)
    model.train()
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["text_model"])
    extractor = transformers.WhisperFeatureExtractor(feature_size=model.audio_tower.get_base_model().config.num_mel_bins)
    loader = DataLoader(ReferenceClips(read_manifest(Path(spec["manifest"]))), batch_size=spec["batch_size"], shuffle=True,
                        drop_last=True, num_workers=spec["workers"], collate_fn=WhisperCollate(extractor),
                        generator=torch.Generator().manual_seed(spec["seed"]), pin_memory=device.type == "cuda")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY)
    total, warmup = spec["steps_per_epoch"], spec["lr_warmup"]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else
                                                 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, total - warmup)))))
    steps, tick = [], time.perf_counter()
    for features, feature_mask, captions in loader:
        ready = time.perf_counter()
        tokens = tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
        text = {key: value.to(device, non_blocking=True) for key, value in tokens.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(features.to(device, non_blocking=True), feature_mask.to(device, non_blocking=True), text)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], GRAD_CLIP)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        steps.append(dict(epoch=0, seconds=now - tick, data_wait=ready - tick, loss=loss_value,
                          padding=1 - feature_mask.float().mean().item()))
        tick = now
        if len(steps) == total:
            break
    return dict(steps=steps, peak_rss=memory_peak(), **device_report(device))


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


def sampler_padding(batch: int, seed: int, micro: int | None = None, bucket: bool = False, across: bool = False) -> float:
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
                spec = dict(audio_model=audio_dir, text_model=text_dir, manifest=str(manifests[mix]), work_dir=str(work),
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
    machine = (f"{device_name}; {os.cpu_count()} CPUs ({torch.get_num_threads()} torch threads); torch {torch.__version__}, "
               f"transformers {transformers.__version__}, peft {peft.__version__}, python {platform.python_version()}")
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
                   wait=median(ours, "warm_wait"), epoch_wait=median(ours, "warm_epoch_wait"), cold_wait=median(ours, "cold_wait"),
                   ref_wait=median(ref, "all_wait") if reference else None,
                   epoch1=median(ours, "cold_epoch_s"), epoch2=median(ours, "warm_epoch_s"), flops=flops,
                   cuda=median(ours, "cuda_peak"), ref_cuda=median(ref, "cuda_peak") if reference else None,
                   loss=median(ours, "first_loss"), ref_loss=median(ref, "first_loss") if reference else None)
        rows.append(row)
        print(f"{row['label']} ({args.batch_size * (args.warmup + args.steps)} clips, {flops / 1e9:.1f} useful GFLOP a clip per step):")
        print(f"  ours, warm cache (epoch 2)  {row['warm']:8.2f} examples/s   data wait {100 * row['wait']:5.1f}% of step time "
              f"({100 * row['epoch_wait']:.1f}% over the whole epoch, its first batch included)")
        print(f"  ours, cold cache (epoch 1)  {row['cold']:8.2f} examples/s   data wait {100 * row['cold_wait']:5.1f}%")
        if reference:
            print(f"  reference                   {row['ref']:8.2f} examples/s   data wait {100 * row['ref_wait']:5.1f}%")
            print(f"  ratio ours/reference: {row['warm'] / row['ref']:.2f}x warm cache, {row['cold'] / row['ref']:.2f}x cold")
        print(f"  ours epoch 1 (cold cache) {row['epoch1']:.1f} s -> epoch 2 (warm) {row['epoch2']:.1f} s, "
              f"{args.warmup + args.steps} steps each, warm-up steps included")
        print(f"  padding: ours {100 * row['padding']:.1f}% of log-mel frames" +
              (f", reference {100 * row['ref_padding']:.1f}% (every clip padded to 30 s)" if reference else ""))
        print(f"  peak RSS: ours {row['rss'] / gb:.2f} GB" + (f", reference {row['ref_rss'] / gb:.2f} GB" if reference else "") +
              (f"; peak CUDA memory: ours {row['cuda'] / gb:.2f} GB" if row["cuda"] else "") +
              (f", reference {row['ref_cuda'] / gb:.2f} GB" if row["ref_cuda"] else ""))
        print(f"  first-step loss (ln {args.batch_size} = {math.log(args.batch_size):.3f} at init): ours {row['loss']:.3f}" +
              (f", reference {row['ref_loss']:.3f}" if reference else ""))
        if args.peak_tflops:
            share = lambda rate: 100 * rate * flops / (args.peak_tflops * 1e12)  # noqa: E731
            print(f"  share of the {args.peak_tflops:g} TFLOPS peak (useful model FLOPs): ours {share(row['warm']):.1f}% warm, "
                  f"{share(row['cold']):.1f}% cold" + (f", reference {share(row['ref']):.1f}%" if reference else ""))
    micro = max(1, args.batch_size // 4)
    unbucketed = sampler_padding(args.batch_size, args.seed)
    within = sampler_padding(args.batch_size, args.seed, micro, bucket=True)
    bucketed = sampler_padding(args.batch_size, args.seed, across=True)
    print(f"\npadding of train.py's forwards on {SAMPLER_SET} clips of 2-5 s at batch {args.batch_size}: {100 * unbucketed:.1f}% "
          f"unbucketed; {100 * within:.1f}% with --bucket-by-length and --micro-batch-size {micro}; {100 * bucketed:.1f}% with "
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
                     f"({100 * measured:.1f}%: batch {args.batch_size} in one micro-batch a step, the default, keeps each batch a "
                     f"random sample); on {SAMPLER_SET} clips from the same sampler, {100 * within:.1f}% with --micro-batch-size "
                     f"{micro} and {100 * bucketed:.1f}% with --bucket-across-batches, against {100 * unbucketed:.1f}% unbucketed")

    print("\n---- summary for the README " + "-" * 60)
    print(f"```\n$ {command}\n{machine}\n{setup}\n```\n")
    head = "| clips | ours, warm cache | ours, cold cache |" + (" transformers + PEFT | speed-up (warm / cold) |" if reference else "")
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
    print("\nGoals (issue 10):\n" + "\n".join(lines))
    print("-" * 88 + f"\nbenchmark wall time {seconds / 60:.1f} min")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixes", default="speech,10s,30s", help=f"comma-separated, of {', '.join(MIXES)}")
    parser.add_argument("--steps", type=int, help="measured steps per epoch, after --warmup (default 2; --quick 1)")
    parser.add_argument("--warmup", type=int, help="steps of each epoch left out of examples/s (default 1)")
    parser.add_argument("--repeats", type=int, help="runs of each side per mix, alternating (default 2; --quick 1)")
    parser.add_argument("--batch-size", type=int, help="global batch (default 16; --quick 4)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, both sides")
    parser.add_argument("--tower", choices=sorted(TOWERS), help="audio tower shape (default whisper-base; --quick tiny)")
    parser.add_argument("--text-tower", choices=sorted(TEXT_TOWERS), help="text tower shape (default minilm; --quick tiny)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense peak for --precision, to print the share of it reached")
    parser.add_argument("--no-reference", action="store_true", help="measure ours only (e.g. a GPU without time for the reference)")
    parser.add_argument("--quick", action="store_true", help="tiny towers, batch 4, one measured step, one repeat: a smoke test")
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
