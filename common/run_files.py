"""A train.py output directory: the names of its files, and how each of the run's own files is written and read.

    runs/demo/
      adapter_model.safetensors   LoRA in PEFT's format (lora/adapter.py owns these two files)
      adapter_config.json
      heads.safetensors           every other trained tensor: projections, logit_scale, --train-also modules
      run_config.json             the typed run configuration (common/run_config.py): what rebuilds the model
      metrics.jsonl               one JSON object per logged step and per evaluation
      skipped.jsonl               the inputs a run skipped under --on-bad-audio skip, each once
      training_curves.png         loss and evaluations against steps
      training_state.safetensors  what --resume needs (common/state_file.py): tensors and JSON, no pickle

It sits below everything that writes or reads a run (the training engine, the tasks, eval.py, `load_run`,
the exporter), so each of them names a file through here and never by a literal. Every write is atomic
(common/atomic.py): a crash leaves the previous file or the new one, never half of one.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.atomic import atomic_write, atomic_write_text
from common.errors import PathNotFound
from common.run_config import RunConfig

RUN_CONFIG = "run_config.json"
HEADS_FILE = "heads.safetensors"
METRICS_FILE = "metrics.jsonl"
SKIPPED_FILE = "skipped.jsonl"
CURVES_FILE = "training_curves.png"
STATE_FILE = "training_state.safetensors"
PICKLED_STATE_FILE = "training_state.pt"  # what earlier versions wrote, with torch.save: never unpickled


@dataclass(frozen=True)
class RunDirectory:
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def state(self) -> Path:
        return self.path / STATE_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    def read_config(self) -> RunConfig:
        """run_config.json, typed; a folder without one is not a run, and the message says what is."""
        path = self.path / RUN_CONFIG
        if not path.is_file():
            raise PathNotFound(f"{path} does not exist: pass an output directory of train.py "
                               f"(it holds {RUN_CONFIG}, {HEADS_FILE} and the adapter)")
        return RunConfig.from_json(json.loads(path.read_text(encoding="utf-8")))

    def write_config(self, config: RunConfig):
        atomic_write_text(self.path / RUN_CONFIG, config.dumps())

    def save_heads(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        """The fully trained tensors that are not LoRA (the caller picks them), as one safetensors file."""
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
        atomic_write(self.path / HEADS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        return sorted(tensors)

    def load_heads(self, model: torch.nn.Module) -> list[str]:
        return load_heads(model, self.path / HEADS_FILE)

    def write_skipped(self, skipped: dict[str, dict]):
        """skipped.jsonl: one line per skipped input, {"path", "manifest", "line", "reason"}."""
        lines = [json.dumps(dict(path=path, **entry)) + "\n" for path, entry in skipped.items()]
        atomic_write_text(self.path / SKIPPED_FILE, "".join(lines))


def read_run_config(run_dir) -> RunConfig:
    """The typed configuration of a train.py output directory."""
    return RunDirectory(run_dir).read_config()


def load_heads(model: torch.nn.Module, path) -> list[str]:
    """Load a heads file into the model; every tensor must name a parameter of the same shape."""
    tensors = load_file(str(path))
    params = dict(model.named_parameters())
    for name, tensor in tensors.items():
        if name not in params:
            raise ValueError(f"{path}: tensor {name!r} names no parameter of {type(model).__name__}")
        if params[name].shape != tensor.shape:
            raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, "
                             f"the model's is {tuple(params[name].shape)}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    return sorted(tensors)
