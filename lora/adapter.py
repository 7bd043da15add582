"""Save and load adapters in PEFT's on-disk format, so PEFT and this toolkit read each other's files.

A PEFT LoRA adapter directory holds two files:

    adapter_model.safetensors   base_model.model.<module path>.lora_A.weight  (r, in)
                                base_model.model.<module path>.lora_B.weight  (out, r)
                                base_model.model.<module path>.lora_B.bias    (out,)    with lora_bias
                                base_model.model.<module path>.lora_magnitude_vector  (out,)  with use_dora
                                base_model.model.<saved module>.<tensor>              with modules_to_save
    adapter_config.json         {"peft_type": "LORA", "r": .., "lora_alpha": .., "target_modules": ..}

PEFT reads `target_modules` two ways: a *string* is one regex that must fullmatch a module path
(our semantics), a *list* holds exact names or dotted suffixes (``"q_proj"`` selects
``a.b.q_proj``), never regexes. We write a string; we read both. On load the tensor keys, not
`target_modules`, decide which layers get LoRA: they say exactly where the weights belong.

`modules_to_save` (modules trained fully) are saved under their own paths (lora/modules_to_save.py).
An adapter whose init is PiSSA or OLoRA changes the base weight (lora/init.py): loading one runs
that init on the original base first, as PEFT does; save_adapter(..., initial=) writes it as plain LoRA.

`fan_in_fan_out` describes the base, not the adapter: GPT-2's Conv1D stores W as (in, out), yet
lora_A and lora_B have the same shapes as over an nn.Linear, and PEFT itself sets the flag to match
the module it wraps. Our LoRA wraps nn.Linear only, so such an adapter loads onto a port whose Conv1D
weights were loaded transposed into nn.Linear, which is how a port here is written.
"""

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from common.errors import PathNotFound, UserError
from common.atomic import atomic_write, atomic_write_text
from lora.config import LoRAConfig
from lora.init import converted_config, subtract_initial
from lora.inject import LORA_BASES, lora_layers, wrap_linear
from lora.layer import LinearWithLoRA
from lora.modules_to_save import check_saved_tensors, saved_module_tensors

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
KEY_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> your model: two wrappers deep
_LORA_KEY = re.compile(r"(?P<path>.+)\.(?P<tensor>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector)")
_NAME = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_B.bias": "lora_B.bias",
         "lora_magnitude_vector": "lora_magnitude_vector"}  # file -> pair key (DoRA's m is saved without .weight)

# PEFT fields this toolkit does not implement: (the value meaning "not used", what supporting it would take)
NOT_IMPLEMENTED = {
    "bias": ("none", "training the base layers' own biases and saving them beside the adapter"),
    "exclude_modules": (None, "targets minus these names when choosing the layers (the tensor keys decide on load, "
                              "but the config returned would select more)"),
    "layers_to_transform": (None, "restricting the targets to these layer indices"),
    "layers_pattern": (None, "restricting the targets by layer index (with layers_to_transform)"),
    "layer_replication": (None, "duplicating decoder layers (LLaMA-Pro style) before adapting them"),
    "trainable_token_indices": (None, "training selected rows of the embeddings (PEFT's TrainableTokens)"),
    "target_parameters": (None, "LoRA on bare nn.Parameters (MoE experts), not Linear modules"),
    "use_qalora": (False, "QA-LoRA's group-wise pooling of the input"),
    "use_bdlora": (None, "block-diagonal LoRA"),
    "alora_invocation_tokens": (None, "activated LoRA (applied only after the invocation tokens)"),
    "arrow_config": (None, "Arrow routing between several LoRA experts"),
    "velora_config": (None, "the VeLoRA variant"),
    "monteclora_config": (None, "the MonteCLoRA variant"),
    "kasa_config": (None, "the KaSA variant"),
    "megatron_config": (None, "Megatron's parallel Linear layers"),
}
# init_lora_weights values that leave the base untouched: on load the saved A and B replace them anyway
_INITS_FOR_LOADING = {True: "default", False: "default", "gaussian": "gaussian", "eva": "default",
                      "orthogonal": "default", "pissa": "pissa", "olora": "olora"}


