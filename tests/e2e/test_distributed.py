"""One run, however it is split: 1 process or 2 (torchrun, gloo), whole batch or micro-batches.

The same command must train the same run: per-step losses (the global batch's) and the final
adapter of 2 ranks x 16, of 1 process with 4 accumulation steps of 8, and of 2 ranks x 4
accumulation steps of 4 equal those of one process taking all 32 at once (fp32, dropout 0).
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from tests.conftest import build_task, train_flags
from tests.lora_fixtures import give_lora_B_values
from common.state_file import StateFileError, load_state
from data.demo_models import ensure_demo_instructblip, ensure_demo_models
from data.demo_shapes import ensure_shapes_set
from data.demo_sounds import ensure_demo_set
from engine.training import StepEnv
from lora import LoRAConfig, inject_lora, mark_only_lora_trainable
from models.contrastive import caption_keys, contrastive_loss, contrastive_targets, pad_columns

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 240  # seconds for one torchrun of a few tiny steps; a hang must fail, not block CI
STEPS = 6  # 64 clips / 32 = 2 global batches an epoch: the runs cross epochs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    sounds = ensure_demo_set(root / "sounds", n_train=64, n_eval=16, seed=0, verbose=False)
    towers = ensure_demo_models(root / "towers", sounds["captions"], seed=0, verbose=False)
    return {**towers, "train": sounds["train"], "eval": sounds["eval"], "root": root}


def flags(tiny, out, *extra):
    return train_flags(tiny, out, *extra, batch_size=32, max_steps=STEPS, dropout=0, lr="1e-3", warmup_steps=1)

def torchrun(args, nproc=2, log=None, script="train.py"):
    """`torchrun --standalone` of train.py in a subprocess: a free port, one thread per process.
    With a log file, start it in its own session and return the Popen (to be killed)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
               *args]
    if log:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def adapter(out: Path) -> dict:
    return load_file(str(out / "adapter_model.safetensors"))


def assert_same_run(out: Path, reference: Path):
    assert losses(out) == pytest.approx(losses(reference), abs=1e-4)
    ours, theirs = adapter(out), adapter(reference)
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=0, msg=key)


@pytest.fixture(scope="module")
def whole_batch(tiny):
    out = tiny["root"] / "whole"
    train.train(train.parse_args(flags(tiny, out)))
    assert len(losses(out)) == STEPS
    return out


def test_one_process_with_four_accumulation_steps_trains_the_same_run(tiny, whole_batch):
    out = tiny["root"] / "micro8"
    train.train(train.parse_args(flags(tiny, out, "--micro-batch-size", "8")))
    assert json.loads((out / "run_config.json").read_text())["micro_batch_size"] == 8
    assert_same_run(out, whole_batch)


@pytest.mark.parametrize("micro", [None, "4"], ids=["2x16", "2x4x4"])
def test_two_processes_train_the_same_run(tiny, whole_batch, micro):
    out = tiny["root"] / f"ddp-{micro}"
    result = torchrun(flags(tiny, out, *(["--micro-batch-size", micro] if micro else [])))
    assert result.returncode == 0, result.stdout + result.stderr
    run = json.loads((out / "run_config.json").read_text())
    assert run["world_size"] == 2 and run["micro_batch_size"] == int(micro or 16)
    assert result.stdout.count("done:") == 1  # rank 0 alone prints and writes
    assert_same_run(out, whole_batch)


def kill_after_a_checkpoint(args, out: Path, log_path: Path, at_step: int = 2) -> int:
    """A 2-process torchrun of train.py (saving every step), SIGKILLed on every rank at once as soon as its
    saved state reaches `at_step`; returns the step it was killed at (None: the run ended or timed out first)."""
    log = open(log_path, "w")
    process = torchrun(args, log=log)
    state_file, deadline, killed_at = out / train.STATE_FILE, time.monotonic() + TIMEOUT, None
    try:
        while killed_at is None and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
            with contextlib.suppress(StateFileError):  # not written yet
                step = load_state(state_file)["step"]
                if step >= at_step:
                    os.killpg(process.pid, signal.SIGKILL)  # every rank at once, mid-run
                    killed_at = step
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        log.close()
    return killed_at


def test_resume_after_a_kill_on_another_number_of_processes(tiny, whole_batch):
    out = tiny["root"] / "killed"
    killed_at = kill_after_a_checkpoint(flags(tiny, out, "--save-every", "1"), out, tiny["root"] / "killed.log")
    assert killed_at is not None and killed_at < STEPS, (tiny["root"] / "killed.log").read_text()

    history = train.train(train.parse_args(flags(tiny, out, "--save-every", "1", "--resume")))  # 1 process now
    assert history is not None
    assert_same_run(out, whole_batch)
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r] == list(range(1, STEPS + 1))

    with pytest.raises(train.TrainingError, match=r"lr: saved 0\.001, now 0\.002") as error:
        train.train(train.parse_args(flags(tiny, out, "--resume", "--lr", "2e-3", "--rank", "8")))
    assert "rank: saved 16, now 8" in str(error.value)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through Linux's /proc")
def test_a_finished_run_tears_its_process_group_down(tiny, tmp_path):
    """When train() returns, no gloo thread is left alive: one left to interpreter shutdown can free a
    collective's tensors while Python is torn down and abort a run that went well (seen in CI)."""
    script = tmp_path / "train_then_list_threads.py"
    script.write_text(f"import os, sys\nsys.path.insert(0, {str(REPO)!r})\nimport train\n"
                      "train.train(train.parse_args(sys.argv[1:]))\n"
                      "names = [open(f'/proc/self/task/{t}/comm').read().strip() "
                      "for t in os.listdir('/proc/self/task')]\n"
                      "print('threads after train():', sorted(names), flush=True)\n")
    result = torchrun(flags(tiny, tmp_path / "out", "--max-steps", "1"), script=script)
    assert result.returncode == 0, result.stdout + result.stderr
    listed = [line for line in result.stdout.splitlines() if line.startswith("threads after train():")]
    assert len(listed) == 2 and not any("gloo" in line for line in listed), listed


