"""PEFT's `modules_to_save`: modules trained fully beside LoRA (a new classification head, a projection).

PEFT wraps each in a ModulesToSaveWrapper holding the frozen original and a trainable copy
(``<path>.modules_to_save.default``), and saves the copy under the module's own path: the adapter
file holds ``base_model.model.<path>.<tensor>`` for every entry of the module's state_dict. A name
selects every module whose dotted path *ends with* it, as a plain string (peft/utils/other.py
``_set_trainable``: ``key.endswith(target_key)``), so ``"proj"`` selects ``audio_proj`` too.

Here a trained module is simply the model's module (no frozen copy beside it: the checkpoint is the
original); loading copies the file's tensors into it. These functions pick the modules, collect
their tensors for saving, and check a file's tensors against the model before anything is copied.
"""

from torch import nn


def modules_to_save_paths(model: nn.Module, names) -> list[str]:
    """The module paths PEFT's modules_to_save `names` select in `model` (paths ending with a name), in model order."""
    return [path for path, _ in model.named_modules() if path and any(path.endswith(name) for name in names)]


def saved_module_tensors(model: nn.Module, names, lora_paths) -> dict:
    """{"<module path>.<tensor>": tensor} of the modules `names` select (their state_dict: parameters and persistent
    buffers, as PEFT saves), after checking that PEFT would select exactly these modules and that none holds LoRA."""
    modules = dict(model.named_modules())
    selected = modules_to_save_paths(model, names)
    for name in names:
        if name not in modules:
            raise ValueError(f"modules_to_save {name!r} is not a module of the model (a parameter such as logit_scale "
                             "cannot be one: PEFT saves whole modules); keep it in heads.safetensors")
        others = [p for p in selected if p.endswith(name) and p != name]
        if others:
            raise ValueError(f"modules_to_save {name!r} would also select {others[0]} in PEFT, which matches every "
                             "module path ending with the name: give a name only this module's path ends with")
    for path in selected:
        inside = [p for p in [*selected, *lora_paths] if p.startswith(path + ".")]
        if inside:
            raise ValueError(f"modules_to_save {path!r} contains {inside[0]}, also saved or adapted: "
                             "save one or the other")
    return {f"{path}.{key}": t for path in selected for key, t in modules[path].state_dict().items()}


def check_saved_tensors(model: nn.Module, names, tensors: dict, where) -> dict:
    """The model's tensors that a file's modules_to_save `tensors` ({"<path>.<tensor>": t}) fill, by key; raises,
    naming the key, for a tensor no selected module holds, a wrong shape, or a selected module's missing tensor."""
    modules = dict(model.named_modules())
    targets = {f"{path}.{key}": t for path in modules_to_save_paths(model, names)
               for key, t in modules[path].state_dict(keep_vars=True).items()}
    for key, tensor in tensors.items():
        if key not in targets:
            raise ValueError(f"{where}: unexpected tensor {key!r}: it is not LoRA's, and no module of this model that "
                             f"modules_to_save {list(names)} selects holds it")
        if tuple(tensor.shape) != tuple(targets[key].shape):
            raise ValueError(f"{where}: tensor {key} has shape {tuple(tensor.shape)}, "
                             f"the model's is {tuple(targets[key].shape)}")
    missing = sorted(set(targets) - set(tensors))
    if missing:
        raise ValueError(f"{where}: missing tensor {missing[0]} of a module modules_to_save selects "
                         f"({len(missing)} missing)")
    return targets
