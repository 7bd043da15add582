"""The two sides bench/train_throughput.py times, each run in a fresh process: ours (train.py's own code
path, two epochs with a cold then a warm feature cache) and the reference (a plain transformers + PEFT +
WhisperFeatureExtractor + soxr loop). Each returns its per-step times, data waits, losses and peak memory.
"""

import json
import math
import time
from pathlib import Path

import soundfile as sf
import torch

from bench.measure import device_name, memory_status, synchronize
from bench.train_throughput_setup import EMBED_DIM, GRAD_CLIP, LORA, LR, TARGETS, WEIGHT_DECAY, read_manifest


# ---- the children: one side, one run, in a fresh process --------------------------------------


def child_ours(spec: dict) -> dict:
    """Two epochs of train.py on the manifest, with a fresh (cold) feature cache."""
    import train

    work, device = Path(spec["work_dir"]), torch.device(spec["device"])
    steps = 2 * spec["steps_per_epoch"]
    argv = ["--audio-model", spec["audio_model"], "--text-model", spec["text_model"], "--train-data", spec["manifest"],
            "--output-dir", str(work / "out"), "--cache-dir", str(work / "cache"), "--targets", TARGETS,
            "--rank", str(LORA["rank"]), "--alpha", str(LORA["alpha"]), "--dropout", str(LORA["dropout"]),
            "--embed-dim", str(EMBED_DIM), "--lr", str(LR), "--weight-decay", str(WEIGHT_DECAY),
            "--grad-clip", str(GRAD_CLIP),
            "--batch-size", str(spec["batch_size"]), "--max-steps", str(steps),
            "--warmup-steps", str(spec["lr_warmup"]),
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
    return dict(steps=steps, peak_rss=memory_status("VmHWM"), **device_report(device))


def device_report(device: torch.device) -> dict:
    cuda_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return dict(device_name=device_name(device), cuda_peak=cuda_peak)


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
        out = self.extractor([audio for audio, _ in items], sampling_rate=16000, return_tensors="pt",
                             return_attention_mask=True)
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
        # None if nothing is padded
        mask = create_bidirectional_mask(config=tower.config, inputs_embeds=shape_only, attention_mask=keep)
        hidden = self.audio_tower(input_features=features, attention_mask=mask).last_hidden_state  # (B, T'/2, D)
        valid = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < out_lengths[:, None]  # (B, T'/2)
        # counted in fp32: bf16 cannot hold 750 exactly
        audio = ((hidden * valid[..., None].to(hidden.dtype)).sum(1)
                 / valid.sum(1, keepdim=True).float().clamp(min=1))  # (B, D)
        with torch.no_grad():
            words = self.text_tower(**text).last_hidden_state  # (B, L, H)
            real = text["attention_mask"][..., None].to(words.dtype)
            pooled = (words * real).sum(1) / real.sum(1)
        audio = torch.nn.functional.normalize(self.audio_proj(audio), dim=-1)
        text_embeds = torch.nn.functional.normalize(self.text_proj(pooled), dim=-1)
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * audio @ text_embeds.T  # (B, B)
        labels = torch.arange(batch, device=logits.device)
        return (torch.nn.functional.cross_entropy(logits, labels)
                + torch.nn.functional.cross_entropy(logits.T, labels)) / 2


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
    model = ReferenceDualEncoder(spec["audio_model"], spec["text_model"],
                                 torch.bfloat16 if bf16 else torch.float32).to(device)
    model.train()
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["text_model"])
    extractor = transformers.WhisperFeatureExtractor(
        feature_size=model.audio_tower.get_base_model().config.num_mel_bins)
    loader = DataLoader(ReferenceClips(read_manifest(Path(spec["manifest"]))), batch_size=spec["batch_size"],
                        shuffle=True, drop_last=True, num_workers=spec["workers"], collate_fn=WhisperCollate(extractor),
                        generator=torch.Generator().manual_seed(spec["seed"]), pin_memory=device.type == "cuda")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR,
                                  weight_decay=WEIGHT_DECAY)
    total, warmup = spec["steps_per_epoch"], spec["lr_warmup"]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else
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
        synchronize(device)
        now = time.perf_counter()
        steps.append(dict(epoch=0, seconds=now - tick, data_wait=ready - tick, loss=loss_value,
                          padding=1 - feature_mask.float().mean().item()))
        tick = now
        if len(steps) == total:
            break
    return dict(steps=steps, peak_rss=memory_status("VmHWM"), **device_report(device))
