"""train.py and eval.py end to end on a tiny demo subset: learning, what changes, resume, PEFT."""

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import eval as evaluation
import tasks.audio_text
import train
from evaluation.retrieval import encode_clips, retrieval_metrics
from common.state_file import load_state
from data.manifest import read_manifest
from tasks.audio_text import AudioTextTask
from data.demo_models import ensure_demo_models
from data.demo_sounds import ensure_demo_set
from lora import lora_layers
from common.run_files import load_heads
from models.audio_text import build_audio_text_model

USER_TARGETS = "audio_tower.*self_attn.(q|k|v|o)_proj"  # the user's own string, as typed


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    sounds = ensure_demo_set(root / "sounds", n_train=48, n_eval=16, seed=0, verbose=False)
    towers = ensure_demo_models(root / "towers", sounds["captions"], seed=0, verbose=False)
    return {**towers, "train": sounds["train"], "eval": sounds["eval"]}


def args_for(demo, out, *extra):
    return train.parse_args([
        "--targets", USER_TARGETS, "--audio-model", demo["audio_model"], "--text-model", demo["text_model"],
        "--train-data", demo["train"], "--eval-data", demo["eval"], "--output-dir", str(out),
        "--batch-size", "8", "--workers", "0", "--lr", "3e-3", "--warmup-steps", "3", *extra,
    ])


@pytest.fixture(scope="module")
def trained(tiny_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    model, history = train.train(args_for(tiny_demo, out, "--max-steps", "36", "--eval-every", "0",
                                          "--save-every", "0"))
    return out, model, history


def test_short_run_lowers_loss_raises_recall_and_writes_every_output(trained, tiny_demo):
    out, _, history = trained
    expected = {"adapter_model.safetensors", "adapter_config.json", "heads.safetensors", "run_config.json",
                "metrics.jsonl", "training_curves.png", train.STATE_FILE}
    assert expected <= {p.name for p in out.iterdir()}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 36 and np.mean(losses[-6:]) < np.mean(losses[:6])
    steps = [r for r in records if "loss" in r]
    assert all(r["examples_per_s"] > 0 and 0 <= r["data_wait_s"] for r in steps)

    def recall(metrics):
        return sum(metrics[d][k] for d in ("text_to_audio", "audio_to_text") for k in ("R@1", "R@5", "R@10"))

    assert recall(history["after"]) > recall(history["before"])
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = json.loads((out / "run_config.json").read_text())
    assert run["train_data"] == tiny_demo["train"] and run["eval_data"] == tiny_demo["eval"]
    assert run["targets"] == [USER_TARGETS]


def test_user_targets_select_q_k_v_of_every_audio_layer(trained):
    _, model, _ = trained
    injected = sorted(lora_layers(model))
    n_layers = len(model.audio_tower.layers)
    assert injected == sorted(f"audio_tower.layers.{i}.self_attn.{p}_proj" for i in range(n_layers) for p in "qkv")


def test_only_lora_and_heads_changed(trained, tiny_demo):
    _, model, _ = trained
    fresh = build_audio_text_model(tiny_demo["audio_model"], tiny_demo["text_model"], 256, seed=0)
    trained_state = model.state_dict()
    for name, before in fresh.state_dict().items():
        after = trained_state[name]
        if name.split(".")[0] in AudioTextTask.heads:
            assert not torch.equal(before, after), f"head {name} did not train"
        else:
            assert torch.equal(before, after), f"frozen {name} changed"
    lora_b = [t for n, t in trained_state.items() if n.endswith("lora_B.weight")]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)


