"""Audio-text batches for contrastive training and retrieval evaluation.

    clips (data/manifest.py)
      -> AudioTextDataset[i]: decode one file, pick this epoch's caption   (runs in DataLoader workers)
      -> collate_audio_text:  log-mel of the batch, padded to its longest clip (+2 frames, see
                              models/audio.py `audio_to_features`), with a frame mask
      -> the training loop:   tokenizes batch["captions"] with the model's tokenizer

Training shows one caption per clip per epoch, drawn from (seed, epoch, index) alone, so a resumed
run and every worker see the same caption. Evaluation scores every caption: `captions_flat`.

Bad audio (a missing, empty or undecodable file) follows `on_bad_audio`:
- "fail" (default): raise BadAudioError naming `manifest:line` and the way to skip instead;
- "skip": the item is a `Skipped(path, line, reason)` marker, the collate leaves it out and lists
  it in batch["skipped"]. The report rides in the batch because workers are separate processes:
  a counter kept in the dataset would grow in a worker's copy and never reach the loop.
`precheck` drops missing and empty files before training, with a report; only decoding finds
the rest.

What the training loop must do:
1. add len(batch["skipped"]) to a running count and print each entry (or the first few);
2. when batch["features"] is None every clip of the batch was skipped: skip the step, count it;
3. for epoch e resumed after k batches: `dataset.set_epoch(e)` and `sampler.set_state(e, k)`, then
   `iter(loader)`. Workers copy the dataset when the iterator is created, so set the epoch first,
   and leave `persistent_workers` off (persistent workers keep the epoch they started with).
   Save (epoch, batches taken from the loader, empty batches included), not the optimizer step.
"""

import math
import random
import warnings
from typing import NamedTuple

import torch
from torch.utils.data import Dataset, Sampler

from data.manifest import Clip, check_files
from models.audio import CHUNK_LENGTH, N_SAMPLES, SAMPLE_RATE, AudioDecodeError, audio_to_features, load_audio

BAD_AUDIO_POLICIES = ("fail", "skip")


class BadAudioError(RuntimeError):
    """An audio file that cannot be used, with on_bad_audio="fail"."""


class Skipped(NamedTuple):
    """A clip left out of a batch (on_bad_audio="skip"): what the training loop counts and prints."""
    path: str  # the audio file
    line: int  # its line in the manifest
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
    """One item a clip: {"index", "audio" (1-D float32 at 16 kHz, at most 30 s), "caption",
    "path", "line"}, or a Skipped marker for bad audio when on_bad_audio="skip"."""

    def __init__(self, clips: list[Clip], seed: int = 0, on_bad_audio: str = "fail"):
        if on_bad_audio not in BAD_AUDIO_POLICIES:
            raise ValueError(f"on_bad_audio must be one of {BAD_AUDIO_POLICIES}, got {on_bad_audio!r}")
        if not clips:
            raise ValueError("AudioTextDataset got no clips; check the manifest (and precheck's report)")
        self.clips = list(clips)
        self.seed = seed
        self.on_bad_audio = on_bad_audio
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.clips)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def caption(self, index: int) -> str:
        """The caption clip `index` trains on this epoch, a function of (seed, epoch, index) only."""
        captions = self.clips[index].captions
        # `random` hashes a str seed with SHA-512, the same in every process; Python's hash() of
        # a str is salted per process
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        return captions[rng.randrange(len(captions))]

    def __getitem__(self, index: int):
        clip = self.clips[index]
        try:
            audio = load_audio(clip.audio)
        except (OSError, AudioDecodeError) as e:  # OSError: missing or unreadable file
            if self.on_bad_audio == "skip":
                return Skipped(str(clip.audio), clip.line, str(e))
            raise BadAudioError(f"{clip.where}: {e}. Fix or remove this manifest line, or pass "
                                "on_bad_audio='skip' (train.py --on-bad-audio skip) to leave such "
                                "clips out and report them") from e
        if len(audio) > N_SAMPLES:
            # here rather than in audio_to_features, so workers send at most 30 s to the loop
            warnings.warn(f"{clip.where}: {clip.audio} is {len(audio) / SAMPLE_RATE:.2f} s long; "
                          f"truncating it to {CHUNK_LENGTH} s as the Whisper feature extractor does")
            audio = audio[:N_SAMPLES]
        return {"index": index, "audio": audio, "caption": self.caption(index),
                "path": str(clip.audio), "line": clip.line}


