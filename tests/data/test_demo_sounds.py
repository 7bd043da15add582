"""The offline demo set: file format, determinism, the DONE.json cache, and captions that are
true of what the audio contains. The audio checks measure the waveform with an energy envelope
and an FFT written here, and read the captions with a grammar written here, independently of the
generator's own tables, so a clip whose caption says "three" must really hold three onsets."""

import hashlib
import json
import re

import numpy as np
import pytest
import soundfile as sf

from data import demo_sounds
from data.demo_sounds import ensure_demo_set, generate_demo_set, render_clip, describe, sample_split

SR = 16000
FRAME = 160  # 10 ms energy frames
COUNTS = {"a": 1, "one": 1, "a single": 1, "two": 2, "a pair of": 2, "three": 3, "a series of three": 3}
SINGLE_TONES = re.compile(r"(a|one|a single|two|a pair of|three|a series of three) (short|brief|long|sustained) "
                          r"(high|high-pitched|low|low-pitched|deep) (beep|pip|tone|note|whistle|hum)s?")


def frame_rms(audio):
    frames = audio[: len(audio) // FRAME * FRAME].reshape(-1, FRAME)  # (T, FRAME)
    return np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1))


def count_onsets(audio, relative_threshold=0.25):
    """Rising crossings of a threshold set relative to the loudest 10 ms frame."""
    loud = frame_rms(audio) > relative_threshold * frame_rms(audio).max()
    return int(loud[0]) + int(np.sum(loud[1:] & ~loud[:-1]))


def dominant_hz(audio):
    spectrum = np.abs(np.fft.rfft(audio.astype(np.float64)))
    return np.argmax(spectrum) * SR / len(audio)


def longest_quiet_run_seconds(audio, level=0.02):
    longest = run = 0
    for quiet in frame_rms(audio) < level:
        run = run + 1 if quiet else 0
        longest = max(longest, run)
    return longest * FRAME / SR


