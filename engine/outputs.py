"""A run's checkpoint: every file of the output directory (common/run_files.py) written, the resumable state
last, each file atomic, so a crash at any point leaves a loadable set; and read back for --resume."""

import torch.distributed as dist

from common.atomic import atomic_write
from common.distributed import Distributed
from common.run_config import RunConfig
from common.run_files import PICKLED_STATE_FILE, STATE_FILE, RunDirectory
from common.state_file import load_state, save_state
from engine.training import TrainingError
from lora import save_adapter
from lora.config import LoRAConfig
from lora.inject import adapter_parameter_ids


def trained_heads(model) -> dict:
    """Every trainable tensor that is not LoRA (projections, logit_scale, --train-also modules)."""
    lora = adapter_parameter_ids(model, adapter=None)  # every adapter's parts (DoRA's magnitude too) go in one
    return {name: param for name, param in model.named_parameters() if param.requires_grad and id(param) not in lora}


def save_outputs(run: RunDirectory, model, lora_config: LoRAConfig, config: RunConfig, state: dict,
                 initial: dict | None = None):
    """Adapter (PEFT format), heads, run config, skipped inputs, then the resumable state. `initial`: PiSSA's or
    OLoRA's starting A and B, so the adapter is saved as plain LoRA over the base as released (lora/init.py)."""
    sources = config.sources
    save_adapter(model, run.path, lora_config, base_model_name_or_path=sources.model or sources.audio_model,
                 initial=initial)
    run.save_heads(trained_heads(model))
    run.write_config(config)
    run.write_skipped(state["skipped"])
    atomic_write(run.state, lambda tmp: save_state(state, tmp))


def check_output_dir(run: RunDirectory, resume: bool):
    """A fresh run needs a folder without a run in it; --resume needs the state to continue from. A pickled
    state of earlier versions is refused unread: reading it could run any code."""
    if (run / PICKLED_STATE_FILE).exists() and not run.state.exists():
        raise TrainingError(f"{run / PICKLED_STATE_FILE} is a pickle (torch.save), which could run any code when read, "
                            f"so it is not read: this toolkit keeps its state in {STATE_FILE}. "
                            "Start a new --output-dir")
    if run.state.exists() and not resume:
        raise TrainingError(f"{run.path} already holds a run: pass --resume to continue it, or another --output-dir")
    if resume and not run.state.exists():
        raise TrainingError(f"--resume: no {STATE_FILE} in {run.path}")


def read_saved_state(run: RunDirectory, env: Distributed) -> dict:
    """The saved state on every rank: rank 0 reads it and broadcasts it, so no shared file system is needed.
    Temporary files of writes a crash cut short are removed."""
    state = None
    if env.main:
        state = load_state(run.state)
        for stale in run.path.glob(".*.tmp-*"):
            stale.unlink(missing_ok=True)
    if env.world_size > 1:
        holder = [state]
        dist.broadcast_object_list(holder, src=0)
        state = holder[0]
    return state
