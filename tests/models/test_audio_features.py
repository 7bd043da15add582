"""Parity of models/audio.py with transformers.WhisperFeatureExtractor, per-clip features that
assemble into the batch's (to float32 rounding), resampling with soxr, and decoding behaviour.

The reference is called exactly as Qwen2-Audio's processor calls it:
`WhisperFeatureExtractor(feature_size=n_mels)(clips, sampling_rate=16000, return_tensors="pt",
return_attention_mask=True)`, which pads every clip to 30 s. Our unpadded mode must equal the
reference's first T frames (valid and padded ones alike), so no frame is exempted below.
"""

import functools
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from models.audio import (
    HOP_LENGTH,
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    AudioDecodeError,
    _mel_filters_float32,
    audio_to_features,
    clip_features,
    load_audio,
    log_mel_spectrogram,
    mel_filters,
    pad_clip_features,
    resample,
)

import transformers  # the reference; a missing install must fail, never skip
from transformers.audio_utils import mel_filter_bank  # noqa: E402

TOL = 1e-4
N_MELS = [80, 128]


@functools.lru_cache(maxsize=None)
def _extractor(n_mels):
    return transformers.WhisperFeatureExtractor(feature_size=n_mels)


def reference(clips, n_mels):
    out = _extractor(n_mels)(clips, sampling_rate=SAMPLE_RATE, return_tensors="pt",
                             return_attention_mask=True)
    return out.input_features, out.attention_mask.bool()


def sine(freq, seconds, sr=SAMPLE_RATE, amplitude=0.5):
    t = np.arange(int(round(seconds * sr))) / sr
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def assert_matches_reference(clips, n_mels, pad_to_30s):
    ours, mask = audio_to_features(clips, n_mels=n_mels, pad_to_30s=pad_to_30s)
    ref, ref_mask = reference(clips, n_mels)
    n_frames = ours.shape[-1]
    if pad_to_30s:
        assert ours.shape == ref.shape
    else:
        # the batch is padded only to its longest clip plus the two frames the encoder's
        # convolutions read beyond it, and nothing valid lies beyond that
        assert n_frames == min(3000, int(ref_mask.sum(-1).max()) + 2)
        assert not ref_mask[:, n_frames:].any()
    assert ours.dtype == torch.float32 and mask.dtype == torch.bool
    assert (ours - ref[..., :n_frames]).abs().max().item() <= TOL
    assert torch.equal(mask, ref_mask[:, :n_frames])
    return ours, mask


rng = np.random.default_rng(0)
SIGNALS = {
    "tones": sine(440, 1.5) + sine(3000, 1.5, amplitude=0.2),
    "white_noise": (0.1 * rng.standard_normal(24000)).astype(np.float32),
    "silence": np.zeros(16000, dtype=np.float32),
    "beyond_unit_range": sine(440, 1.0, amplitude=3.0),  # fed as is: no clipping anywhere
    "hard_clipped": np.clip(sine(440, 1.0, amplitude=3.0), -1.0, 1.0),
}


