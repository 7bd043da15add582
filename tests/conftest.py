"""Suite-wide guards: no test may ever reach the Hugging Face hub, nor write into ~/.cache."""

import numpy as np
import pytest
import torch
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



@pytest.fixture(scope="module")
def tiny(tiny_audio_text, tmp_path_factory, request):
    """The shared tiny subset, with a folder of the test module's own for runs and caches (a module needing
    another set defines its own `tiny`)."""
    return dict(tiny_audio_text, root=tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]))

def build_task(args):
    """The task train.py's flags describe, built as training builds it (demo files, model without LoRA, data):
    (task, targets with all-linear expanded)."""
    import train
    from common.distributed import Distributed

    recipe = train.Recipe(train.config_from_args(args), train.options_from_args(args), Distributed())
    recipe.setup_task()
    return recipe.task, list(recipe.config.lora.targets)


def randomize(model: torch.nn.Module, seed: int = 1, scale: float = 0.3) -> torch.nn.Module:
    """Every parameter drawn from N(0, scale²), biases and norms included: default inits (zero biases, unit
    norms) would hide a bias or a norm loaded into the wrong place, or a port that skips one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model


def tone(n: int, freq: float = 440.0, sr: int = 16000, amplitude: float = 0.3, channels: int = 1) -> np.ndarray:
    """A sine of `n` samples at `sr` Hz, float32: (n,), or (n, channels) with the same signal in each channel."""
    x = (amplitude * np.sin(2 * np.pi * freq * np.arange(n) / sr)).astype(np.float32)
    return np.repeat(x[:, None], channels, axis=1) if channels > 1 else x


def train_flags(sources: dict, out, *extra, **settings) -> list[str]:
    """train.py's command line for a tiny run: the checkpoints and training data of `sources` (an audio-text set's
    "audio_model", "text_model", "train", or a whole model's "model", "train_data"), `out`, no DataLoader
    workers, no evaluation or checkpoint before the end; then each setting as its flag (max_steps=3 is
    --max-steps 3, a later flag overriding an earlier one) and `extra` as given."""
    argv = []
    for key, flag in (("audio_model", "--audio-model"), ("text_model", "--text-model"), ("model", "--model")):
        argv += [flag, str(sources[key])] if key in sources else []
    argv += ["--train-data", str(sources.get("train") or sources["train_data"]), "--output-dir", str(out),
             "--workers", "0", "--eval-every", "0", "--save-every", "0"]
    for name, value in settings.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv + [str(flag) for flag in extra]
