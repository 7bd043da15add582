"""Audio front end: decode, resample to 16 kHz, Whisper log-mel features.

Paper: Radford et al. 2022, "Robust Speech Recognition via Large-Scale Weak Supervision"
(Whisper). The log-mel recipe is openai/whisper `audio.py`; the numbers we must reproduce are
those of `transformers.WhisperFeatureExtractor` (`feature_extraction_whisper.py` and
`audio_utils.mel_filter_bank(norm="slaney", mel_scale="slaney")`), which Qwen2-Audio also uses
with 128 bins. transformers is a test-only reference: nothing here imports it, nor torchaudio.

Quirks of the reference that we copy on purpose:
- the STFT is centred (reflect padding by N_FFT // 2) and its last frame is dropped, so a
  waveform of L samples gives L // HOP_LENGTH frames;
- the dynamic-range floor `max - 8` uses the maximum over the whole padded clip, per example;
- a clip of n samples has ceil(n / HOP_LENGTH) valid frames in its attention mask
  (the mask is the sample mask read every HOP_LENGTH samples), not n // HOP_LENGTH.

A batch's features are built from per-clip pieces (`clip_features`, then `pad_clip_features`),
so a clip's log-mel can be computed once and cached (data/feature_cache.py): what a clip
contributes to a batch does not depend on the other clips (see `audio_to_features`).
"""

import functools
import math
import os
import warnings
from typing import NamedTuple

import numpy as np
import soundfile as sf
import soxr
import torch

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms window at 16 kHz
HOP_LENGTH = 160  # 10 ms hop at 16 kHz
CHUNK_LENGTH = 30  # seconds: the reference pads or truncates every clip to this
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000
MEL_FMAX = 8000.0  # the reference's max_frequency: Nyquist at 16 kHz
LOG_FLOOR = 1e-10  # power clamp before log10, so silence maps to -10
DYNAMIC_RANGE = 8.0  # log10 units kept below the clip's maximum (80 dB)

# soxr's "HQ" preset: the resampler of librosa (res_type="soxr_hq", its default) and of
# `datasets`' Audio feature, so our 16 kHz samples are those the usual HF pipelines feed the model
RESAMPLE_QUALITY = "HQ"
# Bump when clip_features' numbers change (resampler, mel filters, padding rule): it is part of
# every feature-cache key (data/feature_cache.py), so old entries are then never read.
FRONTEND_VERSION = 2  # 1: the hand-written float64 sinc resampler; 2: soxr


class AudioDecodeError(ValueError):
    """A file that exists but holds no usable audio: empty, zero samples or an unknown format
    (load_audio), or samples no model should see (data/audio_text.py `audio_problem`)."""


def resample(audio, orig_sr, new_sr):
    """1-D float32 audio at orig_sr -> 1-D float32 tensor at new_sr, with soxr (band-limited:
    content above the lower Nyquist is filtered out, not aliased). soxr returns about
    len * new_sr / orig_sr samples (so a single 44.1 kHz sample becomes none)."""
    x = np.ascontiguousarray(torch.as_tensor(audio, dtype=torch.float32).detach().cpu().numpy())
    return torch.from_numpy(soxr.resample(x, orig_sr, new_sr, quality=RESAMPLE_QUALITY))


def load_audio(path, sr=SAMPLE_RATE, name=None):
    """Decode any file soundfile reads (wav, flac, ogg, mp3, ...) to a 1-D float32 tensor at `sr`.

    `path` is a file path, or a binary file object holding a whole encoded file (io.BytesIO of the
    bytes a dataset row or a tar member holds); `name` says where those bytes came from in errors.
    Channels are averaged to mono before resampling, which is what a mono model would hear.
    """
    if hasattr(path, "read"):  # soundfile reads a file object through libsndfile's virtual I/O, same decoder
        source, what = path, f"audio {name or 'bytes'}"
    else:
        source = os.fspath(path)
        what = f"audio file {source!r}"
        if not os.path.isfile(source):
            raise FileNotFoundError(f"audio file not found: {source!r}; check the path (manifest paths "
                                    "are relative to the manifest's folder)")
        if os.path.getsize(source) == 0:
            raise AudioDecodeError(f"{what} is empty (0 bytes); re-export or remove it")
    try:
        data, file_sr = sf.read(source, dtype="float32", always_2d=True)  # (n, channels)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AudioDecodeError(f"cannot decode {what} ({e}); convert it to wav, flac or ogg") from e
    if data.shape[0] == 0:
        raise AudioDecodeError(f"{what} decodes to 0 samples; re-export or remove it")
    mono = torch.from_numpy(data.mean(axis=1))
    return mono if file_sr == sr else resample(mono, file_sr, sr)


