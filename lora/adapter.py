"""Save and load adapters in PEFT's on-disk format, so PEFT and this toolkit read each other's files.

A PEFT LoRA adapter directory holds two files:

    adapter_model.safetensors   base_model.model.<module path>.lora_A.weight  (r, in)
                                base_model.model.<module path>.lora_B.weight  (out, r)
    adapter_config.json         {"peft_type": "LORA", "r": .., "lora_alpha": .., "target_modules": ..}

PEFT reads `target_modules` two ways: a *string* is one regex that must fullmatch a module path
(our semantics), a *list* holds exact names or dotted suffixes (``"q_proj"`` selects
``a.b.q_proj``), never regexes. We write a string; we read both. On load the tensor keys, not
`target_modules`, decide which layers get LoRA: they say exactly where the weights belong.
"""

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from common.errors import PathNotFound, UserError
from lora.atomic import atomic_write, atomic_write_text
from lora.config import LoRAConfig
from lora.inject import LORA_BASES, lora_layers, wrap_linear
from lora.layer import LinearWithLoRA

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
KEY_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> your model: two wrappers deep
_KEY = re.compile(r"base_model\.model\.(?P<path>.+)\.(?P<which>lora_A|lora_B)\.weight")


class AdapterFileError(UserError, ValueError):
    """An adapter directory whose files cannot be read as a LoRA adapter: the message names the file."""


