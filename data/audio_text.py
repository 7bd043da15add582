"""Audio-text batches for contrastive training and retrieval evaluation.

    clips (data/manifest.py)
      -> AudioTextDataset[i]: this clip's log-mel (`ClipFeatures`, models/audio.py) from the
                              feature cache (data/feature_cache.py), or decoded, checked and
                              computed; this epoch's caption                (DataLoader workers)
      -> collate_audio_text:  the batch's features, padded to its longest clip (+2 frames, see
                              models/audio.py `audio_to_features`), a frame mask, and with a
                              tokenizer the captions' input_ids and attention_mask   (workers too)
      -> the training loop

A clip's audio is a file (a Path) or bytes inside a bigger file (a row of a parquet / Arrow
dataset, a member of a tar shard: a data/refs.py reference); both decode alike, key the feature
cache alike and pass the same checks.

Training shows one caption per clip per epoch, drawn from (seed, epoch, index) alone, so a resumed
run and every worker see the same caption. Evaluation scores every caption: `captions_flat`.

Bad audio follows `on_bad_audio`: a missing, empty or undecodable file, and a decoded clip with
non-finite samples or too short to give the audio tower one output (`audio_problem`):
- "fail" (default): raise BadAudioError naming `manifest:line` and the way to skip instead;
- "skip": the item is a `Skipped(path, line, reason)` marker, the collate leaves it out and lists
  it in batch["skipped"]. The report rides in the batch because workers are separate processes:
  a counter kept in the dataset would grow in a worker's copy and never reach the loop. The
  feature cache's hit / miss / recomputed counts ride in batch["cache"] for the same reason.
Bad clips are never written to the feature cache. `precheck` drops missing and empty files before
training, with a report; only decoding finds the rest.

What the training loop (train.py) does with them:
1. counts each distinct skipped file once, prints it, and lists it in skipped.jsonl;
2. a micro-batch whose every clip was skipped (batch["features"] is None) still reaches the model
   as zero rows (data/tasks.py), so DDP ranks stay in step; a global batch with nothing readable
   at all is skipped;
3. for epoch e resumed after k global batches: `sampler.set_state(e, k)` (data/sampling.py
   `GlobalBatchSampler`, wrapped in `WithEpoch`, which sends (epoch, index) keys), then
   `iter(loader)`. The epoch travels with each index because the workers are persistent: forked
   once, they keep the dataset copy they started with (forking a big training process again at
   every epoch cost a step's worth of copy-on-write page faults). It saves (epoch, global batches
   taken), not the optimizer step.
"""

import math
import random
import warnings
from typing import NamedTuple

import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset

from common.errors import UserError
from data.feature_cache import CACHE_STATUSES, FeatureCache
from data.manifest import Clip, audio_header, entry_name, readable_file_problem
from data.refs import MediaRef, media_input
from models.audio import (
    CHUNK_LENGTH,
    HOP_LENGTH,
    N_SAMPLES,
    SAMPLE_RATE,
    AudioDecodeError,
    ClipFeatures,
    clip_features,
    load_audio,
    pad_clip_features,
)
from models.qwen2_audio_encoder import Qwen2AudioEncoder, min_valid_frames
from models.tokenizer import tokenize

BAD_AUDIO_POLICIES = ("fail", "skip")


MIN_VALID_FRAMES = min_valid_frames(Qwen2AudioEncoder.output_lengths)  # 3


def audio_problem(audio: torch.Tensor) -> str | None:
    """Why a decoded 16 kHz clip cannot be trained on, or None: non-finite samples (which would
    turn the whole batch's loss into NaN) or too few samples for one encoder output."""
    n_bad = int((~torch.isfinite(audio)).sum())
    if n_bad:
        return f"it holds {n_bad} non-finite samples (NaN or inf)"
    if math.ceil(audio.numel() / HOP_LENGTH) < MIN_VALID_FRAMES:
        shortest = (MIN_VALID_FRAMES - 1) * HOP_LENGTH + 1
        return (f"it is too short: {audio.numel()} samples at {SAMPLE_RATE} Hz "
                f"({1000 * audio.numel() / SAMPLE_RATE:.1f} ms); the audio tower needs at least "
                f"{shortest} samples ({1000 * shortest / SAMPLE_RATE:.1f} ms) to give one output")
    return None


def audio_name(media) -> str:
    """How messages name a clip's audio: `audio file '/data/a.wav'`, or `the audio of train.parquet: row 3`."""
    return f"the audio of {media}" if isinstance(media, MediaRef) else f"audio file {str(media)!r}"


