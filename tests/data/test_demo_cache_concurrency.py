"""The demo caches under concurrency and damage, and the run's randomness: several processes building one
cache at once all get the same whole folder, a damaged or half-built folder is rebuilt, building never moves
the global RNGs, and a cold-cache run trains exactly as a warm-cache run (common/atomic.py build_directory_once)."""

import contextlib
import hashlib
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train
from data.demo_audio_qa import ensure_demo_audio_qa
from data.demo_models import ensure_demo_instructblip, ensure_demo_models
from data.demo_shapes import ensure_shapes_set
from data.demo_sounds import ensure_demo_set
from common import atomic

ROOT = Path(__file__).resolve().parents[2]
N_TRAIN, N_EVAL = 8, 4  # a few clips: the code path of the full set, in a fraction of a second


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Scratch folders of builders (finished, failed or killed) still beside the targets."""
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def build_sounds_and_towers(cache: Path) -> dict:
    sounds = ensure_demo_set(cache / "sounds", n_train=N_TRAIN, n_eval=N_EVAL, verbose=False)
    return {"sounds": sounds["dir"], **ensure_demo_models(cache / "towers", sounds["captions"], verbose=False)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The sounds and towers built once, by one process, into an empty cache."""
    cache = tmp_path_factory.mktemp("reference")
    build_sounds_and_towers(cache)
    return cache


# each process imports everything, says it is ready, then waits for the others, so the builds overlap
BUILDER = r"""
import json, os, sys, time
from pathlib import Path
import common.atomic
from data.demo_models import ensure_demo_models
from data.demo_sounds import ensure_demo_set
cache, start, locking = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
n_train, n_eval = int(sys.argv[4]), int(sys.argv[5])
if locking == "without the lock":
    common.atomic.fcntl = None  # every process builds, and only the rename decides
(start.parent / f"ready-{os.getpid()}").touch()
while not start.exists():
    time.sleep(0.002)
sounds = ensure_demo_set(cache / "sounds", n_train=n_train, n_eval=n_eval, verbose=False)
print(json.dumps({"sounds": sounds["dir"], **ensure_demo_models(cache / "towers", sounds["captions"], verbose=False)}))
"""


@pytest.mark.parametrize("locking", ["with the lock", "without the lock"])
def test_three_processes_building_one_cache_at_once_all_get_the_same_whole_sets(reference, tmp_path, locking):
    cache, signals = tmp_path / "cache", tmp_path / "signals"
    signals.mkdir()
    command = [sys.executable, "-c", BUILDER, str(cache), str(signals / "start"), locking, str(N_TRAIN), str(N_EVAL)]
    builders = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(3)]
    try:
        deadline = time.monotonic() + 120
        while len(list(signals.glob("ready-*"))) < 3 and all(b.poll() is None for b in builders):
            assert time.monotonic() < deadline, "the builder processes did not start"
            time.sleep(0.01)
        (signals / "start").touch()
        results = [b.communicate(timeout=120) for b in builders]
    finally:
        for b in builders:
            b.kill()
    for builder, (out, err) in zip(builders, results):
        assert builder.returncode == 0, err
    paths = [json.loads(out) for out, _ in results]
    expected = {"sounds": str(cache / "sounds"), "audio_model": str(cache / "towers" / "audio_tower"),
                "text_model": str(cache / "towers" / "text_tower")}
    assert paths == [expected] * 3
    for name in ("sounds", "towers"):  # DONE.json included: the same record and file sizes
        assert tree_hashes(cache / name) == tree_hashes(reference / name), name
    assert leftovers(cache) == []


@pytest.mark.parametrize("damage", ["model.safetensors truncated", "tokenizer.json deleted", "DONE.json deleted",
                                    "DONE.json torn"])
def test_damaged_towers_are_rebuilt_not_used(reference, tmp_path, damage):
    cache = tmp_path / "cache"
    build_sounds_and_towers(cache)
    towers = cache / "towers"
    (towers / "audio_tower" / "stray.bin").write_bytes(b"left over")  # gone only if the folder is rebuilt
    if damage == "model.safetensors truncated":
        weights = towers / "text_tower" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "tokenizer.json deleted":
        (towers / "text_tower" / "tokenizer.json").unlink()
    elif damage == "DONE.json deleted":
        (towers / "DONE.json").unlink()
    else:
        (towers / "DONE.json").write_text('{"version": 4, "see')
    build_sounds_and_towers(cache)
    assert tree_hashes(towers) == tree_hashes(reference / "towers")
    assert leftovers(cache) == []


# generates every file of the set, then hangs before DONE.json and the rename, to be killed there
KILLED_BUILDER = r"""
import sys, time
from pathlib import Path
from data import demo_sounds
generate = demo_sounds.generate_demo_set
def generate_then_hang(*args, **kwargs):
    made = generate(*args, **kwargs)
    Path(sys.argv[2]).touch()
    time.sleep(600)
demo_sounds.generate_demo_set = generate_then_hang
demo_sounds.ensure_demo_set(sys.argv[1], n_train=int(sys.argv[3]), n_eval=int(sys.argv[4]), verbose=False)
"""


