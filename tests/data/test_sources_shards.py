"""data/shards.py through data/sources.py `read_source`: WebDataset tar shards give the examples a JSONL
manifest of the same clips gives (captions, log-mel bit for bit), the index is built once, cached,
checked and rebuilt when damaged, and bad samples are named (`shard.tar: key 'abc'`) or skipped
and counted."""

import json
import warnings

import pytest

import data.shards as shards
from data.audio_text import AudioTextDataset, Skipped, precheck
from data.feature_cache import FeatureCache
from data.manifest import BadLine, ManifestError
from data.refs import MemberRef
from data.sources import expand_braces, read_source
from tests.data.source_fixtures import (CAPTIONS, assert_same_items, audio_samples, clips_and_manifest_examples,
                                        write_shard)

N_MELS = 80


@pytest.fixture
def clip_files(tmp_path):
    return clips_and_manifest_examples(tmp_path)


def write_two_shards(tmp_path, paths):
    folder = tmp_path / "shards"
    folder.mkdir()
    samples = audio_samples(paths)
    write_shard(folder / "000000.tar", samples[:3])
    write_shard(folder / "000001.tar", samples[3:])
    return folder


def test_shards_give_the_manifests_clips_and_features_bit_for_bit(clip_files, tmp_path):
    paths, reference = clip_files
    folder = write_two_shards(tmp_path, paths)
    source = read_source(str(folder / "{000000..000001}.tar"), "audio-text", index_dir=tmp_path / "index")
    clips = source.examples
    assert source.format == "shards" and [c.captions for c in clips] == [tuple(c) for c in CAPTIONS]
    assert all(isinstance(c.audio, MemberRef) for c in clips)
    assert clips[3].where == f"{folder / '000001.tar'}: key 'sample003'" and clips[3].line == 0
    assert BadLine.of(clips[3], "too long").where == clips[3].where  # a text problem the task finds later
    assert [c.audio.read_bytes() for c in clips] == [p.read_bytes() for p in paths]
    cache = FeatureCache(tmp_path / "cache")
    from_shards = AudioTextDataset(clips, seed=2, n_mels=N_MELS, feature_cache=cache)
    from_files = AudioTextDataset(reference, seed=2, n_mels=N_MELS)
    assert [from_shards[k]["cache"] for k in range(len(clips))] == ["miss"] * len(clips)
    assert [from_shards[k]["cache"] for k in range(len(clips))] == ["hit"] * len(clips)
    assert_same_items(from_shards, from_files)  # the cached features, read back, are the files' own
    # a folder of shards and a list of them read the same
    assert read_source(folder, "audio-text").examples == clips
    assert read_source([folder / "000000.tar", folder / "000001.tar"], "audio-text").examples == clips


def test_the_index_is_built_once_checked_and_rebuilt_when_damaged(clip_files, tmp_path, monkeypatch):
    paths, _ = clip_files
    folder = write_two_shards(tmp_path, paths)
    first = read_source(folder, "audio-text", index_dir=tmp_path / "index").examples
    indexes = sorted((tmp_path / "index").glob("*.json"))
    assert len(indexes) == 2 and not list((tmp_path / "index").glob(".*"))  # written whole, no temporary left

    def no_walk(shard):
        raise AssertionError(f"{shard} walked again")

    with monkeypatch.context() as patch:
        patch.setattr(shards, "_walk", no_walk)
        assert read_source(folder, "audio-text", index_dir=tmp_path / "index").examples == first
    stored = json.loads(indexes[0].read_text())
    stored["members"][0][1] += 512  # a wrong offset: the checksum no longer matches
    indexes[0].write_text(json.dumps(stored))
    with pytest.warns(UserWarning, match="damaged .*checksum mismatch.*rebuilding"):
        assert read_source(folder, "audio-text", index_dir=tmp_path / "index").examples == first
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rebuilt and rewritten: read without a word now
        assert read_source(folder, "audio-text", index_dir=tmp_path / "index").examples == first


def test_brace_ranges_keep_their_zero_padding():
    assert expand_braces("s/{000008..000010}.tar") == ["s/000008.tar", "s/000009.tar", "s/000010.tar"]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    with pytest.raises(ManifestError, match="runs backwards"):
        expand_braces("{3..1}.tar")


def test_bad_samples_are_named_or_skipped_and_counted(clip_files, tmp_path):
    paths, _ = clip_files
    good = audio_samples(paths)
    wav = paths[0].read_bytes()
    shard = write_shard(tmp_path / "shard-000003.tar", [
        good[0],
        ("nojson", {"wav": wav}),
        ("badjson", {"wav": wav, "json": b"{not json"}),
        ("blank", {"wav": wav, "json": b'{"text": "  "}'}),
        ("twoaudio", {"wav": wav, "flac": paths[1].read_bytes(), "json": b'{"text": "x"}'}),
        ("noaudio", {"json": b'{"text": "x"}'}),
        ("garbage", {"wav": b"RIFF not really", "json": b'{"text": "noise"}'}),
        good[2],
    ])
    with pytest.raises(ManifestError, match=rf"^{shard}: key 'nojson': no \.json member"):
        read_source(shard, "audio-text")
    bad = []
    clips = read_source(shard, "audio-text", bad_lines=bad).examples
    assert [c.audio.key for c in clips] == ["sample000", "garbage", "sample002"]
    keys = ("nojson", "badjson", "blank", "twoaudio", "noaudio")
    assert [b.where for b in bad] == [f"{shard}: key {k!r}" for k in keys]
    assert "not valid JSON" in bad[1].reason and bad[2].reason.startswith("json 'text' is empty")
    assert "2 audio members" in bad[3].reason and "no audio member" in bad[4].reason
    # audio that does not decode is found as a file's is: before training, or by the worker that reads it
    kept, problems = precheck(clips)
    assert [c.audio.key for c, _ in problems] == ["garbage"] and "cannot be decoded" in problems[0][1]
    item = AudioTextDataset(clips, on_bad_audio="skip", n_mels=N_MELS)[1]
    assert isinstance(item, Skipped) and item.path == f"{shard}: key 'garbage'"


def test_a_cut_short_or_compressed_shard_is_refused(clip_files, tmp_path):
    paths, _ = clip_files
    shard = write_shard(tmp_path / "cut.tar", audio_samples(paths)[:2])
    data = shard.read_bytes()
    shard.write_bytes(data[: data.index(paths[1].read_bytes()) + 100])  # cut inside the second sample's audio
    bad = []
    clips = read_source(shard, "audio-text", bad_lines=bad).examples
    assert [c.audio.key for c in clips] == ["sample000"] and bad[0].where == f"{shard}: key 'sample001'"
    assert bad[0].reason.startswith("the shard ends inside member 'sample001.flac'")
    damaged = write_shard(tmp_path / "damaged.tar", audio_samples(paths)[:2])
    data = bytearray(damaged.read_bytes())
    second = data.index(b"sample000.json")  # the second member's header: its checksum no longer matches
    data[second : second + 9] = b"XXXXXXXXX"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=rf"^{damaged}: a damaged tar header at byte {second}; "):
        read_source(damaged, "audio-text")
    (tmp_path / "x.tar.gz").write_bytes(b"")
    with pytest.raises(ManifestError, match="a compressed tar cannot be read at random"):
        read_source(tmp_path / "x.tar.gz", "audio-text")
