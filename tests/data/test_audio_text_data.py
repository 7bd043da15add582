"""data/audio_text.py: per-clip features in the dataset, per-epoch captions, the bad-audio policies
(undecodable, non-finite, too short), the collate (equal to audio_to_features, tokenizing with a
tokenizer), DataLoader workers, and the resumable batch order. The feature cache itself:
tests/data/test_feature_cache.py."""

import dataclasses
import functools
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader

from data.audio_text import (
    MIN_VALID_FRAMES,
    AudioTextDataset,
    BadAudioError,
    captions_flat,
    collate_audio_text,
    count_truncated_captions,
    min_valid_frames,
    precheck,
)
from data.sampling import GlobalBatchSampler, epoch_order
from data.manifest import read_manifest
from models.audio import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, audio_to_features, clip_features, load_audio
from models.qwen2_audio_encoder import Qwen2AudioEncoder
from models.tokenizer import load_tokenizer_files, tokenize
from tests.conftest import tone

N_MELS = 80
LENGTHS = [1600, 2345, 4000, 801]  # samples; 801 is not a whole number of hops
CAPTIONS = [f"caption {k}" for k in range(5)]


def make_manifest(tmp_path, names, bad=()):
    """Writes the good wavs, one of each bad kind, and a manifest listing `names`, 5 captions each."""
    for k, n in enumerate(LENGTHS):
        sf.write(tmp_path / f"clip{k}.wav", tone(n, 200.0 + 100 * k), SAMPLE_RATE)
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "garbage.wav").write_bytes(b"this is not audio at all" * 10)
    for name, value in (("nan.wav", np.nan), ("inf.wav", np.inf)):
        audio = tone(1600)
        audio[800] = value
        sf.write(tmp_path / name, audio, SAMPLE_RATE, subtype="FLOAT")  # a float wav keeps it
    sf.write(tmp_path / "one_sample.wav", tone(1), SAMPLE_RATE)
    sf.write(tmp_path / "20ms.wav", tone(SAMPLE_RATE // 50), SAMPLE_RATE)  # 320 samples: 2 frames
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"audio": name, "captions": CAPTIONS}) + "\n" for name in names))
    return manifest


@pytest.fixture
def good_clips(tmp_path):
    return read_manifest(make_manifest(tmp_path, [f"clip{k}.wav" for k in range(len(LENGTHS))]))


def test_items_hold_the_clip_features_and_where_they_came_from(good_clips):
    dataset = AudioTextDataset(good_clips, n_mels=N_MELS)
    item = dataset[1]
    assert item["index"] == 1 and item["line"] == 2 and item["path"] == str(good_clips[1].audio)
    expected = clip_features(load_audio(good_clips[1].audio), N_MELS)
    assert item["features"].valid_frames == math.ceil(LENGTHS[1] / HOP_LENGTH) == expected.valid_frames
    assert torch.equal(item["features"].features, expected.features) and item["features"].fill == expected.fill
    assert item["caption"] in CAPTIONS and item["cache"] is None  # no feature cache given


def test_long_clips_are_truncated_to_30_s_with_a_warning(tmp_path):
    sf.write(tmp_path / "long.wav", tone(N_SAMPLES + 3 * HOP_LENGTH), SAMPLE_RATE)
    (tmp_path / "m.jsonl").write_text('{"audio": "long.wav", "text": "long"}\n')
    dataset = AudioTextDataset(read_manifest(tmp_path / "m.jsonl"), n_mels=N_MELS)
    with pytest.warns(UserWarning, match=r"m\.jsonl:1.*truncating it to 30 s"):
        assert dataset[0]["features"].features.shape == (N_MELS, N_FRAMES)


def test_captions_depend_only_on_seed_epoch_and_index(good_clips):
    clips = good_clips * 5  # 20 clips of 5 captions each

    def captions(seed, epoch):
        dataset = AudioTextDataset(clips, seed=seed, n_mels=N_MELS)  # a fresh dataset, as after a resume
        dataset.set_epoch(epoch)
        return [dataset.caption(i) for i in range(len(clips))]

    assert captions(0, 3) == captions(0, 3)
    assert captions(0, 3) != captions(0, 4)
    assert captions(0, 3) != captions(1, 3)
    assert len({c for epoch in range(5) for c in captions(0, epoch)}) == len(CAPTIONS)
    dataset = AudioTextDataset(clips, n_mels=N_MELS)
    dataset.set_epoch(3)
    assert [dataset[i]["caption"] for i in range(4)] == captions(0, 3)[:4]


def test_captions_flat_lists_every_caption_with_its_clip(good_clips):
    texts, text_to_clip = captions_flat(good_clips[:2])
    assert texts == CAPTIONS + CAPTIONS
    assert text_to_clip == [0] * 5 + [1] * 5