def tree_hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_manifest(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    generate_demo_set(root, n_train=12, n_eval=6, seed=0, verbose=False)
    return root


def test_files_decode_at_16khz_mono_and_manifests_point_at_them(small_set):
    all_captions = []
    for split, n in [("train", 12), ("eval", 6)]:
        rows = read_manifest(small_set / f"{split}.jsonl")
        assert len(rows) == n
        for row in rows:
            assert set(row) == {"audio", "captions"} and not row["audio"].startswith("/")
            data, sr = sf.read(small_set / row["audio"], dtype="float32", always_2d=True)
            assert sr == SR and data.shape[1] == 1
            assert 1.0 <= len(data) / SR <= 4.0
            assert 0.0 < np.abs(data).max() < 1.0
            assert len(set(row["captions"])) == len(row["captions"]) >= 3
            all_captions += row["captions"]
    assert (small_set / "captions.txt").read_text(encoding="utf-8").splitlines() == all_captions
    assert len(list((small_set / "audio").glob("*.wav"))) == 18
    assert not (small_set / "DONE.json").exists()  # ensure_demo_set's to write, once every file is there


def test_ensure_marks_the_set_done_last_with_every_file_and_its_size(small_set, tmp_path):
    result = ensure_demo_set(tmp_path / "set", n_train=12, n_eval=6, seed=0, verbose=False)
    done = json.loads((tmp_path / "set" / "DONE.json").read_text())
    files = done.pop("files")
    assert done == {"version": demo_sounds.VERSION, "seed": 0, "n_train": 12, "n_eval": 6, "sample_rate": SR,
                    "n_captions": len((small_set / "captions.txt").read_text().splitlines()),
                    "audio_minutes": done["audio_minutes"]}
    assert files == {name: (small_set / name).stat().st_size for name in tree_hashes(small_set)}
    hashes = tree_hashes(tmp_path / "set")
    assert hashes.pop("DONE.json") and hashes == tree_hashes(small_set)
    assert result["eval"] == str(tmp_path / "set" / "eval.jsonl") and result["n_eval"] == 6 and "files" not in result


def test_generate_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        generate_demo_set(tmp_path, n_train=2, n_eval=2, verbose=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_same_seed_gives_identical_bytes_and_another_seed_differs(small_set, tmp_path):
    generate_demo_set(tmp_path / "again", n_train=12, n_eval=6, seed=0, verbose=False)
    generate_demo_set(tmp_path / "other", n_train=12, n_eval=6, seed=1, verbose=False)
    reference = tree_hashes(small_set)
    assert tree_hashes(tmp_path / "again") == reference
    other = tree_hashes(tmp_path / "other")
    assert other.keys() == reference.keys()
    differing = [name for name in reference if other[name] != reference[name]]
    assert "train.jsonl" in differing and sum(name.endswith(".wav") for name in differing) == 18


def test_ensure_reuses_a_finished_set_without_writing(tmp_path, monkeypatch):
    ensure_demo_set(tmp_path, n_train=12, n_eval=6, seed=0, verbose=False)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}

    def must_not_run(*args, **kwargs):
        raise AssertionError("ensure_demo_set regenerated a finished set")

    monkeypatch.setattr(demo_sounds, "generate_demo_set", must_not_run)
    result = ensure_demo_set(tmp_path, n_train=12, n_eval=6, seed=0, verbose=False)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    assert result["train"] == str(tmp_path / "train.jsonl") and result["n_eval"] == 6


@pytest.mark.parametrize("damage", ["a wav deleted", "a wav truncated", "no DONE.json", "corrupt DONE.json",
                                    "old version", "other n_eval"])
def test_ensure_regenerates_a_partial_or_different_set(small_set, tmp_path, damage):
    ensure_demo_set(tmp_path, n_train=12, n_eval=6, seed=0, verbose=False)
    (tmp_path / "audio" / "stray.wav").write_bytes(b"partial")  # gone only if the whole set is rebuilt
    done, wav = tmp_path / "DONE.json", tmp_path / "audio" / "train_0003.wav"
    n_eval = 6
    if damage == "a wav deleted":
        wav.unlink()
    elif damage == "a wav truncated":  # a killed writer, or a power cut before the data reached the disk
        wav.write_bytes(wav.read_bytes()[:1000])
    elif damage == "no DONE.json":
        done.unlink()
    elif damage == "corrupt DONE.json":
        done.write_text('{"version": 1, "se')
    elif damage == "old version":
        done.write_text(json.dumps({**json.loads(done.read_text()), "version": demo_sounds.VERSION - 1}))
    else:
        n_eval = 4
    ensure_demo_set(tmp_path, n_train=12, n_eval=n_eval, seed=0, verbose=False)
    hashes = tree_hashes(tmp_path)
    assert hashes.pop("DONE.json") and "audio/stray.wav" not in hashes and "audio/train_0003.wav" in hashes
    assert json.loads(done.read_text())["n_eval"] == n_eval
    if n_eval == 6:
        assert hashes == tree_hashes(small_set)
    else:
        assert "audio/eval_0004.wav" not in hashes and len(read_manifest(tmp_path / "eval.jsonl")) == 4


def test_clips_come_in_minimal_pairs_and_eval_descriptions_are_distinct():
    clips = [segments for segments, _ in sample_split(80, np.random.default_rng(0), distinct=True)]
    assert not any(len(c) == 2 and c[0] == c[1] for c in clips)  # heard as one longer group
    differences = set()
    for a, b in zip(clips[0::2], clips[1::2]):
        if len(a) == 2 and a != b and b == a[::-1]:
            differences.add("order")
            continue
        assert [s["kind"] for s in a] == [s["kind"] for s in b]
        changed = [key for x, y in zip(a, b) for key in x if x[key] != y[key]]
        assert len(changed) == 1, (a, b)
        differences.add(changed[0])
    assert {"order", "count", "pitch", "length", "direction", "loudness", "rate"} <= differences
    assert len({json.dumps(c) for c in clips}) == 80


def test_no_caption_describes_two_eval_clips(tmp_path):
    generate_demo_set(tmp_path, n_train=2, n_eval=40, seed=0, verbose=False)
    captions = [c for row in read_manifest(tmp_path / "eval.jsonl") for c in row["captions"]]
    assert len(captions) == len(set(captions))


def test_written_tone_clips_hold_the_count_and_pitch_their_captions_name(tmp_path):
    generate_demo_set(tmp_path, n_train=48, n_eval=16, seed=0, verbose=False)
    checked, pitch_hz = 0, {"high": [], "low": []}
    for split in ("train", "eval"):
        for row in read_manifest(tmp_path / f"{split}.jsonl"):
            parsed = [SINGLE_TONES.fullmatch(c) for c in row["captions"]]
            if not all(parsed):
                continue  # not a lone group of tones
            counts = {COUNTS[m.group(1)] for m in parsed}
            pitches = {"high" if m.group(3).startswith("high") else "low" for m in parsed}
            assert len(counts) == 1 and len(pitches) == 1, row["captions"]  # paraphrases agree
            audio, _ = sf.read(tmp_path / row["audio"], dtype="float32")
            assert count_onsets(audio) == counts.pop(), row
            pitch_hz[pitches.pop()].append(dominant_hz(audio))
            checked += 1
    assert checked >= 5 and pitch_hz["high"] and pitch_hz["low"]
    assert min(pitch_hz["high"]) > 1400 and max(pitch_hz["low"]) < 450


@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize("length", ["short", "long"])
def test_tone_count_and_length_are_audible(count, length):
    segments = [{"kind": "tones", "count": count, "length": length, "pitch": "low"}]
    rng = np.random.default_rng(count)
    audio = render_clip(segments, rng)
    assert count_onsets(audio) == count
    sounding = np.sum(frame_rms(audio) > 0.25 * frame_rms(audio).max()) * FRAME / SR / count
    assert (sounding < 0.2) if length == "short" else (sounding > 0.45)
    length_words = {"short": ("short", "brief"), "long": ("long", "sustained")}[length]
    for caption in describe(segments, rng, n_captions=5):
        parsed = SINGLE_TONES.fullmatch(caption)
        assert COUNTS[parsed.group(1)] == count and parsed.group(2) in length_words, caption


def test_pitch_direction_loudness_rate_and_silence_are_audible():
    rng = np.random.default_rng(0)
    high = render_clip([{"kind": "tones", "count": 1, "length": "long", "pitch": "high"}], rng)
    low = render_clip([{"kind": "tones", "count": 1, "length": "long", "pitch": "low"}], rng)
    assert dominant_hz(high) > 1400 > 450 > dominant_hz(low)

    for direction in ("rising", "falling"):
        audio = render_clip([{"kind": "chirp", "direction": direction}], rng)
        on = np.flatnonzero(frame_rms(audio) > 0.1)  # the sweep's frames
        first, last = audio[on[0] * FRAME:(on[0] + 5) * FRAME], audio[(on[-1] - 4) * FRAME:(on[-1] + 1) * FRAME]
        assert (dominant_hz(first) < dominant_hz(last)) == (direction == "rising")

    rms = {level: frame_rms(render_clip([{"kind": "noise", "colour": "white", "loudness": level}], rng)).max()
           for level in ("quiet", "loud")}
    assert rms["loud"] > 5 * rms["quiet"]

    ticks = {rate: count_onsets(render_clip([{"kind": "clicks", "rate": rate}], rng), 0.1) for rate in ("slow", "fast")}
    assert ticks["slow"] <= 5 and ticks["fast"] >= 2 * ticks["slow"]

    chirp = {"kind": "chirp", "direction": "rising"}
    assert longest_quiet_run_seconds(render_clip([chirp, {"kind": "silence"}], rng)) > 0.85
    assert longest_quiet_run_seconds(render_clip([chirp], rng)) < 0.5


def test_captions_name_the_segments_in_the_order_they_sound():
    segments = [{"kind": "clicks", "rate": "fast"}, {"kind": "silence"}]
    loud = frame_rms(render_clip(segments, np.random.default_rng(0))) > 0.02
    assert np.flatnonzero(loud).mean() < len(loud) / 3  # the clicks come first
    for seed in range(10):
        for caption in describe(segments, np.random.default_rng(seed), n_captions=5):
            clicks_at = re.search(r"click|ticking", caption).start()
            silence_at = re.search(r"silence|pause", caption).start()
            reversed_form = re.search(r"(?<!and) after ", caption) is not None  # "B after A"
            assert (clicks_at < silence_at) != reversed_form, caption
