"""data/tables.py through data/sources.py `read_source`: parquet files and save_to_disk Arrow folders give
the examples a JSONL manifest of the same data gives (captions, decoded waveforms and log-mel bit for
bit), bad rows are named (`file.parquet: row N`) or skipped and counted, a failed column guess lists
the columns, and the feature cache keys a row by (file identity, row)."""

import dataclasses
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data.audio_qa import AudioQADataset
from data.audio_text import AudioTextDataset, Skipped, clip_durations, precheck
from data.feature_cache import FeatureCache, file_key
from data.instructblip import VQADataset, check_images
from data.manifest import BadLine, ManifestError
from data.refs import RowRef, SourceChanged, _open_files
from data.sources import read_source
from models.audio import load_audio
from tests.data.source_fixtures import (AUDIO_TYPE, CAPTIONS, COLOURS, assert_same_items, audio_text_columns,
                                        clips_and_manifest_examples, png_bytes, write_clips, write_parquet,
                                        write_save_to_disk)

N_MELS = 80


@pytest.fixture
def clips_and_manifest(tmp_path):
    return clips_and_manifest_examples(tmp_path)


@pytest.mark.parametrize("layout", ["parquet", "parquet folder", "save_to_disk"])
def test_a_dataset_on_disk_gives_the_manifests_clips_and_features_bit_for_bit(clips_and_manifest, tmp_path, layout):
    paths, reference = clips_and_manifest
    columns = audio_text_columns(paths)
    if layout == "save_to_disk":
        data = write_save_to_disk(tmp_path / "saved", columns, {"audio": "Audio"})
    else:
        (tmp_path / "pq").mkdir()
        data = write_parquet(tmp_path / "pq" / "train.parquet", columns, {"audio": "Audio"})
        data = data.parent if layout == "parquet folder" else data
    source = read_source(data, "audio-text")
    clips = source.examples
    assert source.format == ("arrow" if layout == "save_to_disk" else "parquet") and source.order_for(clips) is None
    assert [c.captions for c in clips] == [c.captions for c in reference] == [tuple(c) for c in CAPTIONS]
    assert all(isinstance(c.audio, RowRef) for c in clips)
    if layout == "save_to_disk":  # rows numbered within each Arrow file: 3 in the first, 2 in the second
        assert [c.where for c in clips][3] == f"{tmp_path / 'saved' / 'data-00001-of-00002.arrow'}: row 0"
    else:
        assert [c.where for c in clips] == [f"{tmp_path / 'pq' / 'train.parquet'}: row {k}" for k in range(5)]
        assert BadLine.of(clips[4], "too long").where == clips[4].where  # a text problem the task finds later
    for clip, ref_clip in zip(clips, reference):  # the waveform itself, decoded from the row's bytes
        assert torch.equal(load_audio(ref_clip.audio), load_audio(io.BytesIO(clip.audio.read_bytes())))
    assert_same_items(AudioTextDataset(clips, seed=1, n_mels=N_MELS),
                      AudioTextDataset(reference, seed=1, n_mels=N_MELS))
    assert clip_durations(clips) == clip_durations(reference)  # headers read from the bytes
    assert precheck(clips) == (clips, [])


def test_rows_with_only_a_path_are_the_files_themselves(clips_and_manifest, tmp_path):
    paths, reference = clips_and_manifest
    columns = audio_text_columns(paths, embed=False)  # bytes null, path relative to the table's folder
    clips = read_source(write_parquet(tmp_path / "paths.parquet", columns, {"audio": "Audio"}), "audio-text").examples
    assert [c.audio for c in clips] == [c.audio for c in reference]
    assert [c.where for c in clips][2] == f"{tmp_path / 'paths.parquet'}: row 2"
    # against another folder (--train-audio-dir), as for a manifest
    elsewhere = tmp_path / "elsewhere"
    clips = read_source(tmp_path / "paths.parquet", "audio-text", media_dir=elsewhere).examples
    assert clips[0].audio == elsewhere / paths[0].name


def test_rows_are_read_one_batch_at_a_time_and_a_rewritten_file_is_refused(clips_and_manifest, tmp_path):
    paths, _ = clips_and_manifest
    data = write_parquet(tmp_path / "t.parquet", audio_text_columns(paths), {"audio": "Audio"}, row_group_size=2)
    clips = read_source(data, "audio-text").examples
    assert clips[3].audio.read_bytes() == paths[3].read_bytes()
    assert _open_files.batch_key == (str(data), 1, "audio")  # row 3: the second row group, its one column
    assert len(_open_files.batch) == 2
    assert clips[4].audio.read_bytes() == paths[4].read_bytes()
    stat = os.stat(data)
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(SourceChanged, match="changed since the run listed"):
        clips[0].audio.read_bytes()