def captions_flat(clips: list[Clip]) -> tuple[list[str], list[int]]:
    """Every caption of every clip, for evaluation: (texts, text_to_clip), text_to_clip[t] being
    the index of the clip that texts[t] describes."""
    texts, text_to_clip = [], []
    for i, clip in enumerate(clips):
        texts += clip.captions
        text_to_clip += [i] * len(clip.captions)
    return texts, text_to_clip


def precheck(clips: list[Clip]) -> tuple[list[Clip], list[tuple[Clip, str]]]:
    """(clips whose file exists and is not empty, [(clip, problem), ...] for the others)."""
    problems = check_files(clips)
    bad = {clip for clip, _ in problems}
    return [clip for clip in clips if clip not in bad], problems


def collate_audio_text(items: list, n_mels: int, pad_to_30s: bool = False) -> dict:
    """Dataset items -> {"features": (B, n_mels, T) float32, "frame_mask": (B, T) bool,
    "captions": [B str], "index": (B,) long, "paths": [B str], "lines": [B int],
    "skipped": [Skipped, ...]}. If every item was skipped, "features" and "frame_mask" are None.

    Use `functools.partial(collate_audio_text, n_mels=...)` as a DataLoader's collate_fn.
    """
    kept, skipped = split_skipped(items, "collate_audio_text")
    if not kept:
        return {"features": None, "frame_mask": None, "captions": [], "paths": [], "lines": [],
                "index": torch.zeros(0, dtype=torch.long), "skipped": skipped}
    features, frame_mask = audio_to_features([item["audio"] for item in kept], n_mels=n_mels,
                                             pad_to_30s=pad_to_30s)  # (B, n_mels, T), (B, T)
    return {
        "features": features,
        "frame_mask": frame_mask,
        "captions": [item["caption"] for item in kept],
        "index": torch.tensor([item["index"] for item in kept], dtype=torch.long),
        "paths": [item["path"] for item in kept],
        "lines": [item["line"] for item in kept],
        "skipped": skipped,
    }


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled clip order of one epoch, a function of (seed, epoch) only."""
    # the prime stride keeps (seed, epoch) pairs apart for any epoch below 1_000_003
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


class ResumableBatchSampler(Sampler):
    """Batches of indices in `epoch_order(n, seed, epoch)`, from batch `batches_done` to the end
    of the epoch. A run resumed at (epoch, k) therefore sees exactly the batches an uninterrupted
    run would have seen after its first k. The state changes only through set_state: call it
    before every epoch. Use as a DataLoader's `batch_sampler`."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, drop_last: bool = False):
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
        self.n, self.batch_size, self.seed, self.drop_last = n, batch_size, seed, drop_last
        self.epoch, self.batches_done = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def set_state(self, epoch: int, batches_done: int = 0) -> None:
        if not 0 <= batches_done <= self.batches_per_epoch:
            raise ValueError(f"batches_done={batches_done} is outside 0..{self.batches_per_epoch}, "
                             f"the batches in one epoch of {self.n} clips at batch size "
                             f"{self.batch_size}; was the state saved with another data set or batch size?")
        self.epoch, self.batches_done = epoch, batches_done

    def __len__(self) -> int:
        return self.batches_per_epoch - self.batches_done

    def __iter__(self):
        order = epoch_order(self.n, self.seed, self.epoch)
        for b in range(self.batches_done, self.batches_per_epoch):
            yield order[b * self.batch_size : (b + 1) * self.batch_size]
