"""Every mistake a user can make on train.py's command line is one `error:` line and exit status 2
(a traceback only with --debug); an interrupt before training is one line too; a resumable state
that is a pickle is refused without being read; a warm-up longer than the run is shortened, and
said; an unreadable training file stops the run before its first evaluation."""

import json
import os
import pickle
import signal
import time

import numpy as np
import pytest
import soundfile as sf

import train
from common.run_files import PICKLED_STATE_FILE, STATE_FILE
from common.errors import PathNotFound
from tests.hub_fixtures import online_without_network
from tests.conftest import train_flags



def flags(tiny, out, *extra, train_data=None):
    return train_flags({**tiny, "train": train_data or tiny["train"]}, out, *extra, batch_size=8, max_steps=2)

def one_error_line(argv, capsys, code=2) -> str:
    assert train.main(argv) == code
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and "Traceback" not in error, error
    return error


def test_a_manifest_path_typo_is_one_line(tiny, tmp_path, capsys):
    error = one_error_line(flags(tiny, tmp_path / "run", train_data=tmp_path / "tarin.jsonl"), capsys)
    assert "manifest not found" in error and "tarin.jsonl" in error


def test_a_missing_model_directory_is_one_line(tiny, tmp_path, capsys):
    argv = flags(tiny, tmp_path / "run")
    argv[argv.index("--audio-model") + 1] = str(tmp_path / "no-such-model")
    assert str(tmp_path / "no-such-model") in one_error_line(argv, capsys)


def test_a_hub_id_without_network_is_one_line_and_fast(tiny, tmp_path, capsys, monkeypatch):
    online_without_network(monkeypatch)  # HF_HUB_OFFLINE unset, the hub unreachable: the new user's machine
    argv = flags(tiny, tmp_path / "run")
    argv[argv.index("--audio-model") + 1] = "Qwen/Qwen2-Audio-7B-Instruct"
    started = time.perf_counter()
    error = one_error_line(argv, capsys)
    assert error.startswith("error: run `hf download Qwen/Qwen2-Audio-7B-Instruct`"), error
    assert time.perf_counter() - started < 10  # one refused probe, no download retries


def test_debug_shows_the_traceback(tiny, tmp_path):
    with pytest.raises(PathNotFound, match="tarin.jsonl"):
        train.main(flags(tiny, tmp_path / "run", "--debug", train_data=tmp_path / "tarin.jsonl"))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_before_training_stops_at_once_in_one_line(tiny, tmp_path, capsys, monkeypatch, signum):
    def interrupted_setup(self):
        os.kill(os.getpid(), signum)  # arrives while the models load: nothing to save yet
        time.sleep(5)  # never reached: the handler raises at once
    monkeypatch.setattr(train.Recipe, "setup", interrupted_setup)
    assert train.main(flags(tiny, tmp_path / "run")) == 128 + signum
    error = capsys.readouterr().err
    assert error.strip() == "interrupted; nothing was saved" and "Traceback" not in error
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back


class WritesAFile:
    """Unpickling this creates `path`: what a crafted pickle could do with any code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("name", [PICKLED_STATE_FILE, STATE_FILE])
def test_resume_refuses_a_pickle_without_running_it(tiny, tmp_path, capsys, name):
    out, marker = tmp_path / "handed-over-run", tmp_path / "the-pickle-ran"
    out.mkdir()
    (out / name).write_bytes(pickle.dumps({"step": 1, "payload": WritesAFile(marker)}))
    error = one_error_line(flags(tiny, out, "--resume"), capsys)
    assert str(out / name) in error and ("pickle" in error if name.endswith(".pt") else "cannot be read" in error)
    assert not marker.exists()


def test_a_warm_up_longer_than_the_run_is_shortened_and_said(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(flags(tiny, out, "--warmup-steps", "50", "--max-steps", "20")) == 0
    printed = capsys.readouterr()
    assert "warm-up (50 steps) is not shorter than the run (20 steps)" in printed.out + printed.err
    assert json.loads((out / "run_config.json").read_text())["warmup_steps"] == 2
    lrs = [r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert max(lrs) == pytest.approx(1e-3, rel=0.05)  # the peak --lr is reached (the default 1e-3)


def test_an_unreadable_training_file_stops_the_run_before_the_first_evaluation(tiny, tmp_path, capsys):
    folder = tmp_path / "clips"
    folder.mkdir()
    sf.write(folder / "good.wav", np.zeros(16000, dtype=np.float32), 16000)
    (folder / "notes.wav").write_text("this is a text file, not audio\n")
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps({"audio": f"clips/{name}", "text": "a low tone"}) + "\n"
                                for name in ["good.wav", "good.wav", "notes.wav", "good.wav"]))
    error = one_error_line(flags(tiny, tmp_path / "run", "--eval-data", tiny["eval"], train_data=manifest), capsys)
    assert f"{manifest}:3: audio file cannot be decoded" in error and "--on-bad-audio skip" in error
    assert "on_bad_audio" not in error  # the command line's spelling only
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no evaluation ran
