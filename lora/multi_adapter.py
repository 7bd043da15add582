"""Several adapters in one model, PEFT's way: load them by name, switch, switch off, delete, combine.

    from lora import load_adapter                        # the default adapter, exactly as before
    from lora import multi_adapter as ma
    load_adapter(model, "runs/a")                        # "default"
    ma.load_adapter(model, "runs/b", name="b")           # beside it; b may adapt other layers
    ma.set_adapter(model, "b")                           # the forward now adds b's update, and only b's
    with ma.disable_adapters(model):
        base_out = model(x)                              # the base model's output, exactly
    ma.add_weighted_adapter(model, ["default", "b"], [0.7, 0.3], "mix", combination_type="cat")
    ma.save_adapter(model, "runs/out", "mix")           # runs/out/mix/, in PEFT's format
    ma.delete_adapter(model, "b")

Where they live (lora/layer.py): the default adapter's parts are LinearWithLoRA's own attributes
(keys ``<path>.lora_A.weight``, as always); a named adapter is a LoRAAdapter in the layer's
``lora_adapters[name]`` (keys ``<path>.lora_adapters.<name>.lora_A.weight``). A layer only named
adapters reach is a LinearWithAdapters, which the default-adapter tools (lora_layers, lora.save_adapter)
do not see; merge_lora and unmerge_lora reach every layer and merge the active adapter, as PEFT's
merge_adapter. One adapter is active model-wide; a layer without it computes its base alone, as in
PEFT. Named adapters are loaded frozen (requires_grad False), as PEFT loads them;
mark_only_lora_trainable(model, adapter=name) trains one of them instead of the default adapter.

Saving. save_adapter(model, out_dir, name) writes what PEFT's save_pretrained(out_dir,
selected_adapters=[name]) writes: out_dir/<name>/ holding adapter_model.safetensors, whose keys omit
the name (``base_model.model.<path>.lora_A.weight``), and adapter_config.json. The config is read off
the layers: the exact paths as target_modules, the commonest rank and alpha as r and lora_alpha, the
other layers' in rank_pattern/alpha_pattern. PEFT loads it with PeftModel.from_pretrained(base,
out_dir/<name>, adapter_name=name) or load_adapter; load_adapter here, with name=, reads it back.

Combining. Adapter i has its own scaling sᵢ (alpha/r, or alpha/√r with rsLoRA), so the weighted
update is D = Σ wᵢ·sᵢ·BᵢAᵢ. The new adapter is plain LoRA with alpha = r, i.e. scaling exactly 1:

    cat     A' = [w₁s₁A₁; w₂s₂A₂; ..], B' = [B₁ B₂ ..], rank Σrᵢ: B'A' = D exactly.
    svd     B' = U_k·S_k, A' = V_kᵀ from the SVD of D: the best rank-k approximation of D (Eckart-Young),
            D itself when k >= rank D. k = svd_rank, default the largest rank combined.
    linear  A' = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ, B' = Σ √|wᵢsᵢ|·Bᵢ, equal ranks only: PEFT's mix of the factors.
            B'A' = Σᵢⱼ ±√|wᵢsᵢ wⱼsⱼ|·BᵢAⱼ holds cross terms BᵢAⱼ (i ≠ j), so it is D only for one
            adapter; kept because it is what PEFT's "linear" means, and it is that formula exactly.

A lora_bias combines exactly in every mode: b' = Σ wᵢsᵢbᵢ. All three equal PEFT's for plain LoRA,
where PEFT is right. PEFT up to 0.21 is wrong for rsLoRA (huggingface/peft#3761, fixed in 0.22): it
folds each sᵢ into the factors as above, but the new adapter copies use_rslora from the first one, so
its scaling is r/√r = √r, not 1, and every combined rsLoRA update is √r times too large. It also copies
lora_bias and use_dora from the first adapter without combining biases or magnitudes. DoRA adapters cannot be
combined exactly: W' = m·(W + ΔW)/||W + ΔW||_c is not linear in ΔW, so no adapter's update is a sum
of theirs; add_weighted_adapter refuses them, and says so.
"""

