"""SIGKILL a run at random moments, in training and inside file writes, then --resume, several
times: the final adapter and heads are bit-identical to an uninterrupted run's (CPU), and every
checkpoint left behind after each kill loads."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import train
from common.state_file import load_state
from tests.conftest import train_flags

REPO = Path(__file__).resolve().parents[2]
# Runs train.main in a fresh process that SIGKILLs itself just before the KILL_AT_REPLACE-th
# os.replace: the moment an atomic write (checkpoint file or feature-cache entry) is half done.
KILLABLE = """
import os, signal, sys
import train
count, kill_at, rename = 0, int(os.environ.get("KILL_AT_REPLACE", "0")), os.replace
def replace(src, dst):
    global count
    count += 1
    if count == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(src, dst)
os.replace = replace
sys.exit(train.main(sys.argv[1:]))
"""



def flags(tiny, out, cache):
    # 6 global batches an epoch: 14 steps cross two epoch ends; dropout on, so the RNG must be restored
    return train_flags(tiny, out, cache_dir=cache, batch_size=8, max_steps=14, save_every=2, log_every=3, dropout=0.1,
                       lr="3e-3", warmup_steps=2)

def check_left_behind(out: Path):
    """Every file a killed run left in its output directory loads."""
    if (out / train.STATE_FILE).exists():
        state = load_state(out / train.STATE_FILE)
        assert state["trainable"] and 0 < state["step"] <= 14
        load_file(str(out / "adapter_model.safetensors"))
        load_file(str(out / "heads.safetensors"))
        json.loads((out / "adapter_config.json").read_text())
        json.loads((out / "run_config.json").read_text())
        [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]


def test_kills_at_random_moments_then_resume_give_the_uninterrupted_run(tiny):
    # in processes alike (one thread each), so that bit-identical is a fair demand
    env, reference = dict(os.environ, OMP_NUM_THREADS="1", KILL_AT_REPLACE="0"), tiny["root"] / "reference"
    subprocess.run([sys.executable, "-c", KILLABLE, *flags(tiny, reference, tiny["root"] / "cache-reference")],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=240)

    out, cache, rng, kills = tiny["root"] / "killed", tiny["root"] / "cache-killed", random.Random(2026), 0
    for attempt in range(4):  # two kills inside a file write, two at a moment of training
        args = flags(tiny, out, cache) + (["--resume"] if (out / train.STATE_FILE).exists() else [])
        in_write = attempt % 2 == 0  # alternate: inside a file write, or at a random moment of training
        # a kill within the first 12 renames always lands: a run does 5 a checkpoint, 1 a new cache entry
        env["KILL_AT_REPLACE"] = str(rng.randint(1, 12) if in_write else 0)
        process = subprocess.Popen([sys.executable, "-c", KILLABLE, *args], cwd=REPO, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        if not in_write:  # a moment of training: after a random number of newly logged steps, plus up to 0.2 s
            metrics = out / "metrics.jsonl"
            logged = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            target, deadline = logged + rng.randint(1, 6), time.monotonic() + 120
            while process.poll() is None and time.monotonic() < deadline:
                if metrics.exists() and len(metrics.read_text().splitlines()) >= target:
                    time.sleep(rng.uniform(0, 0.2))
                    break
                time.sleep(0.01)
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate(timeout=240)
        if process.returncode == 0:
            break
        assert process.returncode == -signal.SIGKILL, stderr.decode()[-3000:]
        kills += 1
        check_left_behind(out)
    assert kills >= 2, "the runs finished before they could be killed twice"
    if process.returncode != 0:  # the last attempt was killed too: finish the run
        env["KILL_AT_REPLACE"] = "0"
        resume = ["--resume"] if (out / train.STATE_FILE).exists() else []
        subprocess.run([sys.executable, "-c", KILLABLE, *flags(tiny, out, cache), *resume], cwd=REPO, env=env,
                       check=True, capture_output=True, timeout=240)

    for name in ("adapter_model.safetensors", "heads.safetensors"):
        ours, theirs = load_file(str(out / name)), load_file(str(reference / name))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name

    def losses(run):
        return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "loss" in r]

    assert losses(out) == losses(reference) and len(losses(out)) == 14
    assert not list(out.glob(".*.tmp-*"))  # the half-written files of the kills were cleaned up