def checked_clip_features(path, where: str, n_mels: int) -> ClipFeatures:
    """Decode, check and transform one clip (a file's path, or a RowRef / MemberRef): AudioDecodeError
    (or OSError) for bad audio. A clip over 30 s is cut there with a warning naming `where` (its
    manifest line)."""
    audio = load_audio(media_input(path), name=str(path))
    if len(audio) > N_SAMPLES:
        warnings.warn(f"{where}: {path} is {len(audio) / SAMPLE_RATE:.2f} s long; "
                      f"truncating it to {CHUNK_LENGTH} s as the Whisper feature extractor does")
        audio = audio[:N_SAMPLES]
    problem = audio_problem(audio)
    if problem:
        raise AudioDecodeError(f"{audio_name(path)}: {problem}")
    features = clip_features(audio, n_mels)
    if not (torch.isfinite(features.features).all() and math.isfinite(features.fill)):
        # finite samples whose power overflows float32 (|x| ~ 1e17 and up in a float file): a NaN loss otherwise
        raise AudioDecodeError(f"{audio_name(path)}: its log-mel is non-finite, its samples reach "
                               f"{audio.abs().max().item():.3g} (audio lies in [-1, 1]); re-export it normalised")
    return features


class BadAudioError(UserError, RuntimeError):
    """An audio file that cannot be used, with on_bad_audio="fail"."""


class Skipped(NamedTuple):
    """A clip left out of a batch (on_bad_audio="skip"): what the training loop counts and prints."""
    path: str  # the audio file (str of a reference: `train.parquet: row 3`)
    line: int  # its line in the manifest (row or sample of a table or shard)
    reason: str


def split_skipped(items: list, collate_name: str) -> tuple[list[dict], list[Skipped]]:
    """A batch's dataset items, and the Skipped markers of the items left out."""
    kept, skipped = [], []
    for item in items:
        if isinstance(item, Skipped):
            skipped.append(item)
        elif isinstance(item, dict):
            kept.append(item)
        else:  # a bare None would hide which file was lost
            raise TypeError(f"{collate_name} got a {type(item).__name__}; expected a dataset item "
                            "(a dict) or a Skipped(path, line, reason)")
    return kept, skipped