import math
import re
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from lora.adapter import load_adapter as load_default_adapter, read_adapter_config, read_adapter_tensors, write_adapter
from lora.config import LoRAConfig
from lora.init import modifies_base
from lora.inject import LORA_BASES, adapter_layers, adapter_names
from lora.layer import DEFAULT_ADAPTER, LinearWithAdapters, LinearWithLoRA, LoRAAdapter
from lora.quant import NF4Linear, NF4Tensor

COMBINATIONS = ("svd", "linear", "cat")


def active_adapter(model: nn.Module) -> str | None:
    """The name of the adapter the forward adds (None inside disable_adapters)."""
    layers = list(adapter_layers(model).values())
    return layers[0].active_adapter if layers else DEFAULT_ADAPTER


def load_adapter(model: nn.Module, in_dir, name: str = DEFAULT_ADAPTER) -> LoRAConfig:
    """Load a PEFT-format adapter under `name`; "default" is lora.load_adapter itself.

    A named adapter is added beside the others without changing them or which one is active. Every key
    and shape is checked before the model changes. Load the default adapter first: lora.load_adapter
    and inject_lora do not target a layer that only named adapters hold. Refused: a name in use, an adapter whose init
    rewrote the base weights (PiSSA/OLoRA: every adapter shares that base), and modules_to_save
    (they replace whole modules for all adapters)."""
    if name == DEFAULT_ADAPTER:
        return load_default_adapter(model, in_dir)
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name {name!r} must be a non-empty string without dots (it becomes part of the keys)")
    if name in adapter_names(model):
        raise ValueError(f"the model already has an adapter named {name!r}; delete_adapter it or choose another name")
    config = read_adapter_config(in_dir)
    weights, others = read_adapter_tensors(in_dir)
    if modifies_base(config.init):
        raise ValueError(f"{in_dir}: init {config.init!r} rewrites the base weights, which every adapter shares; load "
                         "it as the default adapter, or save it converted to plain LoRA (save_adapter(..., initial=))")
    if others or config.modules_to_save:
        raise ValueError(f"{in_dir}: modules_to_save ({list(config.modules_to_save)}) replace whole modules for every "
                         "adapter at once; only the default adapter may carry them")
    modules = dict(model.named_modules())
    for path, tensors in weights.items():
        module = modules.get(path)
        if not isinstance(module, (*LORA_BASES, LinearWithAdapters)):
            what = "no such module" if module is None else f"a {type(module).__name__}, not a Linear"
            raise ValueError(f"{in_dir}: the adapter has weights for {path}: {what}")
        r = config.rank_for(path)
        expected = {"lora_A": (r, module.in_features), "lora_B": (module.out_features, r)}
        expected |= {"lora_B.bias": (module.out_features,)} if config.lora_bias else {}
        expected |= {"lora_magnitude_vector": (module.out_features,)} if config.use_dora else {}
        shapes = {which: tuple(t.shape) for which, t in tensors.items()}
        if shapes != expected:
            raise ValueError(f"{in_dir}: {path} holds {shapes}, expected {expected} (r={r}, "
                             f"lora_bias={config.lora_bias}, use_dora={config.use_dora})")
    active = active_adapter(model)
    with torch.no_grad():
        for path, tensors in weights.items():
            layer = modules[path]
            if not isinstance(layer, LinearWithAdapters):
                layer = wrap_for_named(model, path, active)
            adapter = LoRAAdapter(layer, config.rank_for(path), config.alpha_for(path), config.dropout, config.rslora,
                                  config.lora_bias, config.use_dora)
            for which, tensor in tensors.items():
                adapter.get_parameter(f"{which}.weight" if which in ("lora_A", "lora_B") else which).copy_(tensor)
            layer.lora_adapters[name] = adapter.requires_grad_(False)
    return config


def wrap_for_named(model: nn.Module, path: str, active: str | None) -> LinearWithAdapters:
    """Swap the Linear at `path` for a LinearWithAdapters (no default adapter) that follows the model's active name."""
    parent_path, _, child_name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    layer = LinearWithAdapters(getattr(parent, child_name))
    layer.module_path, layer.active_adapter = path, active
    setattr(parent, child_name, layer)
    return layer


