"""data/audio_text.py: decoding in the dataset, per-epoch captions, the bad-audio policies, the
collate (equal to audio_to_features), DataLoader workers, and the resumable batch order."""

import functools
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader

from data.audio_text import (
    AudioTextDataset,
    BadAudioError,
    ResumableBatchSampler,
    captions_flat,
    collate_audio_text,
    epoch_order,
    precheck,
)
from data.manifest import read_manifest
from models.audio import HOP_LENGTH, N_SAMPLES, SAMPLE_RATE, audio_to_features, load_audio

N_MELS = 80
LENGTHS = [1600, 2345, 4000, 801]  # samples; 801 is not a whole number of hops
CAPTIONS = [f"caption {k}" for k in range(5)]


def tone(n, freq=440.0, sr=SAMPLE_RATE):
    t = np.arange(n) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def make_manifest(tmp_path, names, bad=()):
    """Writes the good wavs and a manifest listing `names` (bad ones as given), 5 captions each."""
    for k, n in enumerate(LENGTHS):
        sf.write(tmp_path / f"clip{k}.wav", tone(n, 200.0 + 100 * k), SAMPLE_RATE)
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "garbage.wav").write_bytes(b"this is not audio at all" * 10)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"audio": name, "captions": CAPTIONS}) + "\n" for name in names))
    return manifest


@pytest.fixture
def good_clips(tmp_path):
    return read_manifest(make_manifest(tmp_path, [f"clip{k}.wav" for k in range(len(LENGTHS))]))


def test_items_hold_the_decoded_audio_and_where_it_came_from(good_clips):
    dataset = AudioTextDataset(good_clips)
    item = dataset[1]
    assert item["index"] == 1 and item["line"] == 2 and item["path"] == str(good_clips[1].audio)
    assert item["audio"].dtype == torch.float32 and item["audio"].shape == (LENGTHS[1],)
    torch.testing.assert_close(item["audio"], load_audio(good_clips[1].audio))
    assert item["caption"] in CAPTIONS


def test_long_clips_are_truncated_to_30_s_with_a_warning(tmp_path):
    sf.write(tmp_path / "long.wav", tone(N_SAMPLES + 3 * HOP_LENGTH), SAMPLE_RATE)
    (tmp_path / "m.jsonl").write_text('{"audio": "long.wav", "text": "long"}\n')
    dataset = AudioTextDataset(read_manifest(tmp_path / "m.jsonl"))
    with pytest.warns(UserWarning, match=r"m\.jsonl:1.*truncating it to 30 s"):
        assert dataset[0]["audio"].shape == (N_SAMPLES,)


def test_captions_depend_only_on_seed_epoch_and_index(good_clips):
    clips = good_clips * 5  # 20 clips of 5 captions each

    def captions(seed, epoch):
        dataset = AudioTextDataset(clips, seed=seed)  # a fresh dataset, as after a resume
        dataset.set_epoch(epoch)
        return [dataset.caption(i) for i in range(len(clips))]

    assert captions(0, 3) == captions(0, 3)
    assert captions(0, 3) != captions(0, 4)
    assert captions(0, 3) != captions(1, 3)
    assert len({c for epoch in range(5) for c in captions(0, epoch)}) == len(CAPTIONS)
    dataset = AudioTextDataset(clips)
    dataset.set_epoch(3)
    assert [dataset[i]["caption"] for i in range(4)] == captions(0, 3)[:4]


def test_captions_flat_lists_every_caption_with_its_clip(good_clips):
    texts, text_to_clip = captions_flat(good_clips[:2])
    assert texts == CAPTIONS + CAPTIONS
    assert text_to_clip == [0] * 5 + [1] * 5


BAD = ["missing.wav", "empty.wav", "garbage.wav"]
BAD_REASONS = ["not found", "empty", "cannot decode"]


@pytest.mark.parametrize("name, reason", zip(BAD, BAD_REASONS))
def test_fail_policy_names_the_manifest_line_and_the_way_to_skip(tmp_path, name, reason):
    manifest = make_manifest(tmp_path, ["clip0.wav", name])
    dataset = AudioTextDataset(read_manifest(manifest))
    with pytest.raises(BadAudioError) as info:
        dataset[1]
    message = str(info.value)
    assert f"{manifest}:2:" in message and name in message and reason in message
    assert "on_bad_audio='skip'" in message


def test_skip_policy_reports_every_bad_clip_in_the_batch(tmp_path):
    manifest = make_manifest(tmp_path, ["clip0.wav", *BAD, "clip1.wav"])
    dataset = AudioTextDataset(read_manifest(manifest), on_bad_audio="skip")
    batch = collate_audio_text([dataset[i] for i in range(5)], n_mels=N_MELS)
    assert batch["index"].tolist() == [0, 4]
    assert batch["features"].shape[0] == 2 and batch["lines"] == [1, 5]
    assert [(s.path, s.line) for s in batch["skipped"]] == [(str(tmp_path / n), k + 2) for k, n in enumerate(BAD)]
    assert all(reason in s.reason for s, reason in zip(batch["skipped"], BAD_REASONS))