def mel_filters(n_mels, n_fft=N_FFT, sr=SAMPLE_RATE, fmax=MEL_FMAX):
    """Slaney-scale, Slaney-normalised triangular filters, (n_fft // 2 + 1, n_mels) float64.

    The Slaney mel scale is linear below 1 kHz (3 mels per 200 Hz) and logarithmic above
    (27 mels per factor 6.4); librosa's default and transformers' `mel_filter_bank`.
    """
    def hz_to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        log_part = 15.0 + np.log(np.maximum(f, 1000.0) / 1000.0) * 27.0 / np.log(6.4)
        return np.where(f >= 1000.0, log_part, 3.0 * f / 200.0)

    def mel_to_hz(m):
        log_part = 1000.0 * np.exp(np.log(6.4) / 27.0 * (np.maximum(m, 15.0) - 15.0))
        return np.where(m >= 15.0, log_part, 200.0 * m / 3.0)

    edges_hz = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(fmax), n_mels + 2))  # (n_mels+2,)
    # `sr // 2` (integer), as the reference, so the bins land on exactly the same frequencies
    fft_hz = np.linspace(0, sr // 2, n_fft // 2 + 1)  # (F,)
    slopes = edges_hz[None, :] - fft_hz[:, None]  # (F, n_mels+2)
    rising = -slopes[:, :-2] / np.diff(edges_hz)[:-1]
    falling = slopes[:, 2:] / np.diff(edges_hz)[1:]
    filters = np.maximum(0.0, np.minimum(rising, falling))  # (F, n_mels)
    # Slaney normalisation: each triangle has unit area in Hz, so wide high bands are not louder
    return filters * (2.0 / (edges_hz[2:] - edges_hz[:-2]))[None, :]


@functools.lru_cache(maxsize=None)
def _mel_filters_float32(n_mels):
    """mel_filters(n_mels) as a float32 tensor, built once per n_mels (callers must not modify it)."""
    return torch.from_numpy(mel_filters(n_mels)).to(torch.float32)  # (F, n_mels)


@functools.lru_cache(maxsize=None)
def _hann_window():
    return torch.hann_window(N_FFT)  # periodic, as torch.stft and the reference use


def log_mel_spectrogram(audio, n_mels=80):
    """Whisper log-mel of already padded waveform(s): (L,) -> (n_mels, L // HOP_LENGTH), or
    (B, L) -> (B, n_mels, L // HOP_LENGTH). Exactly the reference's computation on its input.

    Padding is the caller's business (see `audio_to_features`): the floor `max - 8` is taken
    over every frame of each example, so what is appended to a clip can change its features.
    """
    return _log_mel_and_silence(audio, n_mels)[0]


def _log_mel_and_silence(audio, n_mels):
    """(log_mel_spectrogram(audio, n_mels), the value a frame of pure silence takes in it, shaped
    (..., 1, 1)): the clamp floor raised to this example's `peak - 8`, then the same rescale."""
    audio = torch.as_tensor(audio, dtype=torch.float32)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=_hann_window(), center=True,
                      pad_mode="reflect", return_complex=True)  # (..., F, L // HOP + 1)
    # the last frame is centred past the end of the padded input; the reference drops it
    power = (stft[..., :-1].abs() ** 2).contiguous()  # (..., F, T)
    filters = _mel_filters_float32(n_mels)  # (F, n_mels)
    log_spec = torch.clamp(filters.T @ power, min=LOG_FLOOR).log10()  # (..., n_mels, T)
    peak = log_spec.amax(dim=(-2, -1), keepdim=True)  # per example, over the whole clip
    floor = peak - DYNAMIC_RANGE
    # silence has zero power in every bin, so clamp and log10 give log10(LOG_FLOOR) = -10
    silence = torch.full_like(peak, LOG_FLOOR).log10()  # (..., 1, 1)
    # Whisper's affine rescale: maps the [peak - 8, peak] range to roughly [-1, 1]
    return (torch.maximum(log_spec, floor) + 4.0) / 4.0, (torch.maximum(silence, floor) + 4.0) / 4.0