@pytest.mark.parametrize("n_mels", N_MELS)
def test_mel_filters_equal_reference(n_mels):
    ref = mel_filter_bank(201, n_mels, 0.0, 8000.0, SAMPLE_RATE, norm="slaney", mel_scale="slaney")
    np.testing.assert_allclose(mel_filters(n_mels), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("pad_to_30s", [True, False])
@pytest.mark.parametrize("n_mels", N_MELS)
@pytest.mark.parametrize("name", list(SIGNALS))
def test_signals_match_reference(name, n_mels, pad_to_30s):
    assert_matches_reference(SIGNALS[name], n_mels, pad_to_30s)


def test_silence_sits_on_the_clamp_floor():
    feats, _ = audio_to_features(SIGNALS["silence"], n_mels=80)
    # log10(1e-10) = -10, rescaled: (-10 + 4) / 4
    assert torch.all(feats == -1.5)


@pytest.mark.parametrize("n_samples", [11200, 11200 + 37])  # 0.7 s, and not a multiple of the hop
@pytest.mark.parametrize("pad_to_30s", [True, False])
def test_short_clip(n_samples, pad_to_30s):
    feats, mask = assert_matches_reference(SIGNALS["white_noise"][:n_samples], 80, pad_to_30s)
    # the reference's mask is the sample mask read every HOP_LENGTH samples: ceil, not floor
    assert int(mask.sum()) == math.ceil(n_samples / HOP_LENGTH)
    assert feats.shape[-1] == (N_FRAMES if pad_to_30s else math.ceil(n_samples / HOP_LENGTH) + 2)


def test_click_at_the_end_sets_the_floor_from_a_padded_frame():
    """A click in the last samples is loudest in the first frame past the clip, which the
    reference includes in its max; computing the floor from valid frames only would fail here."""
    clip = sine(440, 0.5, amplitude=1e-3)  # quiet, so most mel bins sit on the max - 8 floor
    clip[-3:] = 1.0
    n_valid = 8000 // HOP_LENGTH
    ref, _ = reference(clip, 80)
    # the premise: the padded frame is the loudest, and its max - 8 (2 in feature units) is the
    # floor of the valid frames
    peak = ref[0, :, n_valid].max()
    assert peak > ref[0, :, :n_valid].max() + 0.1
    assert abs(ref[0, :, :n_valid].min() - (peak - 2.0)) < 1e-5
    assert_matches_reference(clip, 80, pad_to_30s=False)
    # and the clip's own STFT (reflect-padded at its end, no appended silence) does differ
    assert (log_mel_spectrogram(clip, 80) - ref[0, :, :n_valid]).abs().max() > 0.1


@pytest.mark.parametrize("pad_to_30s", [True, False])
@pytest.mark.parametrize("n_mels", N_MELS)
def test_batch_of_different_lengths(n_mels, pad_to_30s):
    clips = [SIGNALS["white_noise"][:5000], SIGNALS["tones"],
             torch.from_numpy(SIGNALS["tones"][:123]), SIGNALS["hard_clipped"]]
    _, mask = assert_matches_reference(clips, n_mels, pad_to_30s)
    assert mask.sum(-1).tolist() == [math.ceil(len(c) / HOP_LENGTH) for c in clips]


def test_clips_near_30_seconds_match_reference():
    # within N_FFT // 2 of 30 s the reference's reflect padding mirrors real samples
    clips = [SIGNALS["white_noise"][:200], np.resize(SIGNALS["tones"], N_SAMPLES - 100),
             np.resize(SIGNALS["white_noise"], N_SAMPLES)]
    assert_matches_reference(clips, 80, pad_to_30s=False)


def test_clip_longer_than_30s_is_truncated_with_warning():
    long_clip = np.resize(SIGNALS["tones"], N_SAMPLES + 8000)  # 30.5 s
    clips = [SIGNALS["tones"], long_clip]
    with pytest.warns(UserWarning, match=r"clip 1 is 30\.50 s long; truncating"):
        feats, mask = audio_to_features(clips, n_mels=80)
    ref, ref_mask = reference(clips, 80)  # the reference truncates silently
    assert feats.shape[-1] == N_FRAMES
    assert (feats - ref).abs().max().item() <= TOL and torch.equal(mask, ref_mask)


@pytest.mark.parametrize("orig_sr", [44100, 48000, 22050, 8000])
def test_resampled_sine_keeps_its_frequency(orig_sr):
    # the reference is the analytic sine sampled at 16 kHz directly
    ours = resample(torch.from_numpy(sine(1000, 1.0, sr=orig_sr)), orig_sr, SAMPLE_RATE)
    expected = sine(1000, 1.0)
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    edge = 100  # the zero-padded ends of the signal ring through the filter
    assert np.abs(ours.numpy() - expected)[edge:-edge].max() < 1e-3


def test_resampler_removes_content_above_the_new_nyquist():
    ours = resample(torch.from_numpy(sine(10000, 1.0, sr=44100, amplitude=1.0)), 44100, SAMPLE_RATE)
    assert ours[100:-100].pow(2).mean().sqrt() < 0.01  # a 10 kHz tone would alias to 6 kHz


# ---- per-clip features: a clip's share of a batch does not depend on the batch ----------------


def batched_log_mel(clips, n_mels, pad_to_30s):
    """The batch computed as one tensor, as audio_to_features did before per-clip features: every
    waveform zero-padded to HOP_LENGTH * (T + 2) samples, one STFT, the first T frames."""
    clips = [torch.as_tensor(c, dtype=torch.float32) for c in clips]
    valid = torch.tensor([math.ceil(len(c) / HOP_LENGTH) for c in clips])
    n_frames = N_FRAMES if pad_to_30s else min(N_FRAMES, int(valid.max()) + 2)
    waveforms = torch.zeros(len(clips), min(N_SAMPLES, HOP_LENGTH * (n_frames + 2)))
    for i, clip in enumerate(clips):
        waveforms[i, : len(clip)] = clip
    mask = torch.arange(n_frames)[None, :] < valid[:, None]
    return log_mel_spectrogram(waveforms, n_mels)[..., :n_frames], mask


def mixed_clips(seed):
    """Lengths from 1 sample to 30 s, loud and quiet (a quiet clip's floor is the clamp, -10)."""
    rng = np.random.default_rng(seed)
    lengths = [1, 159, 160, 161, 4321, int(rng.integers(1, 50000)), N_SAMPLES - int(rng.integers(0, 400)), N_SAMPLES]
    rng.shuffle(lengths)
    clips = [(rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 0.5)).astype(np.float32) for n in lengths]
    clips[0][:] = 0.0  # pure silence
    return clips