def test_bad_rows_are_named_or_skipped_and_counted(clips_and_manifest, tmp_path):
    paths, _ = clips_and_manifest
    columns = audio_text_columns(paths, [["ok"], None, ["ok"], ["  "], ["ok"]])
    audio = columns["audio"].to_pylist()
    audio[2] = {"bytes": None, "path": None}
    columns["audio"] = pa.array(audio, AUDIO_TYPE)
    data = write_parquet(tmp_path / "bad.parquet", columns, {"audio": "Audio"})
    with pytest.raises(ManifestError, match=rf"^{data}: row 1: column 'captions' is null; fill it in or drop the row"):
        read_source(data, "audio-text")
    bad: list[BadLine] = []
    clips = read_source(data, "audio-text", bad_lines=bad).examples
    assert [c.line for c in clips] == [0, 4]
    assert [b.where for b in bad] == [f"{data}: row {k}" for k in (1, 2, 3)]
    assert [b.reason.split(";")[0] for b in bad] == ["column 'captions' is null",
                                                     "column 'audio' holds no bytes and no path",
                                                     "column 'captions'[0] is empty"]


def test_undecodable_bytes_are_found_before_training_and_skipped_in_a_worker(clips_and_manifest, tmp_path):
    paths, _ = clips_and_manifest
    columns = audio_text_columns(paths)
    audio = columns["audio"].to_pylist()
    audio[1]["bytes"] = b"not audio at all"
    columns["audio"] = pa.array(audio, AUDIO_TYPE)
    clips = read_source(write_parquet(tmp_path / "x.parquet", columns, {"audio": "Audio"}), "audio-text").examples
    kept, problems = precheck(clips)
    assert len(kept) == 4 and [(c.line, "cannot be decoded" in r) for c, r in problems] == [(1, True)]
    item = AudioTextDataset(clips, on_bad_audio="skip", n_mels=N_MELS)[1]
    assert isinstance(item, Skipped) and item.path == f"{tmp_path / 'x.parquet'}: row 1" and item.line == 1


def test_a_failed_column_guess_lists_the_columns_and_their_types(clips_and_manifest, tmp_path):
    paths, _ = clips_and_manifest
    columns = audio_text_columns(paths)
    both = write_parquet(tmp_path / "both.parquet", {**columns, "text": pa.array(["x"] * 5)}, {"audio": "Audio"})
    with pytest.raises(ManifestError, match=r"several columns could hold the text \(captions, text\); its columns: "
                                            r"audio \(Audio\), captions \(list<element: string>\), text \(string\)\. "
                                            r"Name the text column with --text-column"):
        read_source(both, "audio-text")
    clips = read_source(both, "audio-text", text_column="text").examples
    assert [c.captions for c in clips] == [("x",)] * 5
    with pytest.raises(ManifestError, match=r"no column 'captoins' \(did you mean captions\?\)"):
        read_source(both, "audio-text", text_column="captoins")
    no_audio = write_parquet(tmp_path / "none.parquet", {"captions": columns["captions"]}, {})
    with pytest.raises(ManifestError, match=r"no Audio column .*; its columns: captions .*--audio-column"):
        read_source(no_audio, "audio-text")
    with pytest.raises(ManifestError, match="--image-column do not apply to audio-text data"):
        read_source(both, "audio-text", image_column="image")
    # Clotho's caption_1 .. caption_N as columns, and no `datasets` metadata at all
    numbered = {"audio": columns["audio"], "caption_1": pa.array(["a"] * 5), "caption_2": pa.array(["b"] * 5)}
    pq.write_table(pa.table(numbered), tmp_path / "clotho.parquet")
    assert read_source(tmp_path / "clotho.parquet", "audio-text").examples[0].captions == ("a", "b")


def test_the_feature_cache_hits_on_the_second_read_and_keys_by_row(clips_and_manifest, tmp_path):
    paths, reference = clips_and_manifest
    columns = audio_text_columns([paths[0]] * 3, [["one"], ["two"], ["three"]])  # one clip's bytes in three rows
    clips = read_source(write_parquet(tmp_path / "same.parquet", columns, {"audio": "Audio"}), "audio-text").examples
    cache = FeatureCache(tmp_path / "cache")
    dataset = AudioTextDataset(clips, n_mels=N_MELS, feature_cache=cache)
    assert [dataset[k]["cache"] for k in range(3)] == ["miss"] * 3
    assert [dataset[k]["cache"] for k in range(3)] == ["hit"] * 3
    keys = [file_key(c.audio, N_MELS) for c in clips]
    assert [k["row"] for k in keys] == [0, 1, 2] and len({cache.entry_path(k) for k in keys}) == 3
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 3
    uncached = AudioTextDataset(reference[:1], n_mels=N_MELS)[0]["features"]
    assert torch.equal(dataset[2]["features"].features, uncached.features)


