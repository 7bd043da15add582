"""Put LoRA into a model by regex, choose what trains, merge and unmerge.

Every function here works on any nn.Module: the model ports in models/ need no LoRA awareness.
Injection swaps a matched nn.Linear for a LinearWithLoRA that keeps the same `weight`/`bias`
Parameters, so the model's state_dict keys are unchanged apart from the added lora_A/lora_B.
An NF4Linear (a Linear quantized to 4 bits, lora/quant.py) is a target exactly like an nn.Linear.
`all_linear_paths` is PEFT's `target_modules="all-linear"` spelled out for a model, so it can be printed.
"""

import difflib
import re

import torch
from torch import nn

from lora.config import LoRAConfig, pattern_key
from lora.init import refusal as init_refusal
from lora.layer import DEFAULT_ADAPTER, LinearWithAdapters, LinearWithLoRA
from lora.modules_to_save import modules_to_save_paths
from lora.quant import NF4Linear, NF4Tensor

LORA_BASES = (nn.Linear, NF4Linear)  # the layers LoRA wraps: a 16-bit Linear or its NF4 form

_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")
ALL_LINEAR = "all-linear"  # PEFT's INCLUDE_LINEAR_LAYERS_SHORTHAND


def inject_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Swap every nn.Linear whose dotted path fullmatches a target for a LinearWithLoRA.

    All checks run before anything is swapped, so a failing call leaves the model untouched.
    Raises ValueError when a pattern matches no module (listing the closest Linear paths),
    when a match is not an nn.Linear (naming it and its type), or when a match is already
    a LoRA layer or part of one. Returns the injected module paths in model order.
    """
    # An NF4 weight is a module only to hold its buffers: like a Parameter, it is never a target of its own,
    # so a pattern selects the same layers with and without quantization.
    modules = {path: m for path, m in model.named_modules() if not isinstance(m, NF4Tensor)}
    lora_owned = {f"{path}.{child}" for path, m in modules.items() if isinstance(m, LinearWithLoRA)
                  for child in ("lora_A", "lora_B", "lora_dropout")}
    for pattern in config.patterns:
        if pattern.lower() == ALL_LINEAR:
            raise ValueError("target 'all-linear' is PEFT's shorthand, not a regex: expand it first with "
                             "expand_targets(model, patterns), which lists the module paths it stands for")
        if not any(re.fullmatch(pattern, path) for path in modules if path):
            raise ValueError(no_match_message(pattern, model))

    to_wrap = []
    for path, module in modules.items():
        if not path or not config.matches(path):
            continue
        if isinstance(module, LinearWithLoRA):
            raise ValueError(f"{path} already has LoRA: inject_lora was called twice on it. "
                             "Load or train the existing adapter instead.")
        if path in lora_owned:
            raise ValueError(f"target matches {path}, which is part of a LoRA layer; anchor the pattern so it selects "
                             "the Linear itself (e.g. end it with '_proj').")
        if not isinstance(module, LORA_BASES):
            raise ValueError(
                f"target matches {path}, a {type(module).__name__}, but LoRA here wraps only nn.Linear "
                "(or its NF4 form, NF4Linear). "
                "Anchor the pattern so it stops at Linear layers "
                "(e.g. '...\\.(query|key|value)' instead of '...(query|key|value)')."
            )
        problem = init_refusal(module, config.rank_for(path), config.init, path)
        if problem:
            raise ValueError(problem)
        to_wrap.append(path)
    for name, keys in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern)):
        for key in keys:  # PEFT ignores a key that applies nowhere; here it is a typo caught before training
            if not any(pattern_key([key], path) for path in to_wrap):
                raise ValueError(f"{name} key {key!r} applies to none of the {len(to_wrap)} targeted layers (a key "
                                 "must match a dotted tail of a path, e.g. 'q_proj' or 'layers\\.0\\..*'): "
                                 f"e.g. {to_wrap[0]!r}")
    for name in config.modules_to_save:
        saved = modules_to_save_paths(model, [name])
        inside = [p for p in to_wrap for s in saved if p == s or p.startswith(s + ".")]
        if inside:
            raise ValueError(f"modules_to_save {name!r} holds the LoRA target {inside[0]}: a module is either adapted "
                             "or trained fully, not both")

    for path in to_wrap:
        wrap_linear(model, path, config)
    return to_wrap


def wrap_linear(model: nn.Module, path: str, config: LoRAConfig) -> LinearWithLoRA:
    """Replace the nn.Linear (or NF4Linear) at `path` by a LinearWithLoRA around it, and return the new layer."""
    parent_path, _, child_name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    layer = LinearWithLoRA(getattr(parent, child_name), config.rank_for(path), config.alpha_for(path), config.dropout,
                           config.rslora, lora_bias=config.lora_bias, init=config.init, use_dora=config.use_dora)
    layer.module_path = path
    setattr(parent, child_name, layer)
    return layer


def no_match_message(pattern: str, model: nn.Module, n_closest: int = 8) -> str:
    """Why `pattern` selected nothing, and the Linear paths it was probably meant to select."""
    linear_types = (*LORA_BASES, LinearWithLoRA)
    linear_paths = [p for p, m in model.named_modules() if isinstance(m, linear_types) and ".lora_" not in p]
    # Collapse layer indices so 32 copies of one projection count as one candidate.
    shapes = {}
    for path in linear_paths:
        shapes.setdefault(_LAYER_INDEX.sub("N", path), path)
    closest = difflib.get_close_matches(pattern, list(shapes), n=n_closest, cutoff=0.0)
    lines = [f"target pattern '{pattern}' matches no module (patterns must re.fullmatch the whole dotted path)."]
    searched = [p for p in linear_paths if re.search(pattern, p)]
    if searched:
        lines.append(f"It occurs inside {len(searched)} Linear path(s), e.g. {searched[0]!r}: "
                     "prefix it with '.*' to match the whole path.")
    if closest:
        lines.append("Closest Linear modules (N = any layer index):")
        lines += [f"  {shape}" for shape in closest]
    else:
        lines.append("The model has no nn.Linear modules at all.")
    return "\n".join(lines)


def lora_layers(model: nn.Module) -> dict[str, LinearWithLoRA]:
    """Every LinearWithLoRA in the model, by dotted path."""
    return {path: m for path, m in model.named_modules() if isinstance(m, LinearWithLoRA)}


def adapter_layers(model: nn.Module) -> dict[str, LinearWithAdapters]:
    """Every layer holding adapters, by dotted path: the default adapter's LinearWithLoRA layers and the
    LinearWithAdapters that only named adapters reach (lora/multi_adapter.py)."""
    return {path: m for path, m in model.named_modules() if isinstance(m, LinearWithAdapters)}


def adapter_names(model: nn.Module) -> list[str]:
    """The adapters of the model, the default one first, then in the order they were added."""
    names = []
    for layer in adapter_layers(model).values():
        names += [name for name in layer.adapter_names() if name not in names]
    return sorted(names, key=lambda name: name != DEFAULT_ADAPTER)


def adapter_parameter_ids(model: nn.Module, adapter: str | None = DEFAULT_ADAPTER) -> set[int]:
    """ids of the parameters one adapter trains (None: every adapter), over every layer: lora_A, lora_B, its
    bias, DoRA's magnitude. The layers say which are theirs, so no name pattern can mistake one adapter's
    lora_A for another's."""
    layers = adapter_layers(model).values()
    names = [adapter] if adapter is not None else {name for layer in layers for name in layer.adapter_names()}
    return {id(param) for layer in layers for name in names for param in layer.adapter_parameters(name)}


