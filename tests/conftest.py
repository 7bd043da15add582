"""Suite-wide guards: no test may ever reach the Hugging Face hub, nor write into ~/.cache."""

import pytest
from huggingface_hub import constants


@pytest.fixture(autouse=True)
def never_reach_the_hub(monkeypatch, tmp_path):
    """Offline mode and an empty cache for every test. huggingface_hub reads HF_HUB_OFFLINE and
    HF_HUB_CACHE at import time, so its constants are patched as well as the environment."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    # train.py's and eval.py's --cache-dir default (the feature cache, demo sets): the test's own folder
    monkeypatch.setenv("LORA_MM_CACHE", str(tmp_path / "lora-mm-cache"))


@pytest.fixture(scope="session")
def tiny_audio_text(tmp_path_factory):
    """A 48-clip training subset of the demo sounds (6 global batches of 8), 8 eval clips and the demo
    towers, built once for the session: {"audio_model", "text_model", "train", "eval", "root"}."""
    from data.demo_models import ensure_demo_models
    from data.demo_sounds import ensure_demo_set

    root = tmp_path_factory.mktemp("tiny-audio-text")
    sounds = ensure_demo_set(root / "sounds", n_train=48, n_eval=8, verbose=False)
    towers = ensure_demo_models(root / "towers", sounds["captions"], verbose=False)
    return {**towers, "train": sounds["train"], "eval": sounds["eval"], "root": root}
