"""common/run_config.py and common/precision.py: the typed run configuration round-trips through
run_config.json, reads what earlier versions wrote, never changes in place, and its fingerprint is the
settings that define a run; one Precision object answers every precision question."""

import dataclasses
import json

import pytest
import torch

from common.precision import Precision
from common.run_config import RunConfig


def test_the_json_round_trips_and_is_flat():
    config = RunConfig().replace(targets=["a.*q", "b"], rank_pattern={"q_proj": 4}, alpha_pattern={"k": 2.0},
                                 max_steps=9, precision="bf16", train_also=["audio_proj"], quantize="nf4",
                                 quantize_keep=("audio_proj",))
    flat = json.loads(config.dumps())
    assert flat["targets"] == ["a.*q", "b"] and flat["rank_pattern"] == {"q_proj": 4} and flat["precision"] == "bf16"
    assert not any(isinstance(value, dict) and key not in ("rank_pattern", "alpha_pattern")
                   for key, value in flat.items())
    assert RunConfig.from_json(flat) == config


def test_a_file_of_an_earlier_version_loads_with_defaults():
    """run_config.json as train.py wrote it before the typed configuration: flat keys, null for fields its task
    did not use, keys this version does not know."""
    old = {"task": "audio-text", "demo": True, "audio_model": "/a", "text_model": "/t", "train_data": "/m.jsonl",
           "eval_data": None, "embed_dim": 256, "pad_to_30s": False, "encoding_strategy": "audio_tower",
           "quantize": "none", "quantize_keep": [], "targets": ["x"], "rank": 16, "alpha": 32, "dropout": 0.1,
           "rslora": False, "precision": "fp32", "seed": 0, "batch_size": 32, "micro_batch_size": 32,
           "world_size": 1, "lr": 0.001, "language_model_dtype": None, "a_key_from_elsewhere": 1}
    config = RunConfig.from_json(old)
    assert config.sources.audio_model == "/a" and config.lora.targets == ("x",)
    assert config.model.language_model_dtype == "fp32"  # null: the default
    assert config.lora.dora is False and config.optim.min_lr == 0.0  # absent: the default


def test_a_config_never_changes_in_place():
    config = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optim.lr = 1.0
    changed = config.replace(lr=2e-3)
    assert (config.optim.lr, changed.optim.lr) == (1e-3, 2e-3)
    with pytest.raises(KeyError, match="no field 'learning_rate'"):
        config.replace(learning_rate=1.0)


def test_the_fingerprint_holds_what_defines_a_run_and_reads_old_states():
    config = RunConfig().replace(targets=["x"], max_steps=10)
    fingerprint = config.fingerprint()
    assert ({"task", "targets", "rank", "lr", "batch_size", "max_steps", "seed", "precision", "quantize"}
            <= set(fingerprint))
    assert not {"eval_every", "save_every", "workers", "log_every", "cache_dir", "eval_data"} & set(fingerprint)
    assert config.replace(eval_every=7, workers=0).fingerprint() == fingerprint  # how a run is watched: not the run
    assert config.replace(lr=5e-4).fingerprint() != fingerprint
    saved = {k: v for k, v in fingerprint.items() if k not in ("min_lr", "dora")} | {"language_model_dtype": None}
    assert RunConfig.normalized_fingerprint(saved) == fingerprint  # a state saved before those fields existed


@pytest.mark.parametrize("name, autocast, frozen, scaled", [("fp32", None, None, False),
                                                             ("bf16", torch.bfloat16, torch.bfloat16, False),
                                                             ("fp16", torch.float16, None, True)])
def test_one_precision_answers_every_question(name, autocast, frozen, scaled):
    precision = Precision(name)
    assert precision.autocast_dtype == autocast and precision.frozen_dtype == frozen
    assert precision.grad_scaler("cpu").is_enabled() == scaled
    with precision.autocast("cpu"):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == (autocast or torch.float32)


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision 'fp8' is not one of fp32, bf16, fp16"):
        Precision("fp8")
