"""The offline demo's data: synthetic sound events with compositional captions, made with numpy.

With no model or data flags, train.py calls `ensure_demo_set(cache_dir)` and trains on what it
returns. A clip is one or two *segments* played in order; a segment is a group of tones, a
frequency sweep (chirp), a noise burst, a click train, or silence. Every caption names every
attribute of every segment (count, length, pitch, direction, loudness, noise colour, click rate,
order), so a caption is true of its own clip and false of any clip that differs in one attribute.
Clips come in minimal pairs: the second clip of each pair differs from the first in exactly one
attribute or in the order of its segments, so recall rises only if the model hears those
differences, not merely which kind of sound is present. Eval clips have distinct descriptions.

Caption grammar (each clip gets 3-5 distinct paraphrases, drawn from the synonym tables below):
    caption  := segment | segment CONNECTOR segment | segment "after" segment  (order reversed)
    tones    := COUNT LENGTH PITCH NOUN[s]   "three short high beeps", "a single long deep hum"
    chirp    := "a rising chirp" | "a downward sweep" | ...
    noise    := "a LOUDNESS burst of white noise" | "a LOUDNESS hiss" | "a LOUDNESS rush of pink noise"
    clicks   := "slow clicks" | "rapid clicking" | ...        silence := "silence" | "a pause" | ...
"""

import json
from pathlib import Path

import numpy as np
import soundfile as sf

from common.atomic import build_directory_once
from models.audio import SAMPLE_RATE

VERSION = 1  # bump when anything below changes what is generated, so cached sets are rebuilt
N_TRAIN = 512  # ~1.7 s each, 15 min of audio: tens of epochs of a tiny model in a few CPU minutes
N_EVAL = 96  # recall@1 over 96 clips has 1% chance level, so a learned model stands out
MIN_SECONDS, MAX_SECONDS = 1.0, 4.0
EDGE_SECONDS = 0.1  # noise floor kept before the first and after the last segment
NOISE_FLOOR_RMS = 0.003  # about -50 dBFS: no clip is digital silence
DEMO_SEED = 0  # the demo is one fixed data set: a run's --seed is the training's randomness only

COUNT_WORDS = {1: ("a", "one", "a single"), 2: ("two", "a pair of"), 3: ("three", "a series of three")}
LENGTH_WORDS = {"short": ("short", "brief"), "long": ("long", "sustained")}
PITCH_WORDS = {"high": ("high", "high-pitched"), "low": ("low", "low-pitched", "deep")}
TONE_NOUNS = {("short", "high"): ("beep", "pip", "tone"), ("short", "low"): ("beep", "pip", "tone"),
              ("long", "high"): ("tone", "note", "whistle"), ("long", "low"): ("tone", "note", "hum")}
CHIRP_PHRASES = {"rising": ("a rising chirp", "an upward sweep", "a rising sweep", "a chirp sweeping up",
                            "a chirp rising in pitch"),
                 "falling": ("a falling chirp", "a downward sweep", "a falling sweep", "a chirp sweeping down",
                             "a chirp falling in pitch")}
LOUDNESS_WORDS = {"loud": ("loud", "strong"), "quiet": ("quiet", "faint", "soft")}
NOISE_PHRASES = {"white": ("a {} burst of white noise", "a {} hiss", "a {} burst of static"),
                 "pink": ("a {} burst of pink noise", "a {} rush of pink noise",
                          "a {} muffled noise burst")}
CLICK_PHRASES = {"slow": ("slow clicks", "slow clicking", "a slow click train", "slow ticking",
                          "a slow series of clicks"),
                 "fast": ("fast clicks", "rapid clicking", "a fast click train", "quick ticking",
                          "a fast series of clicks")}
SILENCE_PHRASES = ("silence", "a pause", "a moment of silence", "a gap of silence")
CONNECTORS = ("{} then {}", "{}, then {}", "{} followed by {}", "{} and after that {}")

# the attributes of each segment kind and their values; `mutate` flips exactly one of them
ATTRIBUTES = {"tones": {"count": (1, 2, 3), "length": ("short", "long"), "pitch": ("high", "low")},
              "chirp": {"direction": ("rising", "falling")},
              "noise": {"colour": ("white", "pink"), "loudness": ("quiet", "loud")},
              "clicks": {"rate": ("slow", "fast")},
              "silence": {}}