def test_a_builder_killed_mid_build_leaves_nothing_a_later_run_trusts(reference, tmp_path):
    cache, written = tmp_path / "cache", tmp_path / "written"
    builder = subprocess.Popen([sys.executable, "-c", KILLED_BUILDER, str(cache / "sounds"), str(written), str(N_TRAIN),
                                str(N_EVAL)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not written.exists():
            assert builder.poll() is None and time.monotonic() < deadline, builder.stderr and builder.stderr.read()
            time.sleep(0.01)
    finally:
        builder.kill()
        builder.wait()
    stale = leftovers(cache)
    assert len(stale) == 1 and not (cache / "sounds").exists()  # its whole set, unmarked, under a name of its own
    assert (cache / stale[0] / "train.jsonl").is_file()
    ensure_demo_set(cache / "sounds", n_train=N_TRAIN, n_eval=N_EVAL, verbose=False)  # its lock died with it
    assert tree_hashes(cache / "sounds") == tree_hashes(reference / "sounds")
    assert leftovers(cache) == []  # the dead builder's folder is removed, not reused


@pytest.fixture
def no_lock(monkeypatch):
    """Another process in the same folder, simulated inside this one: a second flock would wait on the first."""
    monkeypatch.setattr(atomic, "build_lock", lambda target: contextlib.nullcontext())


def test_a_whole_folder_another_process_renamed_into_place_first_is_kept(tmp_path, no_lock):
    target = tmp_path / "set"

    def other_process(scratch):
        (scratch / "data.txt").write_text("the same bytes")
        return {"built_by": "the other process"}

    def this_process(scratch):
        (scratch / "data.txt").write_text("the same bytes")
        atomic.build_directory_once(target, {"version": 1}, other_process)  # it finishes while this one builds
        return {"built_by": "this process"}

    record = atomic.build_directory_once(target, {"version": 1}, this_process)
    assert record == {"version": 1, "built_by": "the other process"}
    assert json.loads((target / "DONE.json").read_text())["built_by"] == "the other process"
    assert leftovers(tmp_path) == []


def test_a_partial_folder_that_appeared_meanwhile_is_replaced(tmp_path, no_lock):
    target = tmp_path / "set"

    def build(scratch):
        (scratch / "data.txt").write_text("whole")
        target.mkdir()  # what an old, in-place builder leaves: files, and no DONE.json
        (target / "data.txt").write_text("half")
        return {"built_by": "this process"}

    assert atomic.build_directory_once(target, {"version": 1}, build)["built_by"] == "this process"
    assert (target / "data.txt").read_text() == "whole" and leftovers(tmp_path) == []


def test_a_build_that_fails_leaves_no_folder(tmp_path):
    def build(scratch):
        (scratch / "half.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic.build_directory_once(tmp_path / "set", {"version": 1}, build)
    assert not (tmp_path / "set").exists() and leftovers(tmp_path) == []


def global_rng_states():
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def assert_same_rng_states(before, after):
    assert torch.equal(before[0], after[0]), "torch's global RNG moved"
    assert all(np.array_equal(a, b) for a, b in zip(before[1], after[1])), "numpy's global RNG moved"
    assert before[2] == after[2], "python's random moved"


def texts_file(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "texts.txt").write_text("three short high beeps\na rising chirp\nWhat colour is the shape?\nred\n")
    return folder / "texts.txt"


COLD_BUILDS = {
    "sounds": lambda root: ensure_demo_set(root / "set", n_train=N_TRAIN, n_eval=N_EVAL, verbose=False),
    "towers": lambda root: ensure_demo_models(root / "towers", texts_file(root), verbose=False),
    "shapes": lambda root: ensure_shapes_set(root / "set", n_train=6, n_eval=3, verbose=False),
    "instructblip": lambda root: ensure_demo_instructblip(root / "model", texts_file(root), verbose=False),
    "audio-qa": lambda root: ensure_demo_audio_qa(root / "audio-qa", n_train=4, n_eval=2, verbose=False),
}


@pytest.mark.parametrize("demo", COLD_BUILDS)
def test_building_a_demo_never_moves_the_global_rngs(tmp_path, demo):
    """A run seeds the global RNGs and then builds (or reuses) the demo: a build that drew from them
    would start the cold run's LoRA init elsewhere than the warm run's."""
    before = global_rng_states()
    COLD_BUILDS[demo](tmp_path)
    assert_same_rng_states(before, global_rng_states())


def train_demo(cache: Path, out: Path, *extra: str):
    flags = ["--cache-dir", str(cache), "--output-dir", str(out), "--max-steps", "3", "--eval-every", "0",
             "--save-every", "0", "--workers", "0", "--batch-size", "8", *extra]
    assert train.main(flags) == 0
    return {**load_file(out / "adapter_model.safetensors"), **load_file(out / "heads.safetensors")}


def demo_done_files(cache: Path) -> dict:
    return {p.relative_to(cache).as_posix(): p.stat().st_mtime_ns for p in sorted((cache / "demo").glob("*/DONE.json"))}


def test_a_cold_cache_run_trains_exactly_as_a_warm_cache_run_and_seed_is_the_trainings_only(tmp_path):
    """The full default demo set (its real sizes: about a second to build) and towers, built by the first run."""
    cache = tmp_path / "cache"
    cold = train_demo(cache, tmp_path / "cold")
    built = demo_done_files(cache)
    assert set(built) == {"demo/sounds/DONE.json", "demo/towers/DONE.json"}
    warm = train_demo(cache, tmp_path / "warm")
    assert cold.keys() == warm.keys()
    assert [key for key in cold if not torch.equal(cold[key], warm[key])] == []

    other_seed = train_demo(cache, tmp_path / "seed1", "--seed", "1")
    assert demo_done_files(cache) == built  # the same demo data and towers, not rebuilt for another seed
    assert not all(torch.equal(cold[key], other_seed[key]) for key in cold)  # the seed still drives the training