def save_adapter(model: nn.Module, out_dir, config: LoRAConfig, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's LoRA weights and config to `out_dir` in PEFT's format (each file atomically)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save: call inject_lora (or load_adapter) first")
    for path, layer in layers.items():
        if (layer.r, layer.alpha, layer.rslora) != (config.r, config.alpha, config.rslora):
            raise ValueError(
                f"LoRA layer {path} has r={layer.r}, alpha={layer.alpha}, rslora={layer.rslora} but the config to "
                f"save says r={config.r}, alpha={config.alpha}, rslora={config.rslora}; save with the config it was injected with"
            )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, layer in layers.items():
        tensors[f"{KEY_PREFIX}{path}.lora_A.weight"] = layer.lora_A.weight.detach().cpu().contiguous()
        tensors[f"{KEY_PREFIX}{path}.lora_B.weight"] = layer.lora_B.weight.detach().cpu().contiguous()
    atomic_write(out_dir / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_text(out_dir / ADAPTER_CONFIG, json.dumps(peft_config_dict(config, base_model_name_or_path), indent=2) + "\n")
    return out_dir


def peft_config_dict(config: LoRAConfig, base_model_name_or_path: str | None) -> dict:
    """The adapter_config.json fields PEFT's LoraConfig reads, with PEFT's defaults for what we do not use."""
    patterns = config.patterns
    # One string regex, because a list would be read by PEFT as exact names or suffixes.
    target = patterns[0] if len(patterns) == 1 else "|".join(f"(?:{p})" for p in patterns)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": target,
        "use_rslora": config.rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def read_adapter_config(in_dir: Path) -> LoRAConfig:
    """Parse adapter_config.json into a LoRAConfig, refusing PEFT features this toolkit does not implement."""
    path = in_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise PathNotFound(f"{path} does not exist: an adapter directory needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path} is not valid JSON ({err}); the adapter directory is damaged") from None
    if raw.get("peft_type") != "LORA":
        raise AdapterFileError(f"{path}: peft_type is {raw.get('peft_type')!r}, only 'LORA' adapters can be loaded")
    unsupported = {
        "use_dora": raw.get("use_dora"),
        "fan_in_fan_out": raw.get("fan_in_fan_out"),
        "rank_pattern": raw.get("rank_pattern"),
        "alpha_pattern": raw.get("alpha_pattern"),
        "modules_to_save": raw.get("modules_to_save"),
        "lora_bias": raw.get("lora_bias"),
        "bias": raw.get("bias") not in (None, "none"),
    }
    used = [name for name, value in unsupported.items() if value]
    if used:
        raise AdapterFileError(f"{path} uses PEFT features this toolkit does not implement: {', '.join(used)}")
    for field in ("r", "lora_alpha", "target_modules"):
        if raw.get(field) is None:
            raise AdapterFileError(f"{path} has no {field!r}; it is not a LoRA adapter config PEFT would write")
    target_modules = raw["target_modules"]
    if isinstance(target_modules, str):
        targets = target_modules
    else:
        # PEFT's list semantics: an exact module path, or a suffix after a dot.
        targets = [rf"(?:.*\.)?{re.escape(name)}" for name in target_modules]
    return LoRAConfig(targets, r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout") or 0.0, rslora=bool(raw.get("use_rslora")))


def read_adapter_weights(in_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """adapter_model.safetensors as {module path: {"lora_A": A, "lora_B": B}}, every key checked."""
    path = in_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        hint = " (a PEFT .bin adapter: load and re-save it with PEFT using safe_serialization=True)" if (in_dir / "adapter_model.bin").exists() else ""
        raise PathNotFound(f"{path} does not exist{hint}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{path} cannot be read as safetensors ({err}); the file is truncated or corrupted") from None
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise AdapterFileError(
                f"{path}: unexpected key {key!r}; a LoRA adapter holds only "
                f"'{KEY_PREFIX}<module path>.lora_A.weight' and '.lora_B.weight'"
            )
        by_module.setdefault(match["path"], {})[match["which"]] = tensor
    for module_path, pair in by_module.items():
        for which in ("lora_A", "lora_B"):
            if which not in pair:
                raise AdapterFileError(f"{path}: missing key {KEY_PREFIX}{module_path}.{which}.weight (its partner is present)")
    if not by_module:
        raise AdapterFileError(f"{path} holds no tensors")
    return by_module


def load_adapter(model: nn.Module, in_dir) -> LoRAConfig:
    """Load a PEFT-format LoRA adapter into `model`, injecting LoRA exactly where its keys say.

    Layers that already have LoRA (e.g. from inject_lora) receive the weights if their rank and
    scaling agree. Every key, shape and module is checked before the model is changed.
    """
    in_dir = Path(in_dir)
    config = read_adapter_config(in_dir)
    weights = read_adapter_weights(in_dir)
    modules = dict(model.named_modules())
    weights_file = in_dir / ADAPTER_WEIGHTS

    for module_path, pair in weights.items():
        module = modules.get(module_path)
        key_a = f"{KEY_PREFIX}{module_path}.lora_A.weight"
        if module is None:
            raise ValueError(f"{weights_file}: key {key_a!r} names module {module_path!r}, which this model does not have")
        if not isinstance(module, (*LORA_BASES, LinearWithLoRA)):
            raise ValueError(f"{weights_file}: key {key_a!r} targets {module_path}, a {type(module).__name__}, not a Linear")
        expected = {"lora_A": (config.r, module.in_features), "lora_B": (module.out_features, config.r)}
        for which, shape in expected.items():
            if tuple(pair[which].shape) != shape:
                raise ValueError(
                    f"{weights_file}: key {KEY_PREFIX}{module_path}.{which}.weight has shape {tuple(pair[which].shape)}, "
                    f"expected {shape} (r={config.r}, module {module.in_features}->{module.out_features})"
                )
        if isinstance(module, LinearWithLoRA) and (module.r, module.alpha, module.rslora) != (config.r, config.alpha, config.rslora):
            raise ValueError(
                f"{module_path} already has LoRA with r={module.r}, alpha={module.alpha}, rslora={module.rslora}; "
                f"the adapter in {in_dir} has r={config.r}, alpha={config.alpha}, rslora={config.rslora}"
            )
    stray = [p for p in lora_layers(model) if p not in weights]
    if stray:
        raise ValueError(f"{weights_file}: missing key {KEY_PREFIX}{stray[0]}.lora_A.weight for the model's LoRA layer {stray[0]} ({len(stray)} such layers)")

    with torch.no_grad():
        for module_path, pair in weights.items():
            layer = modules[module_path]
            if not isinstance(layer, LinearWithLoRA):
                layer = wrap_linear(model, module_path, config)
            layer.lora_A.weight.copy_(pair["lora_A"])
            layer.lora_B.weight.copy_(pair["lora_B"])
    return config
