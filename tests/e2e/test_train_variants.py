"""train.py's LoRA-variant flags end to end: each trains, writes an adapter PEFT's config fields describe,
and eval.py rebuilds the run from those files with the run's own numbers; a resume refuses a changed
variant; `--targets all-linear` prints what it expands to."""

import json

import pytest

import eval as evaluation
import train
from tests.conftest import train_flags

VARIANTS = {
    "dora": (["--dora"], {"use_dora": True}),
    "lora-plus": (["--lora-plus-ratio", "16"], {}),
    "pissa": (["--init", "pissa"], {"init_lora_weights": True}),  # saved converted: plain LoRA over the released base
    "olora": (["--init", "olora"], {"init_lora_weights": True}),
    "patterns": (["--rank-pattern", "q_proj=4", "--alpha-pattern", "q_proj=8"],
                 {"rank_pattern": {"q_proj": 4}, "alpha_pattern": {"q_proj": 8}}),
}


def flags(tiny, out, *extra):
    return train_flags(tiny, out, *extra, eval_data=tiny["eval"], batch_size=8, max_steps=3, lr="3e-3", warmup_steps=1)

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_each_variant_trains_saves_and_reevaluates_to_its_own_numbers(tiny_audio_text, tmp_path, variant):
    extra, config_fields = VARIANTS[variant]
    out = tmp_path / variant
    _, history = train.train(train.parse_args(flags(tiny_audio_text, out, *extra)))
    saved = json.loads((out / "adapter_config.json").read_text())
    assert {key: saved[key] for key in config_fields} == config_fields
    assert evaluation.main(["--checkpoint", str(out)])["text_to_audio"] == history["after"]["text_to_audio"]
    field = {"dora": "dora", "lora-plus": "lora_plus_ratio", "pissa": "init", "olora": "init",
             "patterns": "rank_pattern"}
    with pytest.raises(train.TrainingError, match=f"--resume refused.*\\n  (.*\\n  )*{field[variant]}: saved"):
        train.train(train.parse_args(flags(tiny_audio_text, out, "--resume")))  # the same run without its variant


def test_pissa_saves_plain_lora_of_twice_the_rank(tiny_audio_text, tmp_path):
    out = tmp_path / "pissa"
    train.train(train.parse_args(flags(tiny_audio_text, out, "--init", "pissa")))
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 2 * 16 and saved["init_lora_weights"] is True  # PEFT's conversion: rank 2r, no residual base


def test_all_linear_prints_its_expansion(tiny_audio_text, tmp_path, capsys):
    code = train.main(flags(tiny_audio_text, tmp_path / "run", "--targets", "all-linear", "--list-targets"))
    printed = capsys.readouterr().out
    assert "--targets all-linear: 25 Linear layers: audio_tower.layers.{0..1}.self_attn.{k,out,q,v}_proj" in printed
    # a trained head is not a target
    assert "audio_proj" not in printed.split("--targets all-linear:")[1].splitlines()[0]
    assert code in (0, 1)


@pytest.mark.parametrize("variant", ["dora", "patterns", "pissa"])
def test_the_export_is_the_trained_tower(tiny_audio_text, tmp_path, variant):
    """Merged by models.export (DoRA's magnitude, per-module scalings, PiSSA's converted adapter), the
    checkpoint computes what the trained run computes."""
    import torch

    from models import export
    from models.audio_text import load_run
    from models.loading import load_audio_encoder

    out = tmp_path / "run"
    train.train(train.parse_args(flags(tiny_audio_text, out, *VARIANTS[variant][0], "--dropout", "0")))
    export.export_run(out, tmp_path / "merged")
    features = torch.randn(2, 128, 200, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = load_run(out).audio_tower(features)
        merged = load_audio_encoder(tmp_path / "merged")(features)
    torch.testing.assert_close(merged, trained, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        untrained = load_run(out, with_adapter=False).audio_tower(features)
    assert (trained - untrained).abs().max() > 1e-4  # the adapter changed the tower beyond that tolerance


def test_list_targets_counts_each_layers_own_rank(tiny_audio_text, tmp_path, capsys):
    base = flags(tiny_audio_text, tmp_path / "run", "--list-targets")
    train.main(base)
    plain = capsys.readouterr().out
    train.main(base + ["--rank-pattern", "q_proj=4"])
    patterned = capsys.readouterr().out
    # the demo tower: 2 layers x q_proj (128 -> 128): rank 16 -> 4 removes 2 x 12 x 256 parameters
    assert "LoRA parameters: 32,768" in plain and "LoRA parameters: 26,624" in patterned