class AdapterFileError(UserError, ValueError):
    """An adapter directory whose files cannot be read as a LoRA adapter: the message names the file."""


def save_adapter(model: nn.Module, out_dir, config: LoRAConfig, base_model_name_or_path: str | None = None,
                 modules_to_save=None, initial: dict | None = None) -> Path:
    """Write the model's LoRA weights and config to `out_dir` in PEFT's format (each file atomically).

    `modules_to_save` (default: config.modules_to_save) names modules trained fully, written in PEFT's keys
    and config field; each must be a module path, and under PEFT's ends-with rule select only itself.
    `initial` (inject.initial_adapter, taken right after a PiSSA/OLoRA init) writes the trained adapter as
    the equivalent plain LoRA of rank 2r over the *original* base (lora/init.py), as PEFT's
    save_pretrained(path_initial_model_for_weight_conversion=...) does.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save: call inject_lora (or load_adapter) first")
    for path, layer in layers.items():
        want = (config.rank_for(path), config.alpha_for(path), config.rslora, config.lora_bias, config.use_dora)
        have = (layer.r, layer.alpha, layer.rslora, layer.lora_B.bias is not None, layer.use_dora)
        if have != want:
            raise ValueError(
                f"LoRA layer {path} has r={have[0]}, alpha={have[1]}, rslora={have[2]}, lora_bias={have[3]}, "
                f"use_dora={have[4]} but the config to save says r={want[0]}, alpha={want[1]}, rslora={want[2]}, "
                f"lora_bias={want[3]}, use_dora={want[4]}; "
                "save with the config it was injected with"
            )
    names = tuple(config.modules_to_save if modules_to_save is None else modules_to_save)
    saved = saved_module_tensors(model, names, list(layers))
    pairs = {path: {_NAME[name]: layer.get_parameter(name).detach().cpu() for name in layer.adapter_params()}
             for path, layer in layers.items()}
    if initial is not None:
        pairs, config = subtract_initial(pairs, initial), converted_config(config)
    return write_adapter(out_dir, pairs, config, base_model_name_or_path, saved, names)


def write_adapter(out_dir, pairs: dict[str, dict[str, torch.Tensor]], config: LoRAConfig,
                  base_model_name_or_path: str | None = None, saved: dict | None = None, modules_to_save=()) -> Path:
    """Write the two files of a PEFT adapter into `out_dir` (each atomically): `pairs` ({module path: {"lora_A": A,
    "lora_B": B[, "lora_B.bias", "lora_magnitude_vector"]}}) and `saved` ({key: tensor} of modules_to_save) under
    PEFT's keys, and `config` as adapter_config.json."""
    tensors = {f"{KEY_PREFIX}{path}.{name}" + (".weight" if name in ("lora_A", "lora_B") else ""): t.contiguous()
               for path, pair in pairs.items() for name, t in pair.items()}
    tensors |= {f"{KEY_PREFIX}{key}": t.detach().cpu().contiguous() for key, t in (saved or {}).items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = peft_config_dict(config, base_model_name_or_path, modules_to_save)
    atomic_write(out_dir / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_text(out_dir / ADAPTER_CONFIG, json.dumps(raw, indent=2) + "\n")
    return out_dir


def peft_config_dict(config: LoRAConfig, base_model_name_or_path: str | None, modules_to_save=()) -> dict:
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
        "lora_bias": config.lora_bias,
        "fan_in_fan_out": False,
        "init_lora_weights": True if config.init == "default" else config.init,
        "inference_mode": True,
        "modules_to_save": list(modules_to_save) or None,
        "use_dora": config.use_dora,
        "layers_to_transform": None,
        "layers_pattern": None,
        # in the config's order, which is the order the first-match rule reads them in (PEFT sorts them)
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
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
    used = [f"{name}={raw[name]!r} (would need {need})" for name, (unused, need) in NOT_IMPLEMENTED.items()
            if raw.get(name, unused) not in (unused, None, False, [], {})]
    init = raw.get("init_lora_weights", True)
    if init not in _INITS_FOR_LOADING and not re.fullmatch(r"pissa_niter_\d+", str(init)):
        used.append(f"init_lora_weights={init!r} (would need its initialisation, which changes the base weights "
                    "or the layer; implemented: True, False, gaussian, eva, orthogonal, pissa, pissa_niter_N, olora)")
    if used:
        raise AdapterFileError(f"{path} uses PEFT features this toolkit does not implement: {'; '.join(used)}")
    for field in ("r", "lora_alpha", "target_modules"):
        if raw.get(field) is None:
            raise AdapterFileError(f"{path} has no {field!r}; it is not a LoRA adapter config PEFT would write")
    target_modules = raw["target_modules"]
    if isinstance(target_modules, str):
        targets = target_modules
    else:
        # PEFT's list semantics: an exact module path, or a suffix after a dot.
        targets = [rf"(?:.*\.)?{re.escape(name)}" for name in sorted(target_modules)]
    try:
        return LoRAConfig(targets, r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout") or 0.0,
                          rslora=bool(raw.get("use_rslora")), rank_pattern=raw.get("rank_pattern") or {},
                          alpha_pattern=raw.get("alpha_pattern") or {}, lora_bias=bool(raw.get("lora_bias")),
                          init=_INITS_FOR_LOADING.get(init, init), modules_to_save=raw.get("modules_to_save") or (),
                          use_dora=bool(raw.get("use_dora")))
    except ValueError as err:
        raise AdapterFileError(f"{path}: {err}") from None


def read_adapter_tensors(in_dir: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """adapter_model.safetensors as ({module path: {"lora_A": A, "lora_B": B[, "lora_B.bias"]}}, {other key: tensor}),
    the prefix checked on every key and every LoRA layer checked for both A and B. The other keys are the saved
    modules (modules_to_save), by their path in the model."""
    path = in_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        bin_file = (in_dir / "adapter_model.bin").exists()
        hint = " (a PEFT .bin adapter: load and re-save it with PEFT using safe_serialization=True)" if bin_file else ""
        raise PathNotFound(f"{path} does not exist{hint}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{path} cannot be read as safetensors ({err}); "
                               "the file is truncated or corrupted") from None
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    others = {}
    for key, tensor in tensors.items():
        if not key.startswith(KEY_PREFIX):
            raise AdapterFileError(f"{path}: unexpected key {key!r}; "
                                   f"every key of a PEFT adapter starts with '{KEY_PREFIX}'")
        match = _LORA_KEY.fullmatch(key.removeprefix(KEY_PREFIX))
        if match is None:
            others[key.removeprefix(KEY_PREFIX)] = tensor
        else:
            by_module.setdefault(match["path"], {})[_NAME[match["tensor"]]] = tensor
    for module_path, pair in by_module.items():
        for which in ("lora_A", "lora_B"):
            if which not in pair:
                raise AdapterFileError(f"{path}: missing key {KEY_PREFIX}{module_path}.{which}.weight "
                                       "(its partner is present)")
    if not tensors:
        raise AdapterFileError(f"{path} holds no tensors")
    return by_module, others


def read_adapter_weights(in_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The LoRA tensors of adapter_model.safetensors by module path; a key that is not LoRA's must belong to the
    config's modules_to_save (read them with read_adapter_tensors)."""
    by_module, others = read_adapter_tensors(in_dir)
    if others and not read_adapter_config(in_dir).modules_to_save:
        raise AdapterFileError(f"{in_dir / ADAPTER_WEIGHTS}: unexpected key {KEY_PREFIX + next(iter(others))!r}; "
                               "a LoRA "
                               f"adapter holds only '{KEY_PREFIX}<module path>.lora_A.weight' and '.lora_B.weight' "
                               "(and the tensors of its config's modules_to_save)")
    return by_module


def load_adapter(model: nn.Module, in_dir) -> LoRAConfig:
    """Load a PEFT-format LoRA adapter into `model`, injecting LoRA exactly where its keys say.

    Layers that already have LoRA (e.g. from inject_lora) receive the weights if their rank and
    scaling agree. A layer injected here runs the adapter's init first, so a PiSSA/OLoRA adapter
    turns the original base into its residual, as PEFT's from_pretrained does (lora/init.py). The
    modules_to_save tensors are copied into their modules. Every key, shape and module is checked
    before the model is changed.
    """
    in_dir = Path(in_dir)
    config = read_adapter_config(in_dir)
    weights, others = read_adapter_tensors(in_dir)
    modules = dict(model.named_modules())
    weights_file = in_dir / ADAPTER_WEIGHTS

    for module_path, pair in weights.items():
        module = modules.get(module_path)
        key_a = f"{KEY_PREFIX}{module_path}.lora_A.weight"
        if module is None:
            raise ValueError(f"{weights_file}: key {key_a!r} names module {module_path!r}, "
                             "which this model does not have")
        if not isinstance(module, (*LORA_BASES, LinearWithLoRA)):
            raise ValueError(f"{weights_file}: key {key_a!r} targets {module_path}, "
                             f"a {type(module).__name__}, not a Linear")
        r = config.rank_for(module_path)
        expected = {"lora_A": (r, module.in_features), "lora_B": (module.out_features, r)}
        if config.lora_bias:
            expected["lora_B.bias"] = (module.out_features,)
        if config.use_dora:
            expected["lora_magnitude_vector"] = (module.out_features,)
        if set(pair) != set(expected):
            name = sorted(set(pair) ^ set(expected))[0]
            state = "missing" if name in expected else "unexpected"
            raise ValueError(f"{weights_file}: {state} key {KEY_PREFIX}{module_path}.{name} (the config says "
                             f"lora_bias={config.lora_bias}, use_dora={config.use_dora})")
        for which, shape in expected.items():
            if tuple(pair[which].shape) != shape:
                suffix = f"{which}.weight" if which in ("lora_A", "lora_B") else which
                raise ValueError(
                    f"{weights_file}: key {KEY_PREFIX}{module_path}.{suffix} has shape {tuple(pair[which].shape)}, "
                    f"expected {shape} (r={r}, module {module.in_features}->{module.out_features})"
                )
        if isinstance(module, LinearWithLoRA):
            have = (module.r, module.alpha, module.rslora, module.lora_B.bias is not None, module.use_dora)
            want = (r, config.alpha_for(module_path), config.rslora, config.lora_bias, config.use_dora)
            if have != want:
                raise ValueError(f"{module_path} already has LoRA with r={have[0]}, alpha={have[1]}, rslora={have[2]}, "
                                 f"lora_bias={have[3]}, use_dora={have[4]}; the adapter in {in_dir} has r={want[0]}, "
                                 f"alpha={want[1]}, rslora={want[2]}, lora_bias={want[3]}, use_dora={want[4]}")
    stray = [p for p in lora_layers(model) if p not in weights]
    if stray:
        raise ValueError(f"{weights_file}: missing key {KEY_PREFIX}{stray[0]}.lora_A.weight for the model's "
                         f"LoRA layer {stray[0]} ({len(stray)} such layers)")
    if others and not config.modules_to_save:
        raise ValueError(f"{weights_file}: unexpected key {KEY_PREFIX + next(iter(others))!r}; "
                         "a LoRA adapter holds only "
                         f"'{KEY_PREFIX}<module path>.lora_A.weight' and '.lora_B.weight' (and, with modules_to_save "
                         "in its config, the saved modules' tensors)")
    saved = check_saved_tensors(model, config.modules_to_save, others, weights_file)

    with torch.no_grad():
        # in model order, as PEFT injects: an init that draws random numbers (pissa_niter_N) then draws PEFT's
        for module_path in [p for p in modules if p in weights]:
            pair, layer = weights[module_path], modules[module_path]
            if not isinstance(layer, LinearWithLoRA):
                layer = wrap_linear(model, module_path, config)
            layer.lora_A.weight.copy_(pair["lora_A"])
            layer.lora_B.weight.copy_(pair["lora_B"])
            if "lora_B.bias" in pair:
                layer.lora_B.bias.copy_(pair["lora_B.bias"])
            if "lora_magnitude_vector" in pair:
                layer.lora_magnitude_vector.copy_(pair["lora_magnitude_vector"])
        for key, target in saved.items():
            target.copy_(others[key])
    return config