def pick(rng, options):
    return options[rng.integers(len(options))]  # a plain Python value, unlike rng.choice


def sample_segment(rng):
    kind = pick(rng, ("tones", "tones", "tones", "chirp", "noise", "noise", "clicks"))
    return {"kind": kind, **{name: pick(rng, values) for name, values in ATTRIBUTES[kind].items()}}


def sample_clip(rng):
    """A clip's description: a list of one (30%) or two segments, at most one of them silence."""
    if rng.random() < 0.3:  # a single segment is never silence
        return [sample_segment(rng)]
    segments = [sample_segment(rng), sample_segment(rng)]
    if rng.random() < 0.2:
        segments[rng.integers(2)] = {"kind": "silence"}
    return segments


def mutate(segments, rng):
    """A copy of `segments` that differs in exactly one attribute, or in the order of two
    different segments: the other half of a minimal pair."""
    choices = [(i, name) for i, s in enumerate(segments) for name in ATTRIBUTES[s["kind"]]]
    if len(segments) == 2 and segments[0] != segments[1]:
        choices.append((None, "order"))
    i, name = pick(rng, choices)
    if name == "order":
        return segments[::-1]
    changed = [dict(s) for s in segments]
    changed[i][name] = pick(rng, [v for v in ATTRIBUTES[segments[i]["kind"]][name] if v != segments[i][name]])
    return changed


def describe_segment(segment, rng):
    kind = segment["kind"]
    if kind == "tones":
        count, length, pitch = segment["count"], segment["length"], segment["pitch"]
        noun = pick(rng, TONE_NOUNS[length, pitch]) + ("s" if count > 1 else "")
        return " ".join([pick(rng, COUNT_WORDS[count]), pick(rng, LENGTH_WORDS[length]),
                         pick(rng, PITCH_WORDS[pitch]), noun])
    if kind == "chirp":
        return pick(rng, CHIRP_PHRASES[segment["direction"]])
    if kind == "noise":
        return pick(rng, NOISE_PHRASES[segment["colour"]]).format(pick(rng, LOUDNESS_WORDS[segment["loudness"]]))
    if kind == "clicks":
        return pick(rng, CLICK_PHRASES[segment["rate"]])
    return pick(rng, SILENCE_PHRASES)


def describe(segments, rng, n_captions):
    """`n_captions` distinct captions, each naming every attribute of every segment."""
    captions = []
    for _ in range(100 * n_captions):  # the synonym tables give every clip well over 5 phrasings
        phrases = [describe_segment(s, rng) for s in segments]
        if len(phrases) == 1:
            caption = phrases[0]
        elif rng.random() < 0.2:  # "B after A": the order is in the grammar, not in word order
            caption = f"{phrases[1]} after {phrases[0]}"
        else:
            caption = pick(rng, CONNECTORS).format(*phrases)
        if caption not in captions:
            captions.append(caption)
        if len(captions) == n_captions:
            return captions
    raise AssertionError(f"only {len(captions)} distinct captions for {segments}")