# A clip's own waveform is shorter than the batch's, so the mel matmul (n_mels, 201) @ (201, T)
# runs at another width T, and BLAS picks its kernel, hence the order it sums the 201 bins in, by
# shape: on some CPUs (an AMD EPYC) a value moves by an ulp or two. The bins are non-negative, so
# two orders of the sum differ by at most 2 * 200 eps relatively; log10 and the / 4 rescale turn
# that into at most 400 eps / (4 ln 10) < 44 eps absolute, plus a rounding of the log10 (|x| <= 10)
# and of the rescale on each side: under 64 eps. A wrong floor, fill or padding moves values by
# 1e-3 or more.
LOG_MEL_ATOL = 64 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("pad_to_30s", [False, True])
@pytest.mark.parametrize("n_mels", N_MELS)
def test_per_clip_features_assemble_into_the_batched_log_mel(n_mels, pad_to_30s):
    clips = mixed_clips(seed=n_mels)
    for batch in (clips, clips[:3], clips[3:6], clips[5:]):  # several batches, several longest clips
        expected, expected_mask = batched_log_mel(batch, n_mels, pad_to_30s)
        features, mask = pad_clip_features([clip_features(c, n_mels) for c in batch], pad_to_30s)
        torch.testing.assert_close(features, expected, rtol=0, atol=LOG_MEL_ATOL)
        assert torch.equal(mask, expected_mask)
        # audio_to_features is pad_clip_features of clip_features, the same kernels on the same
        # shapes: the same bits
        assert torch.equal(audio_to_features(batch, n_mels, pad_to_30s)[0], features)


def test_clip_features_hold_the_valid_frames_plus_two_and_the_silence_value():
    clip = SIGNALS["tones"][:4321]  # 27 hops and 1 sample: 28 valid frames
    out = clip_features(clip, 80)
    assert out.valid_frames == 28 and out.features.shape == (80, 30) and out.features.dtype == torch.float32
    # the fill is the floor of this clip: its loudest feature value minus 2 (8 log10 units / 4)
    assert abs(out.fill - (out.features.max().item() - 2.0)) < 1e-5
    quiet = clip_features(1e-6 * clip, 80)
    assert quiet.fill == -1.5  # its peak - 8 lies below the clamp floor, so silence stays at -10
    assert clip_features(np.resize(clip, N_SAMPLES), 80).features.shape == (80, N_FRAMES)
    with pytest.raises(ValueError, match="1 to 480000 samples"):
        clip_features(np.zeros(N_SAMPLES + 1, dtype=np.float32), 80)


