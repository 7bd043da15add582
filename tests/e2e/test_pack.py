"""train.py --pack end to end: an audio-qa run on packed rows trains the run of padded batches (the same losses
within float rounding, the same adapter to the same tolerance), computes on far less padding and reports it in
metrics.jsonl either way; --pack is refused where there is nothing to pack."""

import json

import pytest
from safetensors.torch import load_file

import train
from data.demo_audio_qa import ensure_demo_audio_qa
from tests.conftest import train_flags


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return ensure_demo_audio_qa(tmp_path_factory.mktemp("audio-qa"), n_train=48, n_eval=8, seed=0, verbose=False)


def records(out) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_packed_rows_train_the_run_of_padded_batches(demo, tmp_path):
    # dropout 0: a packed batch holds its examples in another order, so dropout masks would fall differently
    flags = dict(task="audio-qa", batch_size=8, max_steps=3, dropout=0, lr="3e-3", warmup_steps=1)
    train.train(train.parse_args(train_flags(demo, tmp_path / "padded", **flags)))
    train.train(train.parse_args(train_flags(demo, tmp_path / "packed", "--pack", "2048", **flags)))
    padded, packed = records(tmp_path / "padded"), records(tmp_path / "packed")
    assert [r["loss"] for r in packed] == pytest.approx([r["loss"] for r in padded], rel=1e-5, abs=1e-6)
    ours = load_file(str(tmp_path / "packed" / "adapter_model.safetensors"))
    theirs = load_file(str(tmp_path / "padded" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert (ours[key] - theirs[key]).abs().max() <= 1e-5, key
    assert all(p["lm_padding"] < q["lm_padding"] for p, q in zip(packed, padded))  # reported either way
    assert json.loads((tmp_path / "packed" / "run_config.json").read_text())["pack"] == 2048


def test_pack_is_refused_where_there_is_nothing_to_pack(tiny, tmp_path, capsys):
    assert train.main(train_flags(tiny, tmp_path / "run", "--pack", "512", batch_size=8, max_steps=1)) == 2
    assert "--pack puts answer examples end to end" in capsys.readouterr().err
