"""`--quantize nf4` end to end, for every task: the frozen Linear layers of the base are NF4 after loading
(LoRA targets included, the trained heads and the output head not), two steps train only LoRA and the
heads, a stopped run resumes bit for bit, and eval.py / load_run rebuild the run over the same NF4
weights (the same numbers as the run's own evaluation)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import eval as evaluation
import train
from common.state_file import load_state
from data.demo_audio_qa import ensure_demo_audio_qa
from data.demo_models import ensure_demo_instructblip
from data.demo_shapes import ensure_shapes_set
from lora import lora_layers
from lora.quant import NF4Linear, NF4Tensor
from models.audio_text import load_run

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_sets(tiny_audio_text, tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    shapes = ensure_shapes_set(root / "shapes", n_train=16, n_eval=4, image_size=64, verbose=False)
    blip = ensure_demo_instructblip(root / "instructblip", shapes["texts"], verbose=False)
    qa = ensure_demo_audio_qa(root / "audio-qa", n_train=8, n_eval=2, verbose=False)
    return {
        "audio-text": ["--audio-model", tiny_audio_text["audio_model"], "--text-model", tiny_audio_text["text_model"],
                       "--train-data", tiny_audio_text["train"], "--eval-data", tiny_audio_text["eval"]],
        "instructblip": ["--task", "instructblip", "--model", blip, "--train-data", shapes["train"],
                         "--eval-data", shapes["eval"], "--train-also", "language_projection"],
        "audio-qa": ["--task", "audio-qa", "--model", qa["model"], "--train-data", qa["train_data"],
                     "--eval-data", qa["eval_data"], "--train-also", "multi_modal_projector"],
    }


def flags(tiny_sets, task, out, *extra):
    return [*tiny_sets[task], "--quantize", "nf4", "--output-dir", str(out), "--batch-size", "4", "--workers", "0",
            "--eval-every", "0", "--save-every", "0", "--lr", "3e-3", "--warmup-steps", "1", *extra]


def losses(run) -> list:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


@pytest.mark.parametrize("task", ["audio-text", "instructblip", "audio-qa"])
def test_nf4_trains_two_steps_and_resumes_bit_for_bit(tiny_sets, tmp_path, monkeypatch, task):
    whole = tmp_path / "whole"
    model, _ = train.train(train.parse_args(flags(tiny_sets, task, whole, "--max-steps", "3")))
    run = json.loads((whole / "run_config.json").read_text())
    assert run["quantize"] == "nf4"
    quantized = [path for path, m in model.named_modules() if isinstance(m, NF4Linear)]
    plain = [path for path, m in model.named_modules() if type(m) is nn.Linear and ".lora_" not in path]
    # every LoRA base is NF4; what stays a 16-bit Linear is a trained head or an output head
    assert quantized and all(isinstance(layer.weight, NF4Tensor) for layer in lora_layers(model).values())
    kept = tuple(run["quantize_keep"]) + ("lm_head", "language_model.lm_head", "audio_proj", "text_proj")
    assert all(path.startswith(kept) or path.endswith("lm_head") for path in plain), plain
    assert all(not p.requires_grad for path, p in model.named_parameters()
               if any(path.startswith(q + ".") for q in quantized))  # the NF4 layers' biases are frozen

    real_save = train.save_outputs

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt  # as if the machine went away right after the checkpoint

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(train, "save_outputs", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train.train(train.parse_args(flags(tiny_sets, task, resumed, "--max-steps", "3", "--save-every", "2")))
    monkeypatch.setattr(train, "save_outputs", real_save)
    train.train(train.parse_args(flags(tiny_sets, task, resumed, "--max-steps", "3", "--save-every", "2", "--resume")))
    assert losses(resumed) == losses(whole) and len(losses(whole)) == 3
    a, b = (load_state(run / train.STATE_FILE)["trainable"] for run in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().sum() > 0 for k in a)  # LoRA trained over NF4

    with pytest.raises(train.TrainingError, match="quantize: saved 'nf4', now 'none'"):
        args = flags(tiny_sets, task, resumed, "--max-steps", "3", "--resume")
        args[args.index("--quantize") + 1] = "none"
        train.train(train.parse_args(args))

    metrics = evaluation.main(["--checkpoint", str(whole)])  # rebuilt with the NF4 weights it was trained over
    after = [json.loads(line)["eval"] for line in (whole / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line][-1]
    key = "text_to_audio" if task == "audio-text" else "loss"
    assert metrics[key] == after[key]


def test_load_run_rebuilds_an_nf4_audio_text_run(tiny_sets, tmp_path):
    out = tmp_path / "run"
    train.train(train.parse_args(flags(tiny_sets, "audio-text", out, "--max-steps", "2")))
    model = load_run(out)
    assert any(isinstance(m, NF4Linear) for m in model.audio_tower.modules())
    assert any(isinstance(m, NF4Linear) for m in model.text_tower.modules())
    assert type(model.audio_proj) is nn.Linear  # a trained head, never quantized


def test_the_export_of_an_nf4_run_merges_onto_the_16_bit_originals(tiny_sets, tiny_audio_text, tmp_path):
    """The adapter was trained over Q(W), the NF4 rounding of W; the export writes W + s·B@A in W's own
    dtype, from the checkpoint's original W, not Q(W) + s·B@A: a 16-bit checkpoint that does not carry
    4-bit rounding errors (QLoRA's own practice)."""
    from lora.adapter import read_adapter_config, read_adapter_weights
    from lora.quant import quantize_nf4
    from models import export
    from safetensors.torch import load_file

    run = tmp_path / "run"
    train.train(train.parse_args(flags(tiny_sets, "audio-text", run, "--max-steps", "2")))
    record = export.export_run(run, tmp_path / "merged")
    [report] = record["bases"]
    original = load_file(str(next(p for p in (tmp_path / "merged").rglob("*.safetensors")
                                  if p.name != "heads.safetensors")))
    base = load_file(str(next(Path(tiny_audio_text["audio_model"]).glob("*.safetensors"))))
    config, weights = read_adapter_config(run), read_adapter_weights(run)
    assert report["replaced_keys"]
    for key in report["replaced_keys"]:  # e.g. audio_tower.layers.0.self_attn.q_proj.weight
        module = key.removesuffix(".weight")
        a, b = weights[module]["lora_A"].float(), weights[module]["lora_B"].float()
        delta = (b @ a) * config.scaling  # LinearWithLoRA.delta_weight, in fp32
        expected = (base[key].float() + delta).to(base[key].dtype)
        assert torch.equal(original[key], expected), key
        on_dequantized = (quantize_nf4(base[key]).dequantize().float() + delta).to(base[key].dtype)
        assert not torch.equal(original[key], on_dequantized), key


def test_nf4_under_bf16_autocast_trains(tiny_sets, tmp_path):
    out = tmp_path / "bf16"
    model, _ = train.train(train.parse_args(flags(tiny_sets, "audio-qa", out, "--max-steps", "2",
                                                  "--precision", "bf16")))
    assert all(layer.lora_A.weight.dtype == torch.float32 for layer in lora_layers(model).values())  # LoRA stays fp32
    assert len(losses(out)) == 2 and all(math.isfinite(loss) for _, loss in losses(out))


def test_two_processes_train_the_nf4_run_of_one(tiny_sets, tmp_path):
    """torchrun: DDP broadcasts the NF4 buffers with the parameters, and the global batch gives the same run."""
    one, two = tmp_path / "one", tmp_path / "two"
    train.train(train.parse_args(flags(tiny_sets, "audio-text", one, "--max-steps", "3", "--dropout", "0")))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", *flags(tiny_sets, "audio-text", two, "--max-steps", "3", "--dropout", "0")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert json.loads((two / "run_config.json").read_text())["world_size"] == 2
    assert [loss for _, loss in losses(two)] == pytest.approx([loss for _, loss in losses(one)], abs=1e-4)


def test_a_frozen_language_projection_is_quantized_too(tiny_sets):
    """language_projection is a bare Linear of InstructBLIP: without --train-also it is frozen base, so NF4."""
    from models import load_instructblip
    from models.shard_loading import Quantize

    blip = tiny_sets["instructblip"][tiny_sets["instructblip"].index("--model") + 1]
    model = load_instructblip(blip, quantize=Quantize())
    assert isinstance(model.language_projection, NF4Linear)
    assert type(model.language_model.lm_head) is nn.Linear  # the output head stays 16-bit
    kept = load_instructblip(blip, quantize=Quantize(keep=("language_projection",)))
    assert type(kept.language_projection) is nn.Linear