def test_mel_filters_are_built_once_per_setting():
    assert _mel_filters_float32(80) is _mel_filters_float32(80)
    assert _mel_filters_float32(128).shape == (201, 128)
    np.testing.assert_array_equal(_mel_filters_float32(80).numpy(), mel_filters(80).astype(np.float32))


def test_stereo_44k_wav_is_downmixed_and_resampled(tmp_path):
    path = tmp_path / "stereo.wav"
    left, right = sine(1000, 2.0, sr=44100), 0.5 * sine(1000, 2.0, sr=44100)
    sf.write(path, np.stack([left, right], axis=1), 44100, subtype="FLOAT")
    audio = load_audio(path)
    expected = 0.75 * sine(1000, 2.0)  # mean of the channels, generated directly at 16 kHz
    assert audio.shape == expected.shape and audio.dtype == torch.float32
    assert np.abs(audio.numpy() - expected)[100:-100].max() < 1e-3
    # features of our resampled file against the reference fed the analytic 16 kHz sine: inside
    # the clip they agree to ~1e-4; the first and last two frames differ because the resampling
    # filter sees the silence before and after the file, which the analytic sine lacks
    feats, mask = audio_to_features(str(path), n_mels=128)
    ref, ref_mask = reference(expected, 128)
    inner = slice(2, int(mask.sum()) - 2)
    assert torch.equal(mask, ref_mask[:, : feats.shape[-1]])
    assert (feats[..., inner] - ref[..., inner]).abs().max().item() < 1e-3


# FLAC is lossless up to 16-bit rounding; Vorbis is lossy (~4% rms error on this tone)
@pytest.mark.parametrize("fmt,subtype,rel_rms", [("FLAC", "PCM_16", 1e-4), ("OGG", "VORBIS", 0.1)])
def test_flac_and_ogg_decode(tmp_path, fmt, subtype, rel_rms):
    path = tmp_path / f"clip.{fmt.lower()}"
    clip = sine(1000, 1.0)
    sf.write(path, clip, SAMPLE_RATE, format=fmt, subtype=subtype)
    audio = load_audio(path)
    assert audio.dtype == torch.float32 and audio.dim() == 1 and len(audio) == len(clip)
    error = (audio.numpy() - clip)[100:-100]
    assert np.sqrt((error**2).mean() / (clip**2).mean()) <= rel_rms
    assert np.abs(np.fft.rfft(audio.numpy())).argmax() == 1000  # 1 s clip: bin k is k Hz
    # a path and its decoded samples give the same features, mixed in one batch
    feats, _ = audio_to_features([path, audio], n_mels=80)
    assert torch.equal(feats[0], feats[1])


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.wav"
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        load_audio(path)
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        audio_to_features([SIGNALS["tones"], str(path)])


def test_empty_file_names_the_path(tmp_path):
    path = tmp_path / "blank.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioDecodeError, match=r"blank\.wav' is empty \(0 bytes\)"):
        load_audio(path)


def test_zero_sample_file_names_the_path(tmp_path):
    path = tmp_path / "zero.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), SAMPLE_RATE)  # a 44-byte header, no frames
    with pytest.raises(AudioDecodeError, match=r"zero\.wav.*0 samples"):
        load_audio(path)


def test_garbage_bytes_name_the_path(tmp_path):
    path = tmp_path / "garbage.ogg"
    path.write_bytes(np.random.default_rng(2).bytes(4096))
    with pytest.raises(AudioDecodeError, match=r"garbage\.ogg"):
        load_audio(path)
    assert issubclass(AudioDecodeError, ValueError)


def test_empty_or_multichannel_array_names_the_clip():
    with pytest.raises(ValueError, match="clip 1 has 0 samples"):
        audio_to_features([SIGNALS["tones"], np.zeros(0, dtype=np.float32)])
    with pytest.raises(ValueError, match=r"clip 0: expected 1-D mono.*\(2, 100\)"):
        audio_to_features(np.zeros((2, 100), dtype=np.float32))