def test_a_trainable_parameter_off_the_forward_path_is_named_under_ddp(tiny):
    out = tiny["root"] / "off-path"
    result = torchrun(flags(tiny, out, "--train-also", "text_tower.pooler", "--max-steps", "2"))
    assert result.returncode != 0
    printed = result.stdout + result.stderr
    assert "text_tower.pooler.dense.weight" in printed and "--diagnose" in printed
    assert "Expected to have finished reduction" not in printed  # not DDP's generic error


def test_sizes_that_do_not_divide_are_refused_with_the_numbers_that_would(tiny):
    with pytest.raises(train.TrainingError, match=r"--micro-batch-size 5 does not divide the 32 .* 1, 2, 4, 8, 16, 32"):
        train.train(train.parse_args(flags(tiny, tiny["root"] / "bad-micro", "--micro-batch-size", "5")))


def micro_batches(task, n_micro: int, size: int):
    items = [task.dataset[i] for i in range(n_micro * size)]
    return [task.collate(items[i * size : (i + 1) * size]) for i in range(n_micro)]


def lora_model(tiny, dropout: str):
    args = train.parse_args(flags(tiny, tiny["root"] / "unused", "--dropout", dropout))
    task, targets = build_task(args)
    inject_lora(task.model, LoRAConfig(targets, r=4, alpha=8, dropout=float(dropout)))
    mark_only_lora_trainable(task.model, also=task.heads)
    give_lora_B_values(task.model, 0.1)  # a non-zero B, so LoRA and its dropout change the embeddings
    train.set_train_mode(task.model)
    return task


def gradients(model) -> dict:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def test_grad_cache_replays_dropout_and_gives_the_gradient_of_the_whole_batch(tiny):
    task = lora_model(tiny, dropout="0.3")
    model, env = task.model, StepEnv(torch.device("cpu"), contextlib.nullcontext, lambda loss: loss.backward())
    batches = micro_batches(task, n_micro=3, size=4)
    embeds = []
    hook = model.register_forward_hook(lambda module, args, out: embeds.append(out.audio_embeds.detach().clone()))
    torch.manual_seed(7)
    loss = task.forward_backward(model, batches, env)
    hook.remove()
    after = torch.get_rng_state()
    cached = gradients(model)
    # pass 1 (3 forwards without grad) and pass 2 (3 with grad) drew the same dropout masks
    assert len(embeds) == 6 and all(torch.equal(embeds[i], embeds[i + 3]) for i in range(3))
    assert not torch.equal(embeds[0], embeds[1][: len(embeds[0])])

    # the same three forwards with grad, kept together: the memory-hungry way GradCache replaces
    torch.manual_seed(7)
    inputs = [task.inputs(b, env.device) for b in batches]
    outs = [model(**x) for x in inputs]
    keys = [caption_keys(x["input_ids"], x["attention_mask"]) for x in inputs]
    keys = torch.cat([pad_columns(k, max(k.shape[1] for k in keys)) for k in keys])
    reference, _ = contrastive_loss(torch.cat([o.audio_embeds for o in outs]), torch.cat([o.text_embeds for o in outs]),
                                    model.logit_scale, contrastive_targets(keys))
    reference.backward()
    assert torch.equal(torch.get_rng_state(), after)  # training goes on with the RNG where it would be
    torch.testing.assert_close(loss, reference.detach(), atol=1e-6, rtol=0)
    for name, grad in gradients(model).items():
        torch.testing.assert_close(cached[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_grad_cache_without_dropout_equals_one_forward_of_the_whole_batch(tiny):
    task = lora_model(tiny, dropout="0")
    model, env = task.model, StepEnv(torch.device("cpu"), contextlib.nullcontext, lambda loss: loss.backward())
    loss = task.forward_backward(model, micro_batches(task, n_micro=4, size=3), env)
    cached = gradients(model)
    whole = task.forward_backward(model, micro_batches(task, n_micro=1, size=12), env)
    torch.testing.assert_close(loss, whole, atol=1e-5, rtol=0)
    for name, grad in gradients(model).items():
        torch.testing.assert_close(cached[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_instructblip_accumulation_weights_micro_batches_by_answer_tokens(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    shapes = ensure_shapes_set(root / "set", n_train=32, n_eval=8, image_size=64, seed=0, verbose=False)
    model = ensure_demo_instructblip(root / "model", shapes["texts"], seed=0, verbose=False)
    # the Q-Former's own dropout (0.1, as released) runs in train mode: off, so the two runs can agree
    config_path = Path(model) / "config.json"
    config = json.loads(config_path.read_text())
    config["qformer_config"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config_path.write_text(json.dumps(config))

    def run(out, *extra):
        train.train(train.parse_args(["--task", "instructblip", "--model", model, "--train-data", shapes["train"],
                                      "--output-dir", str(out), "--batch-size", "8", "--workers", "0",
                                      "--max-steps", "3", "--eval-every", "0", "--dropout", "0", "--lr", "3e-3",
                                      "--warmup-steps", "1", *extra]))
        return out

    assert_same_run(run(root / "micro2", "--micro-batch-size", "2"), run(root / "whole"))