def test_a_batch_of_only_skipped_clips_has_no_features(tmp_path):
    dataset = AudioTextDataset(read_manifest(make_manifest(tmp_path, BAD)), on_bad_audio="skip")
    batch = collate_audio_text([dataset[i] for i in range(3)], n_mels=N_MELS)
    assert batch["features"] is None and batch["frame_mask"] is None and batch["captions"] == []
    assert len(batch["skipped"]) == 3 and batch["index"].shape == (0,)
    with pytest.raises(TypeError, match="Skipped"):
        collate_audio_text([None], n_mels=N_MELS)  # a bare None would lose the report


def test_precheck_drops_missing_and_empty_files_with_a_report(tmp_path):
    clips = read_manifest(make_manifest(tmp_path, ["clip0.wav", *BAD]))
    good, problems = precheck(clips)
    assert good == [clips[0], clips[3]]  # garbage bytes are found only by decoding
    assert [(clip.line, problem) for clip, problem in problems] == [
        (2, "audio file not found"), (3, "audio file is empty (0 bytes)")]


def test_collate_pads_to_the_longest_clip_and_equals_audio_to_features(good_clips):
    dataset = AudioTextDataset(good_clips)
    items = [dataset[i] for i in range(len(good_clips))]
    batch = collate_audio_text(items, n_mels=N_MELS)
    valid = [math.ceil(n / HOP_LENGTH) for n in LENGTHS]
    assert batch["features"].shape == (4, N_MELS, max(valid) + 2)
    assert batch["frame_mask"].sum(dim=1).tolist() == valid
    assert all(batch["frame_mask"][i, :v].all() for i, v in enumerate(valid))
    expected, mask = audio_to_features([item["audio"] for item in items], n_mels=N_MELS)
    torch.testing.assert_close(batch["features"], expected, rtol=0, atol=0)
    assert torch.equal(batch["frame_mask"], mask)
    assert batch["captions"] == [item["caption"] for item in items]
    assert batch["paths"] == [str(clip.audio) for clip in good_clips]
    assert batch["index"].dtype == torch.long and batch["skipped"] == []
    padded = collate_audio_text(items, n_mels=N_MELS, pad_to_30s=True)
    assert padded["features"].shape == (4, N_MELS, 3000)


def test_dataloader_with_two_workers_resumes_and_reports_skips(tmp_path):
    names = [f"clip{k}.wav" for k in range(4)] + BAD
    clips = read_manifest(make_manifest(tmp_path, names))
    dataset = AudioTextDataset(clips, seed=7, on_bad_audio="skip")
    sampler = ResumableBatchSampler(len(clips), batch_size=2, seed=7)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2,
                        collate_fn=functools.partial(collate_audio_text, n_mels=N_MELS))
    dataset.set_epoch(2)
    sampler.set_state(2, batches_done=1)
    batches = list(loader)

    order = epoch_order(len(clips), seed=7, epoch=2)
    assert len(batches) == 3
    for j, batch in enumerate(batches):  # batch j + 1 of the epoch, its bad clips reported
        expected = order[2 * (j + 1) : 2 * (j + 2)]
        assert batch["index"].tolist() == [i for i in expected if names[i] not in BAD]
        # manifest line = index + 1 here (one row a clip)
        assert [s.line - 1 for s in batch["skipped"]] == [i for i in expected if names[i] in BAD]
    assert any(names[i] in BAD for i in order[2:])  # the resumed part does hold bad clips
    seen = [i for b in batches for i in b["index"].tolist()]
    # the workers drew the captions of epoch 2, as this process does
    assert [c for b in batches for c in b["captions"]] == [dataset.caption(i) for i in seen]


def test_resuming_mid_epoch_yields_exactly_the_remaining_batches():
    sampler = ResumableBatchSampler(23, batch_size=4, seed=3)
    sampler.set_state(epoch=5)
    full = list(sampler)
    assert len(full) == 6 and len(sampler) == 6 and [len(b) for b in full] == [4] * 5 + [3]
    assert sorted(i for b in full for i in b) == list(range(23))  # each index once per epoch
    for k in range(7):
        resumed = ResumableBatchSampler(23, batch_size=4, seed=3)
        resumed.set_state(epoch=5, batches_done=k)
        assert list(resumed) == full[k:] and len(resumed) == 6 - k

    sampler.set_state(epoch=6)
    assert list(sampler) != full
    other_seed = ResumableBatchSampler(23, batch_size=4, seed=4)
    other_seed.set_state(epoch=5)
    assert list(other_seed) != full


def test_drop_last_and_state_validation():
    sampler = ResumableBatchSampler(10, batch_size=4, drop_last=True)
    assert [len(b) for b in sampler] == [4, 4]
    with pytest.raises(ValueError, match="outside 0..2"):
        sampler.set_state(0, batches_done=3)
    assert epoch_order(10, 0, 1) == epoch_order(10, 0, 1) != epoch_order(10, 0, 2)