def check_not_merged(model: nn.Module, doing: str):
    merged = [path for path, layer in adapter_layers(model).items() if layer.merged]
    if merged:
        raise RuntimeError(f"cannot {doing}: {len(merged)} layer(s), e.g. {merged[0]}, hold a merged update in their "
                           "weight; unmerge_lora(model) first")


def set_adapter(model: nn.Module, name: str):
    """Make adapter `name` the one every layer adds (layers that lack it compute their base alone)."""
    names = adapter_names(model)
    if name not in names:
        raise ValueError(f"the model has no adapter {name!r}; it has {names}")
    check_not_merged(model, f"switch to adapter {name!r}")
    for layer in adapter_layers(model).values():
        layer.active_adapter = name


@contextmanager
def disable_adapters(model: nn.Module):
    """Inside the block every layer computes its base alone, so the model is the base model exactly;
    the adapter active before is active again afterwards, also after an exception."""
    check_not_merged(model, "disable the adapters")  # the base weight itself holds an update
    layers = adapter_layers(model)
    before = {path: layer.active_adapter for path, layer in layers.items()}
    for layer in layers.values():
        layer.active_adapter = None
    try:
        yield model
    finally:
        for path, layer in layers.items():
            layer.active_adapter = before[path]


def delete_adapter(model: nn.Module, name: str):
    """Remove adapter `name` from every layer. A layer left without adapters becomes its base Linear
    again (the same Parameters, as an nn.Linear or NF4Linear); deleting the active adapter makes
    "default" active. The default adapter is part of the layers themselves and cannot be deleted."""
    if name == DEFAULT_ADAPTER:
        raise ValueError("the default adapter is part of its layers (LinearWithLoRA's own lora_A/lora_B) and cannot be "
                         "deleted; start from a fresh copy of the base model instead")
    if name not in adapter_names(model):
        raise ValueError(f"the model has no adapter {name!r}; it has {adapter_names(model)}")
    check_not_merged(model, f"delete adapter {name!r}")
    was_active = active_adapter(model) == name
    for path, layer in adapter_layers(model).items():
        if name in layer.lora_adapters:
            del layer.lora_adapters[name]
        if not isinstance(layer, LinearWithLoRA) and not layer.lora_adapters:
            parent_path, _, child_name = path.rpartition(".")
            setattr(model.get_submodule(parent_path), child_name, base_linear(layer))
        elif was_active:
            layer.active_adapter = DEFAULT_ADAPTER


def base_linear(layer: LinearWithAdapters) -> nn.Module:
    """The plain layer around `layer`'s own weight and bias: an NF4Linear for an NF4 weight, else an nn.Linear."""
    if isinstance(layer.weight, NF4Tensor):
        return NF4Linear(layer.weight, layer.bias)
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight, linear.bias = layer.weight, layer.bias
    return linear


def add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], name: str,
                         combination_type: str = "svd", svd_rank: int | None = None) -> None:
    """Add adapter `name` whose update combines `adapters` with `weights` (module docstring: cat is
    exact, svd the best rank-k approximation, linear PEFT's mix of the factors). With one adapter every
    type is "linear", as in PEFT, which is then exact. The new adapter is frozen and not made active."""
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type {combination_type!r} is not one of {COMBINATIONS} (PEFT's ties, dare and "
                         "magnitude_prune variants prune the update and are not implemented)")
    if not adapters or len(adapters) != len(weights):
        raise ValueError(f"give one weight per adapter: {len(adapters)} adapter(s), {len(weights)} weight(s)")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise ValueError(f"adapter weights must be finite numbers, got {weights}")
    names = adapter_names(model)
    missing = [a for a in adapters if a not in names]
    if missing:
        raise ValueError(f"the model has no adapter {missing[0]!r}; it has {names}")
    if name in names or not name or "." in name:
        raise ValueError(f"adapter name {name!r} is taken or invalid (a non-empty string without dots)")
    combination_type = "linear" if len(adapters) == 1 else combination_type
    layers = adapter_layers(model)
    parts = {path: [(layer.adapter(a), w) for a, w in zip(adapters, weights) if layer.adapter(a) is not None]
             for path, layer in layers.items()}
    for path, present in parts.items():
        for adapter, _ in present:
            if adapter.lora_magnitude_vector is not None:
                raise ValueError(f"cannot combine DoRA adapters (one is at {path}): W' = m·(W + ΔW)/||W + ΔW||_c is "
                                 "not linear in ΔW, so no single adapter's update equals the weighted sum of theirs; "
                                 "merge each into its own copy of the model instead")
        if combination_type == "linear" and len({adapter.r for adapter, _ in present}) > 1:
            raise ValueError(f"combination_type 'linear' mixes A and B factor by factor and needs equal ranks; at "
                             f"{path} they are {[adapter.r for adapter, _ in present]}: use 'cat' (exact) or 'svd'")
    if svd_rank is not None and not (isinstance(svd_rank, int) and svd_rank >= 1):
        raise ValueError(f"svd_rank must be a positive integer, got {svd_rank!r}")
    # an adapter's rank is its largest over the layers (PEFT: max of r and its rank_pattern)
    ranks = [max(layer.adapter(a).r for layer in layers.values() if layer.adapter(a) is not None) for a in adapters]
    new_rank = {"cat": sum(ranks), "svd": svd_rank or max(ranks), "linear": None}[combination_type]
    # one dropout for the whole new adapter, the first adapter's, as PEFT copies the first adapter's config
    first = next(layer.adapter(adapters[0]) for layer in layers.values() if layer.adapter(adapters[0]) is not None)
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    with torch.no_grad():
        for path, present in parts.items():
            if present:
                add_combination(layers[path], present, name, combination_type, new_rank, dropout)


