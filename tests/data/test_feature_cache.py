"""data/feature_cache.py through AudioTextDataset: hits, misses, invalidation (file, setting,
front-end version), damaged entries (recomputed, rewritten, reported, never used), several
DataLoader workers and processes writing the same entries, and no entry for bad audio. The
reference is always the uncached dataset (no cache object), compared bit for bit."""

import functools
import json
import multiprocessing
import os

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader

import data.feature_cache as feature_cache
from data.audio_text import AudioTextDataset, BadAudioError, Skipped, collate_audio_text
from data.feature_cache import DamagedEntry, FeatureCache, file_key, read_entry
from data.manifest import read_manifest
from models.audio import SAMPLE_RATE, ClipFeatures, audio_to_features
from tests.conftest import tone

N_MELS = 80
LENGTHS = [1600, 2345, 4000, 801]


def write_clips(folder, names=None):
    names = names or [f"clip{k}.wav" for k in range(len(LENGTHS))]
    for k, n in enumerate(LENGTHS):
        sf.write(folder / f"clip{k}.wav", tone(n, 200.0 + 100 * k), SAMPLE_RATE)
    manifest = folder / "m.jsonl"
    manifest.write_text("".join(json.dumps({"audio": name, "text": f"caption {k}"}) + "\n"
                                for k, name in enumerate(names)))
    return read_manifest(manifest)


@pytest.fixture
def clips(tmp_path):
    return write_clips(tmp_path)


def read_all(dataset):
    items = [dataset[i] for i in range(len(dataset))]
    return items, [item["cache"] for item in items]


def assert_same_features(items, reference_items):
    for item, reference in zip(items, reference_items, strict=True):
        assert torch.equal(item["features"].features, reference["features"].features)
        assert item["features"].valid_frames == reference["features"].valid_frames
        assert item["features"].fill == reference["features"].fill


def entry_of(cache, clip, n_mels=N_MELS):
    return cache.entry_path(file_key(clip.audio, n_mels))


def test_first_read_misses_then_every_read_hits_with_the_same_numbers(clips, tmp_path):
    uncached, _ = read_all(AudioTextDataset(clips, n_mels=N_MELS))
    cached = AudioTextDataset(clips, n_mels=N_MELS, feature_cache=FeatureCache(tmp_path / "cache"))
    first, statuses = read_all(cached)
    assert statuses == ["miss"] * 4
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 4
    second, statuses = read_all(cached)
    assert statuses == ["hit"] * 4
    assert_same_features(first, uncached)
    assert_same_features(second, uncached)
    # another run (a new cache object on the same folder) reads the same entries
    again, statuses = read_all(AudioTextDataset(clips, n_mels=N_MELS, feature_cache=FeatureCache(tmp_path / "cache")))
    assert statuses == ["hit"] * 4
    # the padding mode is not part of the key: one entry serves both modes exactly
    for pad_to_30s in (False, True):
        batch = collate_audio_text(again, n_mels=N_MELS, pad_to_30s=pad_to_30s)
        expected, mask = audio_to_features([clip.audio for clip in clips], N_MELS, pad_to_30s=pad_to_30s)
        assert torch.equal(batch["features"], expected) and torch.equal(batch["frame_mask"], mask)
        assert batch["cache"] == {"hit": 4, "miss": 0, "recomputed": 0}


@pytest.mark.parametrize("change", ["size", "mtime"])
def test_a_changed_file_is_a_miss_and_gets_its_new_features(clips, tmp_path, change):
    cache = FeatureCache(tmp_path / "cache")
    dataset = AudioTextDataset(clips, n_mels=N_MELS, feature_cache=cache)
    read_all(dataset)
    path = clips[1].audio
    stat = os.stat(path)
    if change == "size":
        sf.write(path, tone(3000, 1234.0), SAMPLE_RATE)
    else:  # same length, new samples, and a new modification time
        sf.write(path, tone(LENGTHS[1], 1234.0), SAMPLE_RATE)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
        assert os.stat(path).st_size == stat.st_size
    items, statuses = read_all(dataset)
    assert statuses == ["hit", "miss", "hit", "hit"]
    assert_same_features(items, read_all(AudioTextDataset(clips, n_mels=N_MELS))[0])