def mark_only_lora_trainable(model: nn.Module, also=(), adapter: str = DEFAULT_ADAPTER) -> int:
    """Freeze everything but one adapter's parameters (lora_A, lora_B, lora_B's bias, DoRA's magnitude),
    plus the parameters under the names in `also`.

    `adapter` picks which adapter trains: "default" (the LinearWithLoRA layers' own lora_A/lora_B),
    or a named one (lora/multi_adapter.py). The others stay frozen, as PEFT trains only its active
    adapter: a match on the names alone would also unfreeze ``<path>.lora_adapters.<name>.lora_A.weight``.
    `also` holds module paths or parameter names (e.g. ``("audio_proj", "logit_scale")``); each
    must name something, or the call raises. Returns the number of trainable parameters.
    """
    if adapter == DEFAULT_ADAPTER and not lora_layers(model):
        raise ValueError("the model has no LoRA layers: call inject_lora (or load_adapter) first")
    trained = adapter_parameter_ids(model, adapter)
    if not trained:
        raise ValueError(f"the model has no adapter {adapter!r} to train; it has {adapter_names(model)}")
    names = [n for n, _ in model.named_parameters()]
    for prefix in also:
        if not any(n == prefix or n.startswith(prefix + ".") for n in names):
            close = difflib.get_close_matches(prefix, sorted({n.rsplit(".", 1)[0] for n in names} | set(names)), n=5)
            raise ValueError(f"also={prefix!r} names no parameter or module of the model; close names: {close}")
    trainable = 0
    for name, param in model.named_parameters():
        is_also = any(name == p or name.startswith(p + ".") for p in also)
        param.requires_grad_(id(param) in trained or is_also)
        trainable += param.numel() if param.requires_grad else 0
    return trainable


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter alone: ``{"<module path>.lora_A.weight": tensor, ...}`` (detached, same storage)."""
    state = {}
    for path, layer in lora_layers(model).items():
        for name in layer.adapter_params():
            state[f"{path}.{name}"] = layer.get_parameter(name).detach()
    return state


def initial_adapter(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """A copy of every layer's A and B, ``{path: {"lora_A": A, "lora_B": B}}``: take it right after a PiSSA/OLoRA
    init, before training, for save_adapter(..., initial=) to write the adapter as plain LoRA (lora/init.py)."""
    return {path: {"lora_A": layer.lora_A.weight.detach().clone(), "lora_B": layer.lora_B.weight.detach().clone()}
            for path, layer in lora_layers(model).items()}


def all_linear_paths(model: nn.Module, exclude=()) -> list[str]:
    """What PEFT's ``target_modules="all-linear"`` selects in `model` (tuners_utils._maybe_include_all_linear_layers).

    Every Linear (nn.Linear, its NF4 form, or one that already has LoRA), except the output head: for a
    transformers model PEFT drops ``get_output_embeddings()`` (the LM head, which maps to the vocabulary and
    is usually tied); this repo's ports have no such method, and their output head is the Linear named
    `lm_head` (``language_model.lm_head`` in InstructBLIP), so that is dropped. A plain nn.Module without
    either keeps every Linear, as in PEFT. `exclude` drops more: modules under these paths (the heads that
    train fully, which need no LoRA on top). PEFT's sequence-classification rule (drop `score`/`classifier`
    when task_type is SEQ_CLS) has no counterpart: no task here is one.
    """
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    paths = []
    for path, module in model.named_modules():
        if not path or not isinstance(module, (*LORA_BASES, LinearWithLoRA)) or ".lora_" in path:
            continue
        if (module is output) or (output is None and path.rpartition(".")[2] == "lm_head"):
            continue
        if any(path == e or path.startswith(e + ".") for e in exclude):
            continue
        paths.append(path)
    return paths


def expand_targets(model: nn.Module, patterns, exclude=()) -> list[str]:
    """The target patterns with PEFT's "all-linear" (any case, as PEFT) replaced by one escaped regex per
    module path all_linear_paths finds, so LoRAConfig, the previews and the saved adapter see explicit paths."""
    expanded = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        if pattern.lower() == ALL_LINEAR:
            paths = [re.escape(path) for path in all_linear_paths(model, exclude)]
            expanded += [path for path in paths if path not in expanded]
        elif pattern not in expanded:
            expanded.append(pattern)
    return expanded


def merge_lora(model: nn.Module) -> list[str]:
    """Merge the active adapter into the base weight of every layer holding it, as PEFT's merge_adapter:
    the default adapter's LinearWithLoRA layers and the layers only named adapters reach (LinearWithAdapters)
    alike, so the merged model computes what the unmerged one did. Every adapter layer is then marked merged
    (a layer without the active adapter keeps its weight) and the model holds one merged update until
    unmerge_lora. All layers are checked finite before any changes. Returns the paths of the layers marked."""
    layers = adapter_layers(model)
    for path, layer in layers.items():
        if layer.merged:
            raise RuntimeError(f"LoRA layer {path} is already merged")
        if layer.active_adapter is None:  # inside lora.multi_adapter.disable_adapters
            raise RuntimeError("no adapter is active (the adapters are disabled), so there is nothing to merge; "
                               "merge after the disable_adapters block")
        # computed again by merge(): keeping every merged weight until all are checked would double
        # the memory of the adapted layers, and this check is what makes the merge all-or-nothing
        if not torch.isfinite(layer.merged_weight()).all():
            raise ValueError(f"refusing to merge: LoRA layer {path} would get non-finite weights; nothing was merged")
    for layer in layers.values():
        layer.merge()
    return list(layers)


def unmerge_lora(model: nn.Module) -> list[str]:
    """Undo merge_lora: subtract the merged update from the base weight of every merged layer (a layer
    added after the merge, by loading a named adapter, holds no update and is left as it is)."""
    merged = {path: layer for path, layer in adapter_layers(model).items() if layer.merged}
    if not merged:
        raise RuntimeError("the model's LoRA layers are not merged: there is nothing to unmerge (merge_lora merges)")
    for layer in merged.values():
        layer.unmerge()
    return list(merged)


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> int:
    """Hold every frozen floating-point parameter in `dtype` (bf16 for a frozen 7B tower); trainable
    parameters (LoRA, heads) stay as they are, fp32. Returns how many parameters were cast.

    Call it after mark_only_lora_trainable. The LoRA branch keeps running in its own fp32 weights
    over a half-precision base (LinearWithLoRA.forward), so only memory and speed change. Buffers
    are left alone: they hold things like rotary frequencies, which lose precision in bf16, and an NF4
    layer's packed uint8 codes and fp32 absmax state, which must keep their exact dtypes.
    """
    cast = 0
    with torch.no_grad():
        for param in model.parameters():
            if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
                cast += 1
    return cast


def freeze_as_trained(model: nn.Module, heads, dtype: torch.dtype | None = None) -> int:
    """A reloaded run's parameters held as training held them: LoRA's and the named `heads` (the fully trained
    tensors) trainable, everything else frozen and, with `dtype` (a bf16 run's), cast to it, so the reloaded
    model computes what training evaluated. Returns how many parameters were cast."""
    heads, lora = set(heads), adapter_parameter_ids(model)
    for name, param in model.named_parameters():
        param.requires_grad_(name in heads or id(param) in lora)
    return cast_frozen(model, dtype) if dtype is not None else 0
