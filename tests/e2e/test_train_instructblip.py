"""train.py --task instructblip and eval.py on a tiny shapes set: what trains, what is reported."""

import json

import pytest
import torch

import eval as evaluation
import train
from evaluation.answers import answer_text, normalize_answer
from data.demo_models import ensure_demo_instructblip
from data.demo_shapes import ensure_shapes_set
from models import load_instructblip

QFORMER_TARGETS = r"qformer.*\.(query|key|value)"


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    shapes = ensure_shapes_set(root / "set", n_train=48, n_eval=12, image_size=64, seed=0, verbose=False)
    model = ensure_demo_instructblip(root / "model", shapes["texts"], seed=0, verbose=False)
    return {"model": model, "train": shapes["train"], "eval": shapes["eval"]}


def args_for(shapes, out, *extra):
    return train.parse_args([
        "--task", "instructblip", "--targets", QFORMER_TARGETS, "--model", shapes["model"],
        "--train-data", shapes["train"], "--eval-data", shapes["eval"], "--output-dir", str(out),
        "--batch-size", "8", "--workers", "0", "--lr", "3e-3", "--warmup-steps", "2", *extra,
    ])


@pytest.fixture(scope="module")
def trained(tiny_shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    model, history = train.train(args_for(tiny_shapes, out, "--max-steps", "24", "--eval-every", "0",
                                          "--save-every", "0"))
    return out, model, history


def test_short_run_changes_only_the_qformer_lora_and_lowers_the_loss(trained, tiny_shapes, capsys):
    out, model, history = trained
    fresh = load_instructblip(tiny_shapes["model"])
    state = model.state_dict()
    for name, before in fresh.state_dict().items():
        assert torch.equal(before, state[name]), f"frozen {name} changed"
    changed = [n for n, t in state.items() if ".lora_" in n]
    assert changed and all(n.startswith("qformer.") for n in changed)
    assert all(state[n].abs().sum() > 0 for n in changed if n.endswith("lora_B.weight"))
    assert history["after"]["loss"] < history["before"]["loss"]
    run = json.loads((out / "run_config.json").read_text())
    assert (run["task"] == "instructblip" and run["model"] == tiny_shapes["model"]
            and run["eval_data"] == tiny_shapes["eval"])


def test_start_report_says_where_lora_sits(tiny_shapes, tmp_path, capsys):
    train.train(args_for(tiny_shapes, tmp_path / "r", "--max-steps", "1", "--eval-every", "0"))
    assert "in 12 layers, all inside qformer" in capsys.readouterr().out


def test_train_also_language_projection(tiny_shapes, tmp_path):
    model, _ = train.train(args_for(tiny_shapes, tmp_path / "p", "--max-steps", "3", "--eval-every", "0",
                                    "--train-also", "language_projection"))
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"qformer", "language_projection"}
    fresh = load_instructblip(tiny_shapes["model"])
    assert not torch.equal(fresh.language_projection.weight, model.language_projection.weight)


def test_eval_reproduces_exact_match_and_no_adapter_differs(trained, tmp_path):
    out, _, history = trained
    metrics = evaluation.main(["--checkpoint", str(out), "--json", str(tmp_path / "m.json")])
    assert metrics["exact_match"] == pytest.approx(history["after"]["exact_match"])
    assert metrics["loss"] == pytest.approx(history["after"]["loss"], rel=1e-5)
    assert json.loads((tmp_path / "m.json").read_text())["n_examples"] == 12
    without = evaluation.main(["--checkpoint", str(out), "--no-adapter"])
    assert without["loss"] != pytest.approx(metrics["loss"], rel=1e-6)


def test_fp16_refused_list_targets_and_diagnose(tiny_shapes, tmp_path, capsys):
    with pytest.raises(train.TrainingError, match="fp16 is refused for instructblip"):
        train.train(args_for(tiny_shapes, tmp_path / "a", "--precision", "fp16"))
    args = args_for(tiny_shapes, tmp_path / "b", "--list-targets")
    args.targets = [r"qformer.*(query|key|value)"]
    assert train.list_targets(args) == 1
    printed = capsys.readouterr().out
    assert "qformer.encoder.layer.0.intermediate_query matches but is a ModuleDict" in printed
    assert r"try 'qformer.*\.(query|key|value)'" in printed
    assert train.run_diagnosis(args_for(tiny_shapes, tmp_path / "c", "--diagnose")) == 0
    assert "diagnosis: healthy" in capsys.readouterr().out


def test_answer_text_stops_at_eos_and_exact_match_normalizes(tiny_shapes):
    from models import load_instructblip_tokenizers

    _, t5_tok = load_instructblip_tokenizers(tiny_shapes["model"])
    config = load_instructblip(tiny_shapes["model"]).language_model.config
    red, two = t5_tok.token_to_id("red"), t5_tok.token_to_id("two")
    ids = [config.decoder_start_token_id, red, config.eos_token_id, two, config.pad_token_id]
    eos = {config.eos_token_id}
    assert answer_text(t5_tok, ids, eos, skip_first=True) == "red"
    assert answer_text(t5_tok, [config.decoder_start_token_id, two, red], eos, skip_first=True) == "two red"
    assert normalize_answer("  Red. ") == "red" and normalize_answer("two  red") == "two red"


def test_grad_checkpointing_recomputes_the_frozen_t5_and_keeps_the_losses(tiny_shapes, tmp_path, monkeypatch):
    import models.t5

    real, calls = models.t5.checkpoint, []
    monkeypatch.setattr(models.t5, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    steps = ["--max-steps", "2", "--eval-every", "0", "--dropout", "0"]
    train.train(args_for(tiny_shapes, tmp_path / "plain", *steps))
    assert not calls
    model, _ = train.train(args_for(tiny_shapes, tmp_path / "ckpt", *steps, "--grad-checkpointing"))
    assert not model.language_model.training  # frozen, in eval mode, and still checkpointed
    assert calls  # the T5 blocks ran under checkpoint in the training forwards

    def losses(out):
        return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    assert losses(tmp_path / "ckpt") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)
