"""SIGINT and SIGTERM at random moments of training, on 1 process and on 2 (torchrun, gloo): the run
finishes its step, saves, prints the command that continues it and exits 130 / 143; that command
then ends with the adapter and heads of an uninterrupted run, bit for bit (CPU, one thread per
process: the same kernels on the same shapes in both runs)."""

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.graceful_stop import Interrupted, StopRequests
from tests.conftest import train_flags

REPO = Path(__file__).resolve().parents[2]
# train.py with each optimizer step made 50 ms longer, so that a tiny run lasts long enough to be
# signalled at a random moment of it (the sleep changes no number)
SLOW_TRAIN = f"""
import sys, time
sys.path.insert(0, {str(REPO)!r})
import train
launch_step = train.train_step
def slow_step(*args, **kwargs):
    time.sleep(0.05)
    return launch_step(*args, **kwargs)
train.train_step = slow_step
sys.exit(train.main(sys.argv[1:]))
"""
TIMEOUT = 240  # seconds for one tiny run; a hang must fail, not block CI
STEPS = 14  # 48 clips / 8 = 6 global batches an epoch: the runs cross two epoch ends



def flags(tiny, out, workers=1):
    # dropout on, so the RNG must be restored; log every 3 steps, so a stop can fall among unread steps
    return train_flags(tiny, out, cache_dir=tiny["root"] / "cache", batch_size=8, workers=workers, max_steps=STEPS,
                       log_every=3, dropout=0.1, lr="3e-3", warmup_steps=2)

def launch(tiny, args, nproc=1):
    """SLOW_TRAIN in its own session (so a signal to the group reaches it as a terminal's Ctrl-C would,
    its DataLoader workers included), one thread a process."""
    script = tiny["root"] / "slow_train.py"
    script.write_text(SLOW_TRAIN)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.Popen(launcher + [str(script)] + args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(process) -> tuple[int, str]:
    try:
        out, err = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return process.returncode, out + err


def logged_steps(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return sum('"loss"' in line for line in metrics.read_text().splitlines()) if metrics.exists() else 0


def signal_at_a_random_moment(process, out: Path, rng: random.Random, send):
    """Wait until a random number of steps is logged, then a random fraction of a step more, and send."""
    target, deadline = rng.randint(1, STEPS - 5), time.monotonic() + TIMEOUT
    while process.poll() is None and logged_steps(out) < target and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.15))  # up to three steps more
    assert process.poll() is None, "the run ended before it could be signalled"
    send()


def assert_same_weights(out: Path, reference: Path):
    for name in ("adapter_model.safetensors", "heads.safetensors"):
        ours, theirs = load_file(str(out / name)), load_file(str(reference / name))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name


def losses(run: Path) -> list:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def stop_and_resume(tiny, name: str, signum: int, nproc: int, reference: Path, to_group: bool):
    out, rng = tiny["root"] / name, random.Random(f"{name}-{time.time_ns()}")  # random moments, named on failure
    workers = 1 if nproc == 1 else 0
    process = launch(tiny, flags(tiny, out, workers), nproc)

    def send():
        if to_group:
            os.killpg(process.pid, signum)
        else:  # one rank alone: the other hears nothing, and must still stop after the same step
            rank_pids = [int(p) for p in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]
            os.kill(rng.choice(rank_pids), signum)

    signal_at_a_random_moment(process, out, rng, send)
    code, output = finish(process)
    stopped = re.search(r"stopped at step (\d+); continue with: (.+)", output)
    assert stopped, output[-3000:]
    if nproc == 1:
        assert code == 128 + signum, output[-3000:]
    step, command = int(stopped.group(1)), shlex.split(stopped.group(2))
    assert (0 < step < STEPS and command[-1] == "--resume"
            and command[-len(flags(tiny, out, workers)) - 1:-1] == flags(tiny, out, workers))
    assert output.count("stopped at step") == 1  # rank 0 alone says it
    assert json.loads(Path(out / "run_config.json").read_text())["world_size"] == nproc
    assert logged_steps(out) == step  # every finished step was logged before the checkpoint

    code, output = finish(launch(tiny, command[command.index("train.py") + 1:], nproc))
    assert code == 0, output[-3000:]
    assert_same_weights(out, reference)
    assert losses(out) == losses(reference) and len(losses(out)) == STEPS


@pytest.fixture(scope="module")
def reference_1(tiny):
    out = tiny["root"] / "reference-1"
    code, output = finish(launch(tiny, flags(tiny, out)))
    assert code == 0, output[-3000:]
    return out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_one_process_stops_saves_and_resumes_to_the_uninterrupted_run(tiny, reference_1, signum):
    stop_and_resume(tiny, f"stopped-1-{signum}", signum, 1, reference_1, to_group=True)


def test_two_processes_stop_after_the_same_step_when_one_rank_is_signalled(tiny):
    out = tiny["root"] / "reference-2"
    code, output = finish(launch(tiny, flags(tiny, out, workers=0), nproc=2))
    assert code == 0, output[-3000:]
    stop_and_resume(tiny, "stopped-2", signal.SIGTERM, 2, out, to_group=False)


def test_the_first_signal_is_a_request_the_second_ctrl_c_interrupts():
    said = []
    with StopRequests(say=said.append) as stop:
        with pytest.raises(Interrupted):  # setup: nothing to save, so a signal stops at once
            stop.handle(signal.SIGTERM, None)
        stop.armed = True
        stop.handle(signal.SIGTERM, None)
        assert stop.signum == signal.SIGTERM and stop.agreed() == signal.SIGTERM and len(said) == 1
        stop.handle(signal.SIGTERM, None)  # SLURM's and torchrun's: the same request twice
        with pytest.raises(Interrupted) as interrupt:
            stop.handle(signal.SIGINT, None)
        assert interrupt.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # pytest's handler is back
