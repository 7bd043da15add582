"""Tiny data sets written three ways for the source tests: files + a JSONL manifest (the reference), a
Hugging Face dataset (parquet, or save_to_disk's Arrow layout written with pyarrow as `datasets` writes
it), and WebDataset tar shards; all from the same clips, captions, questions and images."""

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
import torch
from PIL import Image

from data.sources import read_source
from models.audio import SAMPLE_RATE
from tests.conftest import tone

LENGTHS = [1600, 2345, 4000, 801, 3100]  # samples: a few log-mel frames each
CAPTIONS = [["a low tone"], ["a tone", "a higher tone"], ["a long tone"], ["a short tone"], ["the highest tone"]]
AUDIO_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # `datasets`' Audio and Image storage
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


def write_clips(folder, formats=("WAV", "FLAC", "WAV", "WAV", "FLAC")) -> list:
    """The clips as files (mixed formats, 16 and 22.05 kHz), returned as their paths."""
    paths = []
    for k, (n, fmt) in enumerate(zip(LENGTHS, formats)):
        rate = SAMPLE_RATE if k % 2 == 0 else 22050  # some need resampling, as real data does
        path = folder / f"clip{k}.{fmt.lower()}"
        sf.write(path, tone(n, 200.0 + 100 * k), rate, format=fmt)
        paths.append(path)
    return paths


def write_manifest(folder, paths, captions=CAPTIONS):
    manifest = folder / "clips.jsonl"
    manifest.write_text("".join(json.dumps({"audio": p.name, "captions": c}) + "\n" for p, c in zip(paths, captions)))
    return manifest


def hf_schema(columns: dict, media: dict) -> pa.Schema:
    """The schema with the `datasets` features metadata (media: {column: "Audio" | "Image"})."""
    features = {name: ({"_type": media[name]} if name in media else {"dtype": "string", "_type": "Value"})
                for name in columns}
    schema = pa.schema([(name, array.type) for name, array in columns.items()])
    return schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})


def audio_text_columns(paths, captions=CAPTIONS, embed=True) -> dict:
    audio = [{"bytes": p.read_bytes() if embed else None, "path": p.name} for p in paths]
    return {"audio": pa.array(audio, AUDIO_TYPE), "captions": pa.array(captions, pa.list_(pa.string()))}


def write_parquet(path, columns: dict, media: dict, row_group_size=2):
    table = pa.table(columns, schema=hf_schema(columns, media))
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_save_to_disk(folder, columns: dict, media: dict, rows_per_file=(3, 2)):
    """`Dataset.save_to_disk`'s layout: Arrow IPC stream files, dataset_info.json and state.json."""
    folder.mkdir()
    table = pa.table(columns, schema=hf_schema(columns, media))
    names, start = [], 0
    for k, rows in enumerate(rows_per_file):
        name = f"data-{k:05d}-of-{len(rows_per_file):05d}.arrow"
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in table.slice(start, rows).to_batches(max_chunksize=2):  # several record batches a file
                writer.write_batch(batch)
        names.append(name)
        start += rows
    features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
    (folder / "dataset_info.json").write_text(json.dumps({"features": features, "splits": None}))
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                   "_fingerprint": "0", "_format_columns": None, "_format_kwargs": {},
                                                   "_format_type": None, "_output_all_columns": False, "_split": None}))
    return folder


def write_shard(path, samples: list[tuple[str, dict]]):
    """A tar shard from [(key, {extension: bytes})], members in the order given, as WebDataset writes."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def audio_samples(paths, captions=CAPTIONS) -> list[tuple[str, dict]]:
    """One sample per clip: its audio as written, and {"text": ...} or {"captions": [...]} alternately."""
    samples = []
    for k, (p, c) in enumerate(zip(paths, captions)):
        text = {"text": c[0]} if len(c) == 1 else {"captions": c}
        samples.append((f"sample{k:03d}", {p.suffix[1:]: p.read_bytes(), "json": json.dumps(text).encode()}))
    return samples


def png_bytes(colour, size=(12, 9)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def clips_and_manifest_examples(folder) -> tuple[list, list]:
    """(the clip files written in `folder`, the examples a JSONL manifest of them gives): the reference every
    other layout of the same data is compared with."""
    paths = write_clips(folder)
    return paths, read_source(write_manifest(folder, paths), "audio-text").examples


def assert_same_items(dataset, reference):
    """Two datasets of the same clips give the same captions and log-mel, bit for bit: each item goes through
    the same per-clip code on the same bytes."""
    assert len(dataset) == len(reference)
    for k in range(len(reference)):
        item, expected = dataset[k], reference[k]
        assert item["caption"] == expected["caption"]
        assert torch.equal(item["features"].features, expected["features"].features)
        assert (item["features"].valid_frames, item["features"].fill) == (expected["features"].valid_frames,
                                                                          expected["features"].fill)
