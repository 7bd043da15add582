"""Recipe files (--config): every shipped recipe resolves with --print-config, the command line overrides a
recipe, and a recipe's mistakes are one error line naming the key."""

import json
from pathlib import Path

import pytest
import yaml

import train

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
# a recipe key -> where its value lands in --print-config's run_config (flat RunConfig JSON)
FIELDS = {"task": "task", "model": "model", "audio-model": "audio_model", "text-model": "text_model", "rank": "rank",
          "alpha": "alpha", "dropout": "dropout", "lr": "lr", "min-lr": "min_lr", "weight-decay": "weight_decay",
          "batch-size": "batch_size", "micro-batch-size": "micro_batch_size", "grad-clip": "grad_clip",
          "warmup-steps": "warmup_steps", "epochs": "epochs", "precision": "precision", "quantize": "quantize",
          "language-model-dtype": "language_model_dtype", "targets": "targets"}


def printed(argv, capsys) -> dict:
    assert train.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_recipes_are_shipped():
    assert len(RECIPES) >= 4, [r.name for r in RECIPES]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.stem)
def test_every_shipped_recipe_resolves_to_its_own_values(recipe, capsys):
    config = printed(["--config", str(recipe), "--print-config"], capsys)["run_config"]
    settings = yaml.safe_load(recipe.read_text())
    checked = 0
    for key, value in settings.items():
        if key in FIELDS:
            assert config[FIELDS[key]] == value, key
            checked += 1
    assert checked >= 4  # a recipe that set nothing would pass the loop trivially


def test_the_command_line_overrides_the_recipe(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("rank: 32\nlr: 5.0e-4\ntargets: ['audio_tower.*q_proj', 'audio_tower.*k_proj']\nrslora: true\n")
    from_file = printed(["--config", str(recipe), "--print-config"], capsys)["run_config"]
    assert (from_file["rank"], from_file["lr"], from_file["rslora"]) == (32, 5e-4, True)
    assert from_file["targets"] == ["audio_tower.*q_proj", "audio_tower.*k_proj"]
    overridden = printed(["--config", str(recipe), "--rank", "4", "--targets", "audio_tower.*v_proj", "--print-config"],
                         capsys)["run_config"]
    assert (overridden["rank"], overridden["lr"]) == (4, 5e-4)
    assert overridden["targets"] == ["audio_tower.*v_proj"]  # a repeatable flag replaces the recipe's list


@pytest.mark.parametrize("text, message", [
    ("bach-size: 8\n", "unknown key 'bach-size'; did you mean 'batch-size' (--batch-size)?"),
    ("precision: fp8\n", "precision: 'fp8' is not one of fp32, bf16, fp16"),
    ("rslora: 3\n", "rslora: expected true or false, got 3"),
    ("rank-pattern: ['q_proj']\n", "rank-pattern: 'q_proj': expected REGEX=INT"),
    ("- rank\n", "expected a mapping of flag names to values"),
])
def test_a_recipe_mistake_is_one_error_line_naming_the_key(tmp_path, capsys, text, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    assert train.main(["--config", str(recipe), "--print-config"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and message in error, error


def test_a_missing_recipe_is_named(tmp_path, capsys):
    assert train.main(["--config", str(tmp_path / "nowhere.yaml"), "--print-config"]) == 2
    assert "nowhere.yaml: no such file" in capsys.readouterr().err