BAD = ["missing.wav", "empty.wav", "garbage.wav", "nan.wav", "inf.wav", "one_sample.wav", "20ms.wav"]
BAD_REASONS = ["not found", "empty", "cannot decode", "1 non-finite samples", "1 non-finite samples",
               "too short: 1 samples", "too short: 320 samples"]


def test_the_shortest_clip_is_derived_from_the_towers_output_lengths():
    assert MIN_VALID_FRAMES == 3  # 2 frames (20 ms) give no output: ((2 - 1) // 2 + 1 - 2) // 2 + 1 = 0
    for frames in range(1, 8):
        outputs = Qwen2AudioEncoder.output_lengths(torch.ones(1, frames, dtype=torch.bool)).item()
        assert (outputs >= 1) == (frames >= MIN_VALID_FRAMES)
    assert min_valid_frames(lambda mask: mask.sum(-1) // 4) == 4  # another tower, another minimum


@pytest.mark.parametrize("name, reason", zip(BAD, BAD_REASONS))
def test_fail_policy_names_the_manifest_line_and_the_way_to_skip(tmp_path, name, reason):
    manifest = make_manifest(tmp_path, ["clip0.wav", name])
    dataset = AudioTextDataset(read_manifest(manifest), n_mels=N_MELS)
    with pytest.raises(BadAudioError) as info:
        dataset[1]
    message = str(info.value)
    assert f"{manifest}:2:" in message and name in message and reason in message
    assert "--on-bad-audio skip" in message and "on_bad_audio" not in message  # the command line's spelling


def test_a_clip_of_three_frames_is_long_enough(tmp_path):
    sf.write(tmp_path / "30ms.wav", tone(2 * HOP_LENGTH + 1), SAMPLE_RATE)  # 321 samples: 3 frames
    (tmp_path / "m.jsonl").write_text('{"audio": "30ms.wav", "text": "short"}\n')
    assert AudioTextDataset(read_manifest(tmp_path / "m.jsonl"), n_mels=N_MELS)[0]["features"].valid_frames == 3


def test_skip_policy_reports_every_bad_clip_in_the_batch(tmp_path):
    manifest = make_manifest(tmp_path, ["clip0.wav", *BAD, "clip1.wav"])
    dataset = AudioTextDataset(read_manifest(manifest), on_bad_audio="skip", n_mels=N_MELS)
    batch = collate_audio_text([dataset[i] for i in range(len(BAD) + 2)], n_mels=N_MELS)
    assert batch["index"].tolist() == [0, len(BAD) + 1]
    assert batch["features"].shape[0] == 2 and batch["lines"] == [1, len(BAD) + 2]
    assert [(s.path, s.line) for s in batch["skipped"]] == [(str(tmp_path / n), k + 2) for k, n in enumerate(BAD)]
    assert all(reason in s.reason for s, reason in zip(batch["skipped"], BAD_REASONS))
    assert torch.isfinite(batch["features"]).all()


def test_a_batch_of_only_skipped_clips_has_no_features(tmp_path):
    dataset = AudioTextDataset(read_manifest(make_manifest(tmp_path, BAD)), on_bad_audio="skip", n_mels=N_MELS)
    batch = collate_audio_text([dataset[i] for i in range(len(BAD))], n_mels=N_MELS, tokenizer=word_tokenizer(tmp_path))
    assert batch["features"] is None and batch["frame_mask"] is None and batch["captions"] == []
    assert batch["input_ids"] is None and batch["attention_mask"] is None
    assert len(batch["skipped"]) == len(BAD) and batch["index"].shape == (0,)
    assert batch["cache"] == {"hit": 0, "miss": 0, "recomputed": 0}
    with pytest.raises(TypeError, match="Skipped"):
        collate_audio_text([None], n_mels=N_MELS)  # a bare None would lose the report


def test_precheck_drops_missing_empty_and_headerless_files_with_a_report(tmp_path):
    clips = read_manifest(make_manifest(tmp_path, ["clip0.wav", *BAD]))
    good, problems = precheck(clips)
    assert good == [clips[0], *clips[4:]]  # bad samples behind a sound header are found only by decoding
    assert [(clip.line, problem.split(" (")[0]) for clip, problem in problems] == [
        (2, "audio file not found"), (3, "audio file is empty"), (4, "audio file cannot be decoded")]


def word_tokenizer(tmp_path, max_length=16):
    """A WordPiece tokenizer over the captions' words (models/tokenizer.py, built from vocab.txt)."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "caption", "0", "1", "2", "3", "4"]
    (tmp_path / "vocab.txt").write_text("".join(f"{w}\n" for w in words))
    return load_tokenizer_files(None, tmp_path / "vocab.txt", max_length=max_length)


@pytest.mark.parametrize("pad_to_30s", [False, True])
def test_collate_pads_to_the_longest_clip_and_equals_audio_to_features(good_clips, tmp_path, pad_to_30s):
    dataset = AudioTextDataset(good_clips, n_mels=N_MELS)
    dataset.set_epoch(1)
    items = [dataset[i] for i in range(len(good_clips))]
    tokenizer = word_tokenizer(tmp_path)
    batch = collate_audio_text(items, n_mels=N_MELS, pad_to_30s=pad_to_30s, tokenizer=tokenizer)
    valid = [math.ceil(n / HOP_LENGTH) for n in LENGTHS]
    assert batch["features"].shape == (4, N_MELS, N_FRAMES if pad_to_30s else max(valid) + 2)
    assert batch["frame_mask"].sum(dim=1).tolist() == valid
    assert all(batch["frame_mask"][i, :v].all() for i, v in enumerate(valid))
    # the files decoded and transformed again, from scratch: audio_to_features is clip_features per clip then
    # pad_clip_features, as the dataset and the collate are, the same kernels on the same shapes: the same bits
    expected, mask = audio_to_features([clip.audio for clip in good_clips], n_mels=N_MELS, pad_to_30s=pad_to_30s)
    assert torch.equal(batch["features"], expected) and torch.equal(batch["frame_mask"], mask)
    assert batch["captions"] == [item["caption"] for item in items]
    input_ids, attention_mask = tokenize(tokenizer, batch["captions"])
    assert torch.equal(batch["input_ids"], input_ids) and torch.equal(batch["attention_mask"], attention_mask)
    assert batch["paths"] == [str(clip.audio) for clip in good_clips]
    assert batch["index"].dtype == torch.long and batch["skipped"] == []
    assert batch["cache"] == {"hit": 0, "miss": 0, "recomputed": 0}  # no feature cache
    no_tokenizer = collate_audio_text(items, n_mels=N_MELS, pad_to_30s=pad_to_30s)
    assert no_tokenizer["input_ids"] is None and no_tokenizer["attention_mask"] is None
    assert torch.equal(no_tokenizer["features"], batch["features"])
    with pytest.raises(ValueError, match="build AudioTextDataset with the audio tower's num_mel_bins"):
        collate_audio_text(items, n_mels=128)


def test_counting_the_captions_the_tokenizer_cuts(good_clips, tmp_path):
    clips = [dataclasses.replace(good_clips[0], captions=["caption 0", "caption 0 1 2", "caption " * 7])]
    assert count_truncated_captions(word_tokenizer(tmp_path, max_length=5), clips) == 2  # [CLS] + 3 words + [SEP] fits
    assert count_truncated_captions(word_tokenizer(tmp_path, max_length=8), clips) == 1
    assert count_truncated_captions(word_tokenizer(tmp_path, max_length=8), clips * 3000) == 3000  # chunked


def test_dataloader_with_two_workers_resumes_and_reports_skips(tmp_path):
    names = [f"clip{k}.wav" for k in range(4)] + BAD
    clips = read_manifest(make_manifest(tmp_path, names))
    dataset = AudioTextDataset(clips, seed=7, on_bad_audio="skip", n_mels=N_MELS)
    sampler = GlobalBatchSampler(len(clips), global_batch=2, seed=7)
    tokenizer = word_tokenizer(tmp_path)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2,
                        collate_fn=functools.partial(collate_audio_text, n_mels=N_MELS, tokenizer=tokenizer))
    dataset.set_epoch(2)
    sampler.set_state(2, batches_done=1)
    batches = list(loader)

    order = epoch_order(len(clips), seed=7, epoch=2)
    assert len(batches) == len(names) // 2 - 1  # the partial last batch is left out
    for j, batch in enumerate(batches):  # batch j + 1 of the epoch, its bad clips reported
        expected = order[2 * (j + 1) : 2 * (j + 2)]
        assert batch["index"].tolist() == [i for i in expected if names[i] not in BAD]
        # manifest line = index + 1 here (one row a clip)
        assert [s.line - 1 for s in batch["skipped"]] == [i for i in expected if names[i] in BAD]
    assert any(names[i] in BAD for i in order[2 : 2 * (len(names) // 2)])  # the resumed part does hold bad clips
    seen = [i for b in batches for i in b["index"].tolist()]
    # the workers drew the captions of epoch 2, as this process does, and tokenized them
    assert [c for b in batches for c in b["captions"]] == [dataset.caption(i) for i in seen]
    for batch in batches:
        if batch["captions"]:
            assert torch.equal(batch["input_ids"], tokenize(tokenizer, batch["captions"])[0])
