"""train.py on Hugging Face datasets and WebDataset shards: a parquet copy of a manifest trains the same run
as the manifest, and a 2-process run on shards killed mid-run resumes to the uninterrupted run, bit for bit."""

import json
from pathlib import Path

import pytest
import torch

import train
from tests.conftest import train_flags
from tests.data.source_fixtures import AUDIO_TYPE, hf_schema, write_shard
from tests.e2e.test_distributed import adapter, kill_after_a_checkpoint, losses, torchrun

STEPS = 4


@pytest.fixture(scope="module")
def sources(tiny):
    """The tiny set's training manifest as a parquet file (audio bytes embedded, row groups of 8) and as 4 tar
    shards of 12 samples, beside the manifest itself."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = Path(tiny["train"])
    rows = [json.loads(line) for line in open(manifest)]
    folder = tiny["root"] / "sources"
    folder.mkdir()
    audio = [{"bytes": (manifest.parent / row["audio"]).read_bytes(), "path": row["audio"]} for row in rows]
    columns = {"audio": pa.array(audio, AUDIO_TYPE), "captions": pa.array([row["captions"] for row in rows])}
    pq.write_table(pa.table(columns, schema=hf_schema(columns, {"audio": "Audio"})), folder / "train.parquet",
                   row_group_size=8)
    for shard in range(4):
        samples = [(f"clip{k:04d}", {"wav": (manifest.parent / rows[k]["audio"]).read_bytes(),
                                     "json": json.dumps({"captions": rows[k]["captions"]}).encode()})
                   for k in range(12 * shard, 12 * shard + 12)]
        write_shard(folder / f"train-{shard:06d}.tar", samples)
    return dict(tiny, parquet=str(folder / "train.parquet"), shards=str(folder / "train-{000000..000003}.tar"))


def flags(sets, out, train_data, *extra):
    return train_flags({**sets, "train": train_data}, out, *extra, batch_size=8, max_steps=STEPS, dropout=0, lr="3e-3",
                       warmup_steps=1)


def test_a_parquet_copy_trains_the_same_run_as_its_manifest(sources, tmp_path):
    train.train(train.parse_args(flags(sources, tmp_path / "manifest", sources["train"])))
    train.train(train.parse_args(flags(sources, tmp_path / "parquet", sources["parquet"])))
    assert losses(tmp_path / "parquet") == losses(tmp_path / "manifest")  # the same examples, in the same order
    config = json.loads((tmp_path / "parquet" / "run_config.json").read_text())
    assert config["train_data"] == sources["parquet"] and config["train_data_sha256"]


def test_a_two_process_run_on_shards_killed_mid_run_resumes_to_the_uninterrupted_run(sources, tmp_path):
    whole = tmp_path / "whole"
    result = torchrun(flags(sources, whole, sources["shards"]))
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(losses(whole)) == STEPS
    out = tmp_path / "killed"
    killed_at = kill_after_a_checkpoint(flags(sources, out, sources["shards"], "--save-every", "1"), out,
                                        tmp_path / "killed.log")
    assert killed_at is not None and killed_at < STEPS, (tmp_path / "killed.log").read_text()
    result = torchrun(flags(sources, out, sources["shards"], "--save-every", "1", "--resume"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert losses(out) == losses(whole)  # the same processes on the same machine: exactly, not approximately
    ours, theirs = adapter(out), adapter(whole)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