def test_another_setting_or_front_end_version_is_a_miss(clips, tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path / "cache")
    read_all(AudioTextDataset(clips, n_mels=N_MELS, feature_cache=cache))
    items, statuses = read_all(AudioTextDataset(clips, n_mels=128, feature_cache=cache))
    assert statuses == ["miss"] * 4 and items[0]["features"].features.shape[0] == 128
    assert read_all(AudioTextDataset(clips, n_mels=N_MELS, feature_cache=cache))[1] == ["hit"] * 4
    monkeypatch.setattr(feature_cache, "FRONTEND_VERSION", feature_cache.FRONTEND_VERSION + 1)
    assert read_all(AudioTextDataset(clips, n_mels=N_MELS, feature_cache=cache))[1] == ["miss"] * 4


def truncate(entry, other):
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])


def flip_a_bit(entry, other):
    data = bytearray(entry.read_bytes())
    data[-5] ^= 0x01  # inside the tensor data, after the header
    entry.write_bytes(bytes(data))


def another_clips_entry(entry, other):
    entry.write_bytes(other.read_bytes())  # sound in itself, but written for another key


DAMAGE = {
    "truncated": (truncate, "unreadable"),
    "bit flip": (flip_a_bit, "checksum mismatch"),
    "another clip's entry": (another_clips_entry, "it holds the key"),
    "garbage": (lambda entry, other: entry.write_bytes(b"\x00" * 100), "unreadable"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_entry_is_recomputed_rewritten_and_reported(clips, tmp_path, damage):
    cache = FeatureCache(tmp_path / "cache")
    dataset = AudioTextDataset(clips, n_mels=N_MELS, feature_cache=cache)
    read_all(dataset)
    damage_entry, reason = DAMAGE[damage]
    damage_entry(entry_of(cache, clips[2]), entry_of(cache, clips[0]))
    with pytest.raises(DamagedEntry, match=reason):
        read_entry(entry_of(cache, clips[2]), file_key(clips[2].audio, N_MELS))
    with pytest.warns(UserWarning, match=rf"clip2\.wav is damaged \({reason}.*recomputing"):
        items, statuses = read_all(dataset)
    assert statuses == ["hit", "hit", "recomputed", "hit"]
    uncached = read_all(AudioTextDataset(clips, n_mels=N_MELS))[0]
    assert_same_features(items, uncached)  # the damaged bytes were never used
    assert read_all(dataset)[1] == ["hit"] * 4  # and the entry was rewritten
    batch = collate_audio_text(items, n_mels=N_MELS)
    assert batch["cache"] == {"hit": 3, "miss": 0, "recomputed": 1}


def test_an_entry_whose_shape_its_metadata_does_not_explain_is_recomputed(clips, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    dataset = AudioTextDataset(clips, n_mels=N_MELS, feature_cache=cache)
    good = dataset[0]["features"]
    key = file_key(clips[0].audio, N_MELS)
    short = ClipFeatures(good.features[:, :-1].contiguous(), good.valid_frames, good.fill)
    cache._write(entry_of(cache, clips[0]), key, short)  # its checksum matches its own data
    with pytest.raises(DamagedEntry, match=r"expected float32 \(80, 12\)"):
        read_entry(entry_of(cache, clips[0]), key)
    with pytest.warns(UserWarning, match="recomputing"):
        item = dataset[0]
    assert item["cache"] == "recomputed" and torch.equal(item["features"].features, good.features)


def test_two_workers_reading_the_same_clips_twice(clips, tmp_path):
    """Each clip twice in a row, batch size 1: the two workers decode and write the same entry at
    the same time. Every item is counted once, nothing is damaged, the numbers are the uncached."""
    twice = [clip for clip in clips for _ in range(2)]
    dataset = AudioTextDataset(twice, n_mels=N_MELS, feature_cache=FeatureCache(tmp_path / "cache"))
    loader = DataLoader(dataset, batch_size=1, num_workers=2,
                        collate_fn=functools.partial(collate_audio_text, n_mels=N_MELS))
    # the entries are computed in the workers, which run torch on one thread; BLAS may split a matmul
    # otherwise on several, so the reference is computed on one thread too: the same kernels, the same bits
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = [audio_to_features(clip.audio, N_MELS)[0] for clip in clips]
    finally:
        torch.set_num_threads(threads)
    for epoch in range(2):
        batches = list(loader)
        counts = {status: sum(b["cache"][status] for b in batches) for status in ("hit", "miss", "recomputed")}
        assert sum(counts.values()) == len(twice) and counts["recomputed"] == 0
        if epoch == 0:
            assert counts["miss"] >= len(clips)
        else:
            assert counts["hit"] == len(twice)
        for i, batch in enumerate(batches):
            assert batch["index"].tolist() == [i] and torch.equal(batch["features"], reference[i // 2])
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == len(clips)
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # every temporary file was renamed


def _write_many(root, path, n_mels, features, times):
    cache = FeatureCache(root)
    key = file_key(path, n_mels)
    for _ in range(times):
        cache._write(cache.entry_path(key), key, features)


def test_processes_rewriting_an_entry_never_expose_a_partial_one(clips, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    item = AudioTextDataset(clips, n_mels=N_MELS, feature_cache=cache)[0]
    key, entry = file_key(clips[0].audio, N_MELS), entry_of(cache, clips[0])
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_write_many,
                               args=(tmp_path / "cache", clips[0].audio, N_MELS, item["features"], 60))
               for _ in range(2)]
    for writer in writers:
        writer.start()
    reads = 0
    while any(writer.is_alive() for writer in writers) or reads == 0:
        assert torch.equal(read_entry(entry, key).features, item["features"].features)  # never DamagedEntry
        reads += 1
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_bad_audio_is_never_written_to_the_cache(tmp_path):
    audio = tone(1600, 440.0)
    audio[10] = np.nan
    sf.write(tmp_path / "nan.wav", audio, SAMPLE_RATE, subtype="FLOAT")
    sf.write(tmp_path / "short.wav", tone(100, 440.0), SAMPLE_RATE)
    (tmp_path / "garbage.wav").write_bytes(b"not audio" * 20)
    names = ["nan.wav", "short.wav", "garbage.wav", "missing.wav"]
    bad = write_clips(tmp_path, names)
    cache = FeatureCache(tmp_path / "cache")
    skipping = AudioTextDataset(bad, on_bad_audio="skip", n_mels=N_MELS, feature_cache=cache)
    for _ in range(2):  # the verdict is not cached either: each read decodes and skips again
        assert all(isinstance(skipping[i], Skipped) for i in range(len(bad)))
    failing = AudioTextDataset(bad, n_mels=N_MELS, feature_cache=cache)
    for i, reason in enumerate(["non-finite", "too short", "cannot decode", "not found"]):
        with pytest.raises(BadAudioError, match=reason):
            failing[i]
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_an_unwritable_cache_warns_once_and_still_gives_the_features(clips, tmp_path):
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    dataset = AudioTextDataset(clips, n_mels=N_MELS, feature_cache=FeatureCache(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="cannot write to the feature cache") as warned:
        items, statuses = read_all(dataset)
    assert len([w for w in warned if "cannot write" in str(w.message)]) == 1
    assert statuses == ["miss"] * 4
    assert_same_features(items, read_all(AudioTextDataset(clips, n_mels=N_MELS))[0])