def test_eval_reproduces_the_final_recall_and_writes_json_and_embeddings(trained, tmp_path):
    out, _, history = trained
    metrics = evaluation.main(["--checkpoint", str(out), "--json", str(tmp_path / "m.json"),
                               "--save-embeddings", str(tmp_path / "e.npz")])
    for direction in ("text_to_audio", "audio_to_text"):
        for name, value in history["after"][direction].items():
            assert metrics[direction][name] == pytest.approx(value, abs=1e-9)
    assert json.loads((tmp_path / "m.json").read_text())["n_audio"] == 16
    arrays = np.load(tmp_path / "e.npz")
    assert arrays["audio"].shape[0] == 16 and arrays["text"].shape[0] == arrays["text_audio_index"].shape[0]
    recomputed = retrieval_metrics(arrays["text"] @ arrays["audio"].T, arrays["text_audio_index"])
    assert recomputed == metrics
    without = evaluation.main(["--checkpoint", str(out), "--no-adapter"])
    assert without != metrics


def test_saved_adapter_loads_with_peft_onto_the_same_dual_encoder(trained, tiny_demo):
    from peft import PeftModel

    out, _, _ = trained
    ours, tokenizer, _ = evaluation.load_checkpoint(out)
    base = build_audio_text_model(tiny_demo["audio_model"], tiny_demo["text_model"], 256, seed=0)
    load_heads(base, out / "heads.safetensors")
    reference = PeftModel.from_pretrained(base, out).eval()
    clips = read_manifest(tiny_demo["eval"])[:4]
    ours_audio, ours_text, _ = encode_clips(ours, tokenizer, clips, progress=False)
    ref_audio, ref_text, _ = encode_clips(reference.base_model.model, tokenizer, clips, progress=False)
    np.testing.assert_allclose(ours_audio, ref_audio, atol=1e-6)
    np.testing.assert_allclose(ours_text, ref_text, atol=1e-6)