class AudioTextDataset(Dataset):
    """One item a clip: {"index", "features" (ClipFeatures), "caption", "path", "line", "cache"
    ("hit" | "miss" | "recomputed", None without a cache)}, or a Skipped marker for bad audio
    when on_bad_audio="skip". Without a feature_cache the features are computed on every read;
    the numbers are the same."""

    def __init__(self, clips: list[Clip], seed: int = 0, on_bad_audio: str = "fail", *, n_mels: int,
                 feature_cache: FeatureCache | None = None):
        if on_bad_audio not in BAD_AUDIO_POLICIES:
            raise ValueError(f"on_bad_audio must be one of {BAD_AUDIO_POLICIES}, got {on_bad_audio!r}")
        if not clips:
            raise ValueError("AudioTextDataset got no clips; check the manifest (and precheck's report)")
        self.clips = list(clips)
        self.seed = seed
        self.on_bad_audio = on_bad_audio
        self.n_mels = n_mels
        self.feature_cache = feature_cache
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.clips)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def caption(self, index: int, epoch: int | None = None) -> str:
        """The caption clip `index` trains on in `epoch` (default: set_epoch's), a function of
        (seed, epoch, index) only."""
        captions = self.clips[index].captions
        # `random` hashes a str seed with SHA-512, the same in every process; Python's hash() of
        # a str is salted per process
        rng = random.Random(f"{self.seed}:{self.epoch if epoch is None else epoch}:{index}")
        return captions[rng.randrange(len(captions))]

    def compute_features(self, clip: Clip) -> ClipFeatures:
        return checked_clip_features(clip.audio, clip.where, self.n_mels)

    def __getitem__(self, key):
        """`key` is an index, or (epoch, index) from data/sampling.py `WithEpoch`: persistent workers
        keep their copy of the dataset, so the epoch whose caption to draw travels with the index."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        clip = self.clips[index]
        try:
            if self.feature_cache is None:
                features, status = self.compute_features(clip), None
            else:
                features, status = self.feature_cache.load_or_compute(
                    clip.audio, self.n_mels, lambda: self.compute_features(clip))
        except (OSError, AudioDecodeError) as e:  # OSError: missing or unreadable file
            if self.on_bad_audio == "skip":
                return Skipped(str(clip.audio), clip.line, str(e))
            raise BadAudioError(f"{clip.where}: {e}. Fix or remove this {entry_name(clip.source)}, or pass "
                                "--on-bad-audio skip to leave such clips out and report them") from e
        return {"index": index, "features": features, "caption": self.caption(index, epoch),
                "path": str(clip.audio), "line": clip.line, "cache": status}


def captions_flat(clips: list[Clip]) -> tuple[list[str], list[int]]:
    """Every caption of every clip, for evaluation: (texts, text_to_clip), text_to_clip[t] being
    the index of the clip that texts[t] describes."""
    texts, text_to_clip = [], []
    for i, clip in enumerate(clips):
        texts += clip.captions
        text_to_clip += [i] * len(clip.captions)
    return texts, text_to_clip


def count_truncated_captions(tokenizer: Tokenizer, clips: list[Clip], chunk: int = 1024) -> int:
    """How many captions of `clips` the tokenizer cuts at its max_length (the text tower's limit),
    so training can say so once. A cut encoding carries the rest in `overflowing`."""
    texts, _ = captions_flat(clips)
    return sum(bool(encoding.overflowing)
               for start in range(0, len(texts), chunk)
               for encoding in tokenizer.encode_batch(texts[start : start + chunk]))


def clip_durations(clips: list[Clip]) -> list[float]:
    """Seconds of audio in each clip's file (or embedded bytes), from its header alone (for
    --bucket-by-length); 0.0 for a file that cannot be read, which decoding will report in its turn."""
    durations = []
    for clip in clips:
        try:
            frames, sample_rate = audio_header(clip.audio)  # read already by the check before training
            durations.append(frames / sample_rate)
        except (RuntimeError, OSError, ZeroDivisionError):  # soundfile raises LibsndfileError (a RuntimeError)
            durations.append(0.0)
    return durations


def precheck(clips: list[Clip]) -> tuple[list[Clip], list[tuple[Clip, str]]]:
    """(clips whose file exists and has a readable sound header, [(clip, problem), ...] for the others)."""
    problems = [(clip, problem) for clip in clips if (problem := readable_file_problem(clip.audio, "audio"))]
    bad = {clip for clip, _ in problems}
    return [clip for clip in clips if clip not in bad], problems


def collate_audio_text(items: list, n_mels: int | None = None, pad_to_30s: bool = False,
                       tokenizer: Tokenizer | None = None) -> dict:
    """Dataset items -> {"features": (B, n_mels, T) float32, "frame_mask": (B, T) bool,
    "captions": [B str], "index": (B,) long, "paths": [B str], "lines": [B int],
    "skipped": [Skipped, ...], "cache": {"hit": int, "miss": int, "recomputed": int},
    "input_ids": (B, L) long, "attention_mask": (B, L) long}.

    The features equal `audio_to_features` of the batch's clips. input_ids and attention_mask are
    models/tokenizer.py `tokenize(tokenizer, captions)`, None without a tokenizer. If every item
    was skipped, the tensors are None. `n_mels`, if given, is checked against the items'.
    Use `functools.partial(collate_audio_text, n_mels=..., tokenizer=...)` as a collate_fn.
    """
    kept, skipped = split_skipped(items, "collate_audio_text")
    cache = {status: sum(item["cache"] == status for item in kept) for status in CACHE_STATUSES}
    if not kept:
        return {"features": None, "frame_mask": None, "captions": [], "paths": [], "lines": [],
                "index": torch.zeros(0, dtype=torch.long), "skipped": skipped, "cache": cache,
                "input_ids": None, "attention_mask": None}
    clips = [item["features"] for item in kept]
    if n_mels is not None and clips[0].features.shape[0] != n_mels:
        raise ValueError(f"the dataset computed {clips[0].features.shape[0]} mel bins but the collate "
                         f"expects {n_mels}: build AudioTextDataset with the audio tower's num_mel_bins")
    features, frame_mask = pad_clip_features(clips, pad_to_30s)  # (B, n_mels, T), (B, T)
    captions = [item["caption"] for item in kept]
    input_ids, attention_mask = tokenize(tokenizer, captions) if tokenizer is not None else (None, None)
    return {
        "features": features,
        "frame_mask": frame_mask,
        "captions": captions,
        "index": torch.tensor([item["index"] for item in kept], dtype=torch.long),
        "paths": [item["path"] for item in kept],
        "lines": [item["line"] for item in kept],
        "skipped": skipped,
        "cache": cache,
        "input_ids": input_ids,  # (B, L) or None
        "attention_mask": attention_mask,  # (B, L) or None
    }