class ClipFeatures(NamedTuple):
    """One clip's share of a batch's log-mel features: what `clip_features` computes, the
    feature cache stores and `pad_clip_features` assembles into a batch."""
    features: torch.Tensor  # (n_mels, min(valid_frames + 2, N_FRAMES)) float32
    valid_frames: int  # ceil(samples / HOP_LENGTH): the frames the frame mask marks valid
    fill: float  # the value of every later frame (pure silence), a float32 number


def clip_features(audio, n_mels):
    """A 1-D float32 clip at 16 kHz (1 to N_SAMPLES samples) -> ClipFeatures.

    With V = ceil(n / HOP_LENGTH) valid frames, frames 0 .. V + 1 are what any batch holding
    this clip gets (the derivation is in `audio_to_features`), and every later frame is silence:
    the per-clip constant `fill`. Truncating to 30 s is the caller's job, with its own warning.
    """
    audio = torch.as_tensor(audio, dtype=torch.float32)
    if audio.dim() != 1 or not 0 < audio.numel() <= N_SAMPLES:
        raise ValueError(f"clip_features takes 1-D audio of 1 to {N_SAMPLES} samples (30 s at "
                         f"{SAMPLE_RATE} Hz), got shape {tuple(audio.shape)}")
    valid_frames = -(-audio.numel() // HOP_LENGTH)  # ceil, as the reference's mask
    n_frames = min(N_FRAMES, valid_frames + 2)
    # zeros up to frame n_frames + 1, as audio_to_features explains (capped at 30 s)
    waveform = torch.zeros(min(N_SAMPLES, HOP_LENGTH * (n_frames + 2)))
    waveform[: audio.numel()] = audio
    # fp32 whatever the caller's autocast: a bf16 mel matmul would give other numbers than the
    # reference's (and than a cache entry made outside autocast)
    with torch.autocast("cpu", enabled=False):
        features, silence = _log_mel_and_silence(waveform, n_mels)  # (n_mels, >= n_frames), (1, 1)
    return ClipFeatures(features[:, :n_frames].contiguous(), valid_frames, silence.item())


def pad_clip_features(clips, pad_to_30s=False):
    """[ClipFeatures, ...] -> (features (B, n_mels, T) float32, frame_mask (B, T) bool), exactly
    `audio_to_features` of the same clips: T = 3000 with pad_to_30s, else the longest clip's
    valid frames + 2 (at most 3000); each clip's frames past its own are its `fill`."""
    if not clips:
        raise ValueError("pad_clip_features got an empty list of clips")
    n_mels = clips[0].features.shape[0]
    if any(clip.features.shape[0] != n_mels for clip in clips):
        raise ValueError(f"clips with different n_mels in one batch: "
                         f"{sorted({clip.features.shape[0] for clip in clips})}")
    valid_frames = torch.tensor([clip.valid_frames for clip in clips])  # (B,)
    n_frames = N_FRAMES if pad_to_30s else min(N_FRAMES, int(valid_frames.max()) + 2)
    features = torch.empty(len(clips), n_mels, n_frames)  # (B, n_mels, T)
    for i, clip in enumerate(clips):
        width = clip.features.shape[1]  # min(V + 2, 3000) <= T
        features[i, :, :width] = clip.features
        features[i, :, width:] = clip.fill
    frame_mask = torch.arange(n_frames)[None, :] < valid_frames[:, None]  # (B, T)
    return features, frame_mask


def clip_waveform(item, index):
    """One batch element (path, binary file object of an encoded file, numpy array or tensor,
    16 kHz mono) -> 1-D float32 tensor."""
    is_path = isinstance(item, (str, os.PathLike))
    name = f"clip {index}" + (f" ({os.fspath(item)!r})" if is_path else "")
    if is_path:
        audio = load_audio(item)
    elif hasattr(item, "read"):
        audio = load_audio(item, name=name)
    elif isinstance(item, (np.ndarray, torch.Tensor)):
        audio = torch.as_tensor(item).detach().cpu().to(torch.float32)
    else:
        raise TypeError(f"{name}: expected a path, numpy array or torch tensor, "
                        f"got {type(item).__name__}")
    if audio.dim() != 1:
        raise ValueError(f"{name}: expected 1-D mono audio at {SAMPLE_RATE} Hz, got shape "
                         f"{tuple(audio.shape)}; average the channels and resample first")
    if audio.numel() == 0:
        raise ValueError(f"{name} has 0 samples; remove it from the batch")
    if audio.numel() > N_SAMPLES:
        warnings.warn(f"{name} is {audio.numel() / SAMPLE_RATE:.2f} s long; truncating it to "
                      f"{CHUNK_LENGTH} s as the Whisper feature extractor does")
        audio = audio[:N_SAMPLES]
    return audio


def audio_to_features(audio, n_mels=128, pad_to_30s=False):
    """Audio clip(s) -> (features (B, n_mels, T) float32, frame_mask (B, T) bool).

    `audio` is a path, a 1-D 16 kHz numpy array or tensor, or a list mixing those. Clips longer
    than 30 s are truncated to their first 30 s with a warning (the reference truncates
    silently); an empty clip is an error naming it.

    pad_to_30s=True reproduces `WhisperFeatureExtractor(feature_size=n_mels)(...,
    return_attention_mask=True)` exactly: T = 3000. pad_to_30s=False pads the batch only to its
    longest clip plus two frames, T = min(3000, max ceil(n / HOP_LENGTH) + 2), and the features
    are still exactly the reference's first T frames, valid and padded alike.

    Why two extra frames: the encoder's two k=3 convolutions (the second with stride 2) let the
    last valid output of a clip with V valid frames read input frames V and V + 1, which in the
    reference are log-mel frames of its zero padding (not zeros). Without them the longest clip
    of a batch would differ from the reference everywhere, since attention spreads that frame.
    The frame mask still marks only the V valid frames. Why the values are exact:
    - The reference appends zeros up to 30 s. A centred frame j sees samples
      [160 j - 200, 160 j + 200), so every frame that touches real samples has j <= V + 1, and
      every later frame is pure silence, whose log-power is the clamp floor -10; the maximum
      over the 30 s clip is therefore the maximum over frames 0 .. V + 1 <= T.
    - So each clip is computed on its own (`clip_features`): zeros appended up to
      L = HOP_LENGTH * (V + 4) samples give, after dropping the last STFT frame, frames
      0 .. V + 3, computed on the same samples as the reference's (the reflect padding at our
      end mirrors only appended zeros), hence the same maximum and the same values; we keep
      frames 0 .. V + 1. Near 30 s L is capped at N_SAMPLES, the reference's computation itself.
    - Every frame after V + 1 is silence, floored at this clip's own `peak - 8`: one constant
      per clip (`ClipFeatures.fill`), so `pad_clip_features` assembles the batch by filling, and
      nothing a clip contributes depends on the other clips of its batch.
    """
    clips = audio if isinstance(audio, (list, tuple)) else [audio]
    if len(clips) == 0:
        raise ValueError("audio_to_features got an empty list of clips")
    clips = [clip_waveform(item, i) for i, item in enumerate(clips)]
    return pad_clip_features([clip_features(clip, n_mels) for clip in clips], pad_to_30s)


class BatchFeatures:
    """A DataLoader collate_fn for embed_audio: (index, path or waveform) items -> the batch's
    log-mel and frame mask, each clip's features read from or kept in a feature cache when it is a
    file, and checked (a picklable object, so workers can run it)."""

    def __init__(self, n_mels: int, pad_to_30s: bool, feature_cache=None, min_frames: int = 1):
        self.n_mels, self.pad_to_30s, self.feature_cache, self.min_frames = (n_mels, pad_to_30s, feature_cache,
                                                                             min_frames)

    def clip(self, index: int, item) -> ClipFeatures:
        def compute() -> ClipFeatures:
            features = clip_features(clip_waveform(item, index), self.n_mels)
            name = f"clip {index}" + (f" ({os.fspath(item)!r})" if isinstance(item, (str, os.PathLike)) else "")
            if not (torch.isfinite(features.features).all() and math.isfinite(features.fill)):
                raise ValueError(f"{name}: its log-mel is non-finite (NaN/inf samples, or samples far outside [-1, 1])")
            if features.valid_frames < self.min_frames:
                raise ValueError(f"{name} is too short for one output of the audio tower "
                                 f"({features.valid_frames} log-mel frames)")
            return features  # checked before any cache keeps it

        if self.feature_cache is not None and isinstance(item, (str, os.PathLike)):
            return self.feature_cache.load_or_compute(item, self.n_mels, compute)[0]
        return compute()

    def __call__(self, batch: list[tuple[int, object]]):
        return pad_clip_features([self.clip(index, item) for index, item in batch], self.pad_to_30s)