def test_resume_gives_the_losses_of_an_uninterrupted_run(tiny_demo, tmp_path, monkeypatch):
    # 48 clips / batch 8 = 6 batches an epoch: the checkpoint at step 9 falls mid-epoch 1
    steps = ["--max-steps", "15", "--save-every", "9", "--eval-every", "0", "--dropout", "0.3"]
    train.train(args_for(tiny_demo, tmp_path / "whole", *steps))

    real_save = train.save_outputs

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt  # as if the machine went away right after the checkpoint

    monkeypatch.setattr(train, "save_outputs", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train.train(args_for(tiny_demo, tmp_path / "resumed", *steps))
    monkeypatch.setattr(train, "save_outputs", real_save)
    train.train(args_for(tiny_demo, tmp_path / "resumed", *steps, "--resume"))

    def losses(run):
        return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "loss" in r]

    whole, resumed = losses(tmp_path / "whole"), losses(tmp_path / "resumed")
    assert [s for s, _ in resumed] == list(range(1, 16))
    assert resumed == whole
    a = load_state(tmp_path / "whole" / train.STATE_FILE)["trainable"]
    b = load_state(tmp_path / "resumed" / train.STATE_FILE)["trainable"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_needs_resume_and_bad_targets_stop_before_training(trained, tiny_demo, tmp_path, capsys):
    out, _, _ = trained
    with pytest.raises(train.TrainingError, match="--resume"):
        train.train(args_for(tiny_demo, out, "--max-steps", "2"))
    args = args_for(tiny_demo, tmp_path / "x", "--max-steps", "2")
    args.targets = [r"audio_tower.*self_attn\.o_proj"]
    with pytest.raises(train.TrainingError, match="out_proj"):
        train.train(args)
    assert not (tmp_path / "x").exists()


def test_list_targets_explains_o_proj_and_exits(tiny_demo, tmp_path, capsys):
    code = train.list_targets(args_for(tiny_demo, tmp_path / "y", "--list-targets"))
    printed = capsys.readouterr().out
    assert code == 0
    assert "audio_tower.layers.{0..1}.self_attn.{k,q,v}_proj" in printed
    assert "'o_proj'" in printed and "exists nowhere" in printed and "self_attn.out_proj" in printed
    assert not (tmp_path / "y").exists()


def test_skip_policy_counts_a_missing_file(tiny_demo, tmp_path, capsys):
    manifest = tmp_path / "train.jsonl"
    lines = open(tiny_demo["train"]).read().splitlines()[:16]
    base = str(Path(tiny_demo["train"]).parent)
    rows = [json.loads(line) | {"audio": f"{base}/{json.loads(line)['audio']}"} for line in lines]
    rows.append({"audio": str(tmp_path / "gone.wav"), "text": "a missing clip"})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = args_for(tiny_demo, tmp_path / "run", "--max-steps", "2", "--eval-every", "0")
    args.train_data, args.eval_data = str(manifest), None
    with pytest.raises(train.TrainingError, match="--on-bad-audio skip"):
        train.train(copy.copy(args))
    args.on_bad_input = "skip"
    train.train(args)
    assert "skipped inputs: 1" in capsys.readouterr().out


def losses_of(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_grad_checkpointing_gives_the_same_losses(tiny_demo, tmp_path):
    steps = ["--max-steps", "3", "--eval-every", "0", "--save-every", "0"]
    train.train(args_for(tiny_demo, tmp_path / "plain", *steps))
    model, _ = train.train(args_for(tiny_demo, tmp_path / "ckpt", *steps, "--grad-checkpointing"))
    assert model.audio_tower.gradient_checkpointing
    np.testing.assert_allclose(losses_of(tmp_path / "ckpt"), losses_of(tmp_path / "plain"), rtol=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_autocast_keeps_lora_fp32_and_trains(tiny_demo, tmp_path, precision):
    model, _ = train.train(args_for(tiny_demo, tmp_path / precision, "--max-steps", "3", "--eval-every", "0",
                                    "--precision", precision))
    assert {layer.lora_A.weight.dtype for layer in lora_layers(model).values()} == {torch.float32}
    losses = losses_of(tmp_path / precision)
    assert len(losses) == 3 and np.isfinite(losses).all()
    assert json.loads((tmp_path / precision / "run_config.json").read_text())["precision"] == precision


def poison_audio_proj(monkeypatch, bad_steps):
    """audio_proj returns NaN in the training forwards of the given (1-based) steps, and in their re-runs."""
    real_build = tasks.audio_text.build_audio_text_model
    state = {"calls": 0, "rerun": False}

    def build(*args, **kwargs):
        model = real_build(*args, **kwargs)

        def hook(module, inputs, output):
            if not module.training:
                return None  # evaluation forwards stay clean
            if not torch.is_grad_enabled():  # the guard's diagnostic re-run of a bad step
                return output * float("nan") if state.pop("rerun", False) else None
            state["calls"] += 1
            if state["calls"] in bad_steps:
                state["rerun"] = True
                return output * float("nan")
            return None

        model.audio_proj.register_forward_hook(hook)
        return model

    monkeypatch.setattr(tasks.audio_text, "build_audio_text_model", build)
    return state


def lr_factor(step: int, warmup: int, total: int) -> float:
    """The schedule train.py must follow, written out in floats: linear warmup over `warmup` updates,
    then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def test_nonfinite_step_is_skipped_named_and_training_goes_on(tiny_demo, tmp_path, monkeypatch, capsys):
    poison_audio_proj(monkeypatch, bad_steps={3})
    out = tmp_path / "nan"
    train.train(args_for(tiny_demo, out, "--max-steps", "5", "--eval-every", "0"))
    printed = capsys.readouterr()
    assert "first non-finite output: audio_proj (Linear)" in printed.out + printed.err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    bad = [r for r in records if "nonfinite" in r]
    assert len(bad) == 1 and bad[0]["step"] == 2 and bad[0]["nonfinite"]["first_module"] == "audio_proj (Linear)"
    assert len(bad[0]["nonfinite"]["paths"]) == 8
    good = [r for r in records if "loss" in r]
    assert [r["step"] for r in good] == [1, 2, 3, 4, 5] and all(np.isfinite(r["loss"]) for r in good)
    # the skipped batch did not advance the schedule: update i used the lr of update i, skip or not
    lrs = [r["lr"] for r in good]
    assert lrs == pytest.approx([3e-3 * lr_factor(i, 3, 5) for i in range(5)], rel=1e-6)


def test_too_many_nonfinite_steps_abort_and_keep_the_last_good_checkpoint(tiny_demo, tmp_path, monkeypatch):
    poison_audio_proj(monkeypatch, bad_steps=set(range(3, 100)))
    out = tmp_path / "abort"
    with pytest.raises(train.TrainingError,
                       match="3 non-finite steps in a row .*audio_proj.*last good checkpoint is kept"):
        train.train(args_for(tiny_demo, out, "--max-steps", "20", "--eval-every", "0", "--save-every", "2",
                             "--max-bad-steps", "3"))
    state = load_state(out / train.STATE_FILE)
    assert state["step"] == 2 and all(torch.isfinite(t).all() for t in state["trainable"].values())


def test_diagnose_flag_exits_zero_on_a_healthy_model(tiny_demo, tmp_path, capsys):
    assert train.run_diagnosis(args_for(tiny_demo, tmp_path / "d", "--diagnose")) == 0
    assert "LoRA gradient-flow diagnosis: healthy" in capsys.readouterr().out


def test_adamw_never_decays_logit_scale_biases_or_norms(trained):
    _, model, _ = trained
    decay, no_decay = train.param_groups(model, weight_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.5 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == {"audio_proj.bias", "text_proj.bias", "logit_scale"}
    assert all(names[id(p)].endswith(("lora_A.weight", "lora_B.weight", "proj.weight")) for p in decay["params"])


def test_feature_cache_cold_warm_and_off_give_the_same_losses(tiny_demo, tmp_path):
    """The feature cache is an optimisation with no visible effect: the same bits, cold or warm or off."""
    steps = ["--max-steps", "4", "--eval-every", "0", "--save-every", "0", "--dropout", "0",
             "--cache-dir", str(tmp_path / "cache")]
    train.train(args_for(tiny_demo, tmp_path / "cold", *steps))
    entries = lambda: {p: p.stat().st_mtime_ns  # noqa: E731
                       for p in (tmp_path / "cache" / "features").rglob("*.safetensors")}
    filled = entries()
    assert filled  # the first run filled it
    train.train(args_for(tiny_demo, tmp_path / "warm", *steps))
    assert entries() == filled  # the warm run found every clip it read: nothing computed or written again
    train.train(args_for(tiny_demo, tmp_path / "off", *steps, "--no-feature-cache"))
    assert losses_of(tmp_path / "cold") == losses_of(tmp_path / "warm") == losses_of(tmp_path / "off")


def test_text_cache_serves_a_frozen_text_tower_only_and_changes_nothing(tiny_demo, tmp_path, monkeypatch):
    from models.text_cache import FrozenTextCache

    calls, real, frozen = [], FrozenTextCache.pooled, AudioTextTask.text_tower_frozen
    monkeypatch.setattr(FrozenTextCache, "pooled", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    steps = ["--max-steps", "3", "--eval-every", "0", "--save-every", "0", "--dropout", "0"]
    train.train(args_for(tiny_demo, tmp_path / "cached", *steps))
    assert calls  # frozen text tower: every step read the cache
    monkeypatch.setattr(AudioTextTask, "text_tower_frozen", lambda self: False)  # as if it trained: recompute
    calls.clear()
    train.train(args_for(tiny_demo, tmp_path / "recomputed", *steps))
    assert not calls  # this run really recomputed every step's text features
    np.testing.assert_allclose(losses_of(tmp_path / "cached"), losses_of(tmp_path / "recomputed"), rtol=0, atol=1e-5)

    calls.clear()
    monkeypatch.setattr(AudioTextTask, "text_tower_frozen", frozen)
    model, _ = train.train(args_for(tiny_demo, tmp_path / "text-lora", *steps,
                                    "--targets", r"text_tower.*\.(query|value)"))
    # a training text tower is never cached
    assert any(p.requires_grad for p in model.text_tower.parameters()) and not calls
