"""What both sides of bench/train_throughput.py share: the recipe's settings, the speech-like clips and
their captions (written once as a JSON Lines manifest), the random-init towers (saved once with transformers'
`save_pretrained`), and the useful-FLOPs count of the audio tower. See bench/train_throughput.py's docstring.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from common.atomic import atomic_write_text

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
    "whisper-base": dict(num_mel_bins=80, d_model=512, encoder_layers=6, encoder_attention_heads=8,
                         encoder_ffn_dim=2048),
    "qwen2-audio-7b": dict(num_mel_bins=128, d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                           encoder_ffn_dim=5120),
    "tiny": dict(num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=256),
}
TEXT_TOWERS = {  # BertConfig fields: all-MiniLM-L6-v2's shape, and a tiny one for --quick
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                   vocab_size=30522),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, vocab_size=1024),
}
# Captions: "<who> <does> <how> <where>", 10 x 10 x 8 x 10 = 8000 phrases, drawn without replacement
# so no two clips share one (the reference's plain InfoNCE has one positive per row, as ours then has).
WHO = ["a man", "a woman", "a child", "an old man", "a girl", "a boy", "two people", "a crowd", "a teacher",
       "a speaker"]
DOES = ["speaks", "talks", "whispers", "shouts", "laughs", "reads aloud", "sings", "argues", "murmurs", "announces"]
HOW = ["quietly", "loudly", "slowly", "quickly", "calmly", "angrily", "softly", "clearly"]
WHERE = ["in a small room", "outside", "on the phone", "in a hall", "near a road", "over music", "in the rain",
         "at a station", "in a car", "by the sea"]


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
            weights = 0.02 + sum(g * np.exp(-0.5 * ((k * pitch - f) / 120.0) ** 2)
                                 for f, g in zip(formants, (1.0, 0.6, 0.3)))
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