def test_audio_qa_and_instructblip_rows_equal_their_manifests(tmp_path):
    paths = write_clips(tmp_path)[:3]
    prompts, answers = ["how many?", "what pitch?", "loud?"], ["one", "high", "no"]
    qa_manifest = tmp_path / "qa.jsonl"
    qa_manifest.write_text("".join(json.dumps({"audio": p.name, "prompt": q, "answer": a}) + "\n"
                                   for p, q, a in zip(paths, prompts, answers)))
    qa_columns = {"audio": pa.array([{"bytes": p.read_bytes(), "path": p.name} for p in paths], AUDIO_TYPE),
                  "question": pa.array(prompts), "answer": pa.array(answers)}
    qa_table = write_parquet(tmp_path / "qa.parquet", qa_columns, {"audio": "Audio"})
    rows, lines = read_source(qa_table, "audio-qa").examples, read_source(qa_manifest, "audio-qa").examples
    assert [(e.prompt, e.answer) for e in rows] == [(e.prompt, e.answer) for e in lines]
    for got, expected in zip(AudioQADataset(rows, n_mels=N_MELS), AudioQADataset(lines, n_mels=N_MELS)):
        assert torch.equal(got["features"].features, expected["features"].features)

    images = [tmp_path / f"img{k}.png" for k in range(3)]
    for image, colour in zip(images, COLOURS):
        image.write_bytes(png_bytes(colour))
    vqa_manifest = tmp_path / "vqa.jsonl"
    vqa_manifest.write_text("".join(json.dumps({"image": i.name, "prompt": q, "answer": a}) + "\n"
                                    for i, q, a in zip(images, prompts, answers)))
    vqa_columns = {"image": pa.array([{"bytes": i.read_bytes(), "path": None} for i in images], AUDIO_TYPE),
                   "prompt": pa.array(prompts), "answer": pa.array(answers)}
    saved = write_save_to_disk(tmp_path / "vqa", vqa_columns, {"image": "Image"}, rows_per_file=(3,))
    rows, lines = read_source(saved, "instructblip").examples, read_source(vqa_manifest, "instructblip").examples
    assert check_images(rows) == []
    for got, expected in zip(VQADataset(rows), VQADataset(lines)):
        assert (got["prompt"], got["answer"]) == (expected["prompt"], expected["answer"])
        assert np.array_equal(np.asarray(got["image"]), np.asarray(expected["image"]))


def test_layout_errors_say_what_to_pass(tmp_path):
    (tmp_path / "dict" / "train").mkdir(parents=True)
    (tmp_path / "dict" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    (tmp_path / "dict" / "train" / "state.json").write_text("{}")
    with pytest.raises(ManifestError, match="a DatasetDict folder .*pass one split's folder"):
        read_source(tmp_path / "dict", "audio-text")
    hub = tmp_path / "hub"
    hub.mkdir()
    for name in ("train-00000-of-00001.parquet", "test-00000-of-00001.parquet"):
        (hub / name).write_bytes(b"")
    with pytest.raises(ManifestError, match=r"several splits \(test, train\); .*train-\*\.parquet"):
        read_source(hub, "audio-text")
    with pytest.raises(ManifestError, match="unknown data format '.txt'"):
        (tmp_path / "x.txt").write_text("")
        read_source(tmp_path / "x.txt", "audio-text")
    with pytest.raises(ManifestError, match="apply to parquet, Arrow and tar data"):
        (tmp_path / "m.jsonl").write_text('{"audio": "a.wav", "text": "t"}\n')
        read_source(tmp_path / "m.jsonl", "audio-text", text_column="text")


def test_what_the_datasets_package_itself_saves_reads_the_same(clips_and_manifest, tmp_path):
    """The layouts above are written with pyarrow; the `datasets` package's own save_to_disk and to_parquet
    output (a test-only reference, requirements-dev.txt) must read the same."""
    import datasets

    paths, reference = clips_and_manifest
    rows = {"audio": [{"bytes": p.read_bytes(), "path": p.name} for p in paths], "caption": [c[0] for c in CAPTIONS]}
    dataset = datasets.Dataset.from_dict(rows).cast_column("audio", datasets.Audio(decode=False))
    dataset.save_to_disk(str(tmp_path / "saved"), max_shard_size="10KB")
    dataset.to_parquet(str(tmp_path / "saved.parquet"))
    for data in (tmp_path / "saved", tmp_path / "saved.parquet"):
        clips = read_source(data, "audio-text").examples
        assert [c.captions for c in clips] == [(c[0],) for c in CAPTIONS]
        first_captions = [dataclasses.replace(c, captions=c.captions[:1]) for c in reference]
        assert_same_items(AudioTextDataset(clips, n_mels=N_MELS), AudioTextDataset(first_captions, n_mels=N_MELS))