def ramp(n_samples, ramp_seconds):
    """A raised-cosine fade in and out, so no event starts with a click of its own."""
    n_ramp = min(int(ramp_seconds * SAMPLE_RATE), n_samples // 2)
    envelope = np.ones(n_samples)
    fade = 0.5 - 0.5 * np.cos(np.pi * np.arange(n_ramp) / n_ramp)
    envelope[:n_ramp], envelope[n_samples - n_ramp:] = fade, fade[::-1]
    return envelope


def sample_times(rng, low, high):
    """The sample times (s) of an event lasting between `low` and `high` seconds."""
    return np.arange(int(rng.uniform(low, high) * SAMPLE_RATE)) / SAMPLE_RATE


def render_segment(segment, rng):
    """One segment as float64 samples; durations, frequencies and levels are jittered."""
    kind = segment["kind"]
    if kind == "tones":  # one frequency per group: high 1.5-2.5 kHz, low 200-400 Hz
        freq = rng.uniform(1500, 2500) if segment["pitch"] == "high" else rng.uniform(200, 400)
        pieces = []
        for k in range(segment["count"]):
            t = sample_times(rng, 0.12, 0.18) if segment["length"] == "short" else sample_times(rng, 0.5, 0.65)
            gap = np.zeros(int(rng.uniform(0.1, 0.15) * SAMPLE_RATE)) if k else np.zeros(0)
            pieces += [gap, 0.3 * rng.uniform(0.85, 1.15) * np.sin(2 * np.pi * freq * t) * ramp(len(t), 0.01)]
        return np.concatenate(pieces)
    if kind == "chirp":  # exponential sweep between ~300 Hz and ~3 kHz over 0.4-0.6 s
        t = sample_times(rng, 0.4, 0.6)
        f0, f1 = rng.uniform(270, 330), rng.uniform(2700, 3300)
        if segment["direction"] == "falling":
            f0, f1 = f1, f0
        duration, k = len(t) / SAMPLE_RATE, np.log(f1 / f0)
        phase = 2 * np.pi * f0 * duration / k * (np.exp(k * t / duration) - 1)  # integral of f(t)
        return 0.3 * rng.uniform(0.85, 1.15) * np.sin(phase) * ramp(len(t), 0.01)
    if kind == "noise":
        noise = rng.standard_normal(n := len(sample_times(rng, 0.4, 0.7)))
        if segment["colour"] == "pink":  # power ~ 1/f: scale the spectrum's amplitude by 1/sqrt(f)
            spectrum = np.fft.rfft(noise)
            spectrum[1:] /= np.sqrt(np.arange(1, len(spectrum)))
            noise = np.fft.irfft(spectrum, n)
        level = 0.15 if segment["loudness"] == "loud" else 0.015  # RMS, 20 dB apart; loud peaks < 1
        return level * rng.uniform(0.85, 1.15) * noise / noise.std() * ramp(n, 0.02)
    if kind == "clicks":  # a 3 ms decaying noise tick, 4-5 or 14-18 times a second
        train = np.zeros(len(sample_times(rng, 0.7, 0.9)))
        interval = int(SAMPLE_RATE / (rng.uniform(4, 5) if segment["rate"] == "slow" else rng.uniform(14, 18)))
        tick = np.exp(-np.arange(48) / 8.0)
        for start in range(0, len(train) - len(tick), interval):
            noise = rng.standard_normal(len(tick))
            train[start:start + len(tick)] = 0.5 * rng.uniform(0.85, 1.15) * noise / np.abs(noise).max() * tick
        return train
    return np.zeros(len(sample_times(rng, 0.9, 1.1)))  # longer than any gap, so it is heard as silence


def render_clip(segments, rng):
    """The clip's float32 waveform at SAMPLE_RATE: segments 0.25-0.35 s apart (more than the
    gaps inside a group of tones, so "two beeps then a beep" is not heard as three), centred in
    at least MIN_SECONDS of noise floor (centred, so padding never sounds like a silence segment)."""
    content = render_segment(segments[0], rng)
    for segment in segments[1:]:
        content = np.concatenate([content, np.zeros(int(rng.uniform(0.25, 0.35) * SAMPLE_RATE)),
                                  render_segment(segment, rng)])
    n = max(int(MIN_SECONDS * SAMPLE_RATE), len(content) + 2 * int(EDGE_SECONDS * SAMPLE_RATE))
    audio = NOISE_FLOOR_RMS * rng.uniform(0.7, 1.3) * rng.standard_normal(n)
    start = (n - len(content)) // 2
    audio[start:start + len(content)] += content
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def sample_split(n_clips, rng, distinct):
    """(segments, waveform) for `n_clips` clips in minimal pairs; all descriptions are different
    when `distinct` (eval), so a caption never names two eval clips equally well."""
    clips, seen, draws = [], set(), 0
    while len(clips) < n_clips:
        draws += 1
        if draws > 50 * n_clips + 1000:  # about 460 descriptions exist: n_clips may exceed them
            raise ValueError(f"cannot draw {n_clips} clips with distinct descriptions; ask for fewer")
        base = sample_clip(rng)
        group = [base, mutate(base, rng)] if n_clips - len(clips) >= 2 else [base]
        keys = [json.dumps(segments) for segments in group]
        repeated = any(len(segments) == 2 and segments[0] == segments[1] for segments in group)
        if repeated or distinct and (seen.intersection(keys) or len(set(keys)) < len(keys)):
            continue  # a repeated segment ("two beeps then two beeps") sounds like one group
        audio = [render_clip(segments, rng) for segments in group]
        if max(len(a) for a in audio) > MAX_SECONDS * SAMPLE_RATE:
            continue  # e.g. two groups of three long tones; redraw the pair
        seen.update(keys)
        clips += list(zip(group, audio))
    return clips


def output_paths(out_dir):
    out_dir = Path(out_dir)
    return {"dir": out_dir, "train": out_dir / "train.jsonl", "eval": out_dir / "eval.jsonl",
            "captions": out_dir / "captions.txt", "done": out_dir / "DONE.json"}


def generate_demo_set(out_dir, n_train=N_TRAIN, n_eval=N_EVAL, seed=DEMO_SEED, verbose=True):
    """Write audio/*.wav (16-bit PCM, 16 kHz mono), train.jsonl, eval.jsonl and captions.txt into the
    new or empty folder `out_dir`; return the paths and the set's description (DONE.json's fields,
    which ensure_demo_set writes once every file is there). The same seed gives byte-identical files."""
    if n_train < 1 or n_eval < 1:
        raise ValueError(f"n_train and n_eval must be at least 1, got {n_train} and {n_eval}")
    paths = output_paths(out_dir)
    paths["dir"].mkdir(parents=True, exist_ok=True)
    if any(paths["dir"].iterdir()):  # never mixed with an older set's files
        raise ValueError(f"{paths['dir']} is not empty: generate_demo_set writes a new set, "
                         "ensure_demo_set replaces one")
    (paths["dir"] / "audio").mkdir()

    all_captions, n_samples = [], 0
    for split_id, (split, n_clips) in enumerate([("train", n_train), ("eval", n_eval)]):
        rng = np.random.default_rng([seed, split_id])  # eval does not change when n_train does
        lines = []
        for index, (segments, audio) in enumerate(sample_split(n_clips, rng, distinct=split == "eval")):
            relative = f"audio/{split}_{index:04d}.wav"
            sf.write(paths["dir"] / relative, audio, SAMPLE_RATE, subtype="PCM_16")
            captions = describe(segments, rng, n_captions=int(rng.integers(3, 6)))
            lines.append(json.dumps({"audio": relative, "captions": captions}) + "\n")
            all_captions += captions
            n_samples += len(audio)
        paths[split].write_text("".join(lines), encoding="utf-8")
    # eval captions too: the vocabulary is closed, and a demo tokenizer must not map them to [UNK]
    paths["captions"].write_text("".join(c + "\n" for c in all_captions), encoding="utf-8")

    record = {"version": VERSION, "seed": seed, "n_train": n_train, "n_eval": n_eval,
              "sample_rate": SAMPLE_RATE, "n_captions": len(all_captions),
              "audio_minutes": round(n_samples / SAMPLE_RATE / 60, 2)}
    if verbose:
        print(f"demo sounds: wrote {n_train} train + {n_eval} eval clips, {len(all_captions)} captions, "
              f"{record['audio_minutes']} min of audio, to {paths['dir']}")
    return {**{k: str(v) for k, v in paths.items()}, **record}


def ensure_demo_set(cache_dir, n_train=N_TRAIN, n_eval=N_EVAL, seed=DEMO_SEED, verbose=True):
    """The demo set in the folder `cache_dir`, built once however many processes ask at once
    (common/atomic.py build_directory_once): reused when its DONE.json records these parameters and
    this VERSION and every file it lists is whole, otherwise (missing, partial, damaged or different)
    built again from scratch. The set is fixed data: `seed` is not a run's --seed."""
    paths = output_paths(cache_dir)
    wanted = {"version": VERSION, "seed": seed, "n_train": n_train, "n_eval": n_eval}
    built = False

    def build(scratch):
        nonlocal built
        built = True
        made = generate_demo_set(scratch, n_train=n_train, n_eval=n_eval, seed=seed, verbose=False)
        if verbose:
            print(f"demo sounds: wrote {n_train} train + {n_eval} eval clips, {made['n_captions']} captions, "
                  f"{made['audio_minutes']} min of audio, to {paths['dir']}")
        return {key: made[key] for key in ("sample_rate", "n_captions", "audio_minutes")}

    record = build_directory_once(paths["dir"], wanted, build)
    if verbose and not built:
        print(f"demo sounds: reusing {n_train} train + {n_eval} eval clips in {paths['dir']}")
    return {**{k: str(v) for k, v in paths.items()}, **record}