def add_combination(layer: LinearWithAdapters, present: list, name: str, combination_type: str, new_rank: int | None,
                    dropout: float):
    """Build the combined adapter of one layer from its (adapter, weight) pairs and add it as `name`."""
    dtype = present[0][0].lora_A.weight.dtype
    if combination_type == "cat":
        # the same ops as PEFT (A·w·s, in that order), so plain LoRA agrees bit for bit; zero rows pad to the
        # adapter's rank where a layer lacks some of the combined adapters, as PEFT pads
        lora_a = torch.cat([adapter.lora_A.weight * w * adapter.scaling for adapter, w in present])  # (Σr, in)
        lora_b = torch.cat([adapter.lora_B.weight for adapter, _ in present], dim=1)  # (out, Σr)
    elif combination_type == "svd":
        # D = Σ wᵢ·(sᵢ·BᵢAᵢ): each adapter's own scaling inside, as PEFT's get_delta_weight; (out, in)
        deltas = [adapter.lora_B.weight @ adapter.lora_A.weight * adapter.scaling for adapter, _ in present]
        delta = weighted_sum(deltas, [w for _, w in present])
        u, s, vh = torch.linalg.svd(delta, full_matrices=True)  # PEFT's call: (out, out), (k,), (in, in)
        k = min(new_rank, s.numel())
        lora_b, lora_a = u[:, :k] @ torch.diag(s[:k]), vh[:k]  # (out, k), (k, in)
    else:
        signed = [math.sqrt(abs(w * a.scaling)) * (1 if w * a.scaling >= 0 else -1) for a, w in present]
        unsigned = [abs(v) for v in signed]  # the sign goes on A only, or it would cancel in B'A'
        lora_a = weighted_sum([adapter.lora_A.weight for adapter, _ in present], signed)
        lora_b = weighted_sum([adapter.lora_B.weight for adapter, _ in present], unsigned)
        new_rank = lora_a.shape[0]
    has_bias = any(adapter.lora_B.bias is not None for adapter, _ in present)
    combined = LoRAAdapter(layer, new_rank, new_rank, dropout, rslora=False, lora_bias=has_bias)  # scaling exactly 1
    nn.init.zeros_(combined.lora_A.weight)
    combined.lora_A.weight[: lora_a.shape[0]] = lora_a.to(dtype)
    combined.lora_B.weight[:, : lora_b.shape[1]] = lora_b.to(dtype)
    if has_bias:  # b' = Σ wᵢsᵢbᵢ: the bias update is linear in every mode
        combined.lora_B.bias.copy_(sum(adapter.lora_B.bias * (w * adapter.scaling) for adapter, w in present
                                       if adapter.lora_B.bias is not None))
    layer.lora_adapters[name] = combined.requires_grad_(False)


def weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ wᵢ·tᵢ as PEFT's task_arithmetic computes it (stack, multiply by fp32 weights, sum), for equal results."""
    stacked = torch.stack(tensors)
    return (stacked * torch.tensor(weights, device=stacked.device).view(-1, *[1] * (stacked.dim() - 1))).sum(0)


def save_adapter(model: nn.Module, out_dir, name: str, base_model_name_or_path: str | None = None) -> Path:
    """Write adapter `name` into out_dir/<name>/ in PEFT's format, as PEFT's save_pretrained(out_dir,
    selected_adapters=[name]) does (module docstring); returns that directory. The default adapter is saved by
    lora.save_adapter with the config it was trained with, which also writes modules_to_save and converts
    PiSSA/OLoRA; a combined adapter (add_weighted_adapter) is saved here like any named one."""
    if name == DEFAULT_ADAPTER:
        raise ValueError("save the default adapter with lora.save_adapter(model, out_dir, config): it writes the "
                         "config the adapter was trained with, its modules_to_save and PiSSA/OLoRA's conversion")
    holders = {path: layer.adapter(name) for path, layer in adapter_layers(model).items()
               if layer.adapter(name) is not None}
    if not holders:
        raise ValueError(f"the model has no adapter {name!r} to save; it has {adapter_names(model)}")
    config = named_adapter_config(holders)
    pairs = {}
    for path, adapter in holders.items():
        pair = {"lora_A": adapter.lora_A.weight, "lora_B": adapter.lora_B.weight}
        if config.lora_bias:
            # lora_bias is one flag for the whole adapter in PEFT; a combined layer whose adapters had none gets b = 0
            bias = adapter.lora_B.bias
            pair["lora_B.bias"] = torch.zeros_like(adapter.lora_B.weight[:, 0]) if bias is None else bias
        if config.use_dora:
            pair["lora_magnitude_vector"] = adapter.lora_magnitude_vector
        pairs[path] = {which: t.detach().cpu() for which, t in pair.items()}
    return write_adapter(Path(out_dir) / name, pairs, config, base_model_name_or_path)


def named_adapter_config(holders: dict[str, nn.Module]) -> LoRAConfig:
    """The LoRAConfig of one adapter from its parts by layer path: what PEFT's adapter_config.json must say for
    PEFT to rebuild the same layers. Refuses settings that PEFT holds once per adapter but that differ by layer."""
    for setting in ("rslora", "use_dora", "dropout"):
        (first_path, first_value), *rest = [(path, adapter_setting(a, setting)) for path, a in holders.items()]
        differing = [(path, value) for path, value in rest if value != first_value]
        if differing:
            raise ValueError(f"cannot save the adapter in PEFT's format: PEFT holds one {setting} per adapter, but its "
                             f"layer {first_path} has {first_value!r} and {differing[0][0]} has {differing[0][1]!r}")
    # the commonest rank and alpha in r and lora_alpha, so the patterns list only the exceptions
    r = Counter(adapter.r for adapter in holders.values()).most_common(1)[0][0]
    alpha = Counter(adapter.alpha for adapter in holders.values()).most_common(1)[0][0]
    # "^" keeps a key to its own path: PEFT's rule also lets a key match a dotted tail of a longer path
    rank_pattern = {f"^{re.escape(path)}": a.r for path, a in holders.items() if a.r != r}
    alpha_pattern = {f"^{re.escape(path)}": a.alpha for path, a in holders.items() if a.alpha != alpha}
    first = next(iter(holders.values()))
    return LoRAConfig([re.escape(path) for path in holders], r=r, alpha=alpha,
                      dropout=adapter_setting(first, "dropout"), rslora=first.rslora,
                      rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                      lora_bias=any(a.lora_B.bias is not None for a in holders.values()),
                      use_dora=first.lora_magnitude_vector is not None)


def adapter_setting(adapter: nn.Module, setting: str):
    """One of an adapter's per-adapter settings in PEFT's config: rslora, use_dora or dropout."""
    if setting == "dropout":
        return adapter.lora_dropout.p if isinstance(adapter.lora_dropout, nn.Dropout) else 0.0
    return adapter.rslora if setting == "rslora" else adapter.lora_magnitude_vector is not None
