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
"""

import math
import os
import warnings

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms window at 16 kHz
HOP_LENGTH = 160  # 10 ms hop at 16 kHz
CHUNK_LENGTH = 30  # seconds: the reference pads or truncates every clip to this
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000
MEL_FMAX = 8000.0  # the reference's max_frequency: Nyquist at 16 kHz
LOG_FLOOR = 1e-10  # power clamp before log10, so silence maps to -10
DYNAMIC_RANGE = 8.0  # log10 units kept below the clip's maximum (80 dB)

# Resampler: Hann-windowed sinc, the same family as torchaudio's default `sinc_interp_hann`.
RESAMPLE_ZERO_CROSSINGS = 6  # sinc lobes kept on each side of a tap: sharper cutoff, more taps
RESAMPLE_ROLLOFF = 0.99  # cutoff at 99% of the lower Nyquist, leaving room for the transition band


class AudioDecodeError(ValueError):
    """A file that exists but holds no decodable audio (empty, zero samples, unknown format)."""


def resample(audio, orig_sr, new_sr):
    """Band-limited sinc interpolation, written as a polyphase filter.

    Output sample m sits at input position m * orig_sr / new_sr. Its value is the sum of the
    input samples weighted by a low-pass sinc (cutoff at ROLLOFF times the lower Nyquist, so
    downsampling does not alias) times a Hann window that truncates it to ZERO_CROSSINGS
    lobes. After dividing both rates by their gcd (44100 -> 16000 is 441 -> 160), the
    fractional offsets repeat every `new` outputs, so one kernel row per phase and a strided
    conv1d compute every output; this is the algorithm of torchaudio's `resample`.
    """
    g = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // g, new_sr // g
    # low-pass at ROLLOFF x the lower Nyquist: cutoff / (2 orig) cycles per input sample, so
    # the sinc's zero crossings are orig / cutoff input samples apart
    cutoff = RESAMPLE_ROLLOFF * min(orig, new)
    width = math.ceil(RESAMPLE_ZERO_CROSSINGS * orig / cutoff)  # half-support in input samples
    taps = torch.arange(-width, width + orig, dtype=torch.float64)  # (K,) input offsets
    phases = torch.arange(new, dtype=torch.float64)[:, None] * orig / new  # (new, 1)
    t = (taps[None, :] - phases) * cutoff / orig  # (new, K) distance in sinc zero-crossings
    window = torch.where(
        t.abs() <= RESAMPLE_ZERO_CROSSINGS,
        torch.cos(t * math.pi / (2 * RESAMPLE_ZERO_CROSSINGS)) ** 2,
        torch.zeros_like(t),
    )
    # the cutoff / orig gain keeps a DC input at unit amplitude after the low-pass
    kernel = torch.special.sinc(t) * window * cutoff / orig  # (new, K)

    x = torch.as_tensor(audio, dtype=torch.float64)
    x = F.pad(x[None, None], (width, width + orig))  # (1, 1, n + 2*width + orig)
    y = F.conv1d(x, kernel[:, None, :], stride=orig)  # (1, new, blocks)
    y = y[0].t().reshape(-1)  # (blocks, new) -> interleaved output samples
    n_out = math.ceil(len(audio) * new / orig)
    return y[:n_out].to(torch.float32)


def load_audio(path, sr=SAMPLE_RATE):
    """Decode any file soundfile reads (wav, flac, ogg, ...) to a 1-D float32 tensor at `sr`.

    Channels are averaged to mono before resampling, which is what a mono model would hear.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"audio file not found: {path!r}; check the path (manifest paths "
                                "are relative to the manifest's folder)")
    if os.path.getsize(path) == 0:
        raise AudioDecodeError(f"audio file {path!r} is empty (0 bytes); re-export or remove it")
    try:
        data, file_sr = sf.read(path, dtype="float32", always_2d=True)  # (n, channels)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AudioDecodeError(f"cannot decode audio file {path!r} ({e}); convert it to wav, "
                               "flac or ogg") from e
    if data.shape[0] == 0:
        raise AudioDecodeError(f"audio file {path!r} decodes to 0 samples; re-export or remove it")
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


def log_mel_spectrogram(audio, n_mels=80):
    """Whisper log-mel of already padded waveform(s): (L,) -> (n_mels, L // HOP_LENGTH), or
    (B, L) -> (B, n_mels, L // HOP_LENGTH). Exactly the reference's computation on its input.

    Padding is the caller's business (see `audio_to_features`): the floor `max - 8` is taken
    over every frame of each example, so what is appended to a clip can change its features.
    """
    audio = torch.as_tensor(audio, dtype=torch.float32)
    window = torch.hann_window(N_FFT)  # periodic, as torch.stft and the reference use
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect",
                      return_complex=True)  # (..., F, L // HOP + 1)
    # the last frame is centred past the end of the padded input; the reference drops it
    power = (stft[..., :-1].abs() ** 2).contiguous()  # (..., F, T)
    filters = torch.from_numpy(mel_filters(n_mels)).to(torch.float32)  # (F, n_mels)
    log_spec = torch.clamp(filters.T @ power, min=LOG_FLOOR).log10()  # (..., n_mels, T)
    peak = log_spec.amax(dim=(-2, -1), keepdim=True)  # per example, over the whole clip
    log_spec = torch.maximum(log_spec, peak - DYNAMIC_RANGE)
    # Whisper's affine rescale: maps the [peak - 8, peak] range to roughly [-1, 1]
    return (log_spec + 4.0) / 4.0


def _clip_to_tensor(item, index):
    """One batch element (path, numpy array or tensor, 16 kHz mono) -> 1-D float32 tensor."""
    is_path = isinstance(item, (str, os.PathLike))
    name = f"clip {index}" + (f" ({os.fspath(item)!r})" if is_path else "")
    if is_path:
        audio = load_audio(item)
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
    - So we append zeros up to L = HOP_LENGTH * (T + 2) samples: after dropping the last STFT
      frame that yields frames 0 .. T + 1, computed on the same samples as the reference's
      (the reflect padding at our end mirrors only appended zeros), hence the same maximum
      and the same values; we keep the first T frames. Near 30 s L is capped at N_SAMPLES,
      which is then the reference's computation itself.
    """
    clips = audio if isinstance(audio, (list, tuple)) else [audio]
    if len(clips) == 0:
        raise ValueError("audio_to_features got an empty list of clips")
    clips = [_clip_to_tensor(item, i) for i, item in enumerate(clips)]

    lengths = torch.tensor([len(c) for c in clips])  # (B,) samples
    valid_frames = (lengths + HOP_LENGTH - 1) // HOP_LENGTH  # (B,) ceil, as the reference's mask
    n_frames = N_FRAMES if pad_to_30s else min(N_FRAMES, int(valid_frames.max()) + 2)
    n_padded = min(N_SAMPLES, HOP_LENGTH * (n_frames + 2))

    waveforms = torch.zeros(len(clips), n_padded)  # (B, L) zeros are silence, as the reference pads
    for i, clip in enumerate(clips):
        waveforms[i, : len(clip)] = clip
    features = log_mel_spectrogram(waveforms, n_mels)[..., :n_frames]  # (B, n_mels, T)
    frame_mask = torch.arange(n_frames)[None, :] < valid_frames[:, None]  # (B, T)
    return features, frame_mask
