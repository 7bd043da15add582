"""A nested state (dicts, lists, tuples, numbers, strings, tensors, numpy arrays) in one
safetensors file: the tensors as tensors, everything else as JSON in the file's metadata.

Why not `torch.save`: it pickles, and unpickling a file someone hands you runs whatever code
the file names. safetensors holds raw tensor bytes and a JSON header, so reading it can only
produce tensors and JSON values. One file, so one atomic rename publishes the whole state (a
pair of files could be caught half-replaced by a crash).

The JSON tree marks what plain JSON cannot say, by one-key objects:
    {"@tensor": "t3"}               the tensor stored under key "t3"
    {"@ndarray": "t4", "dtype": "uint32"}   a numpy array (held as a tensor of the same bits)
    {"@tuple": [...]}               a tuple (random.setstate insists on tuples)
    {"@dict": [[key, value], ...]}  a dict whose keys are not all strings (optimizer state: ints)
"""

import json
import os

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from common.errors import UserError

FORMAT = "lora-mm nested state v1"  # written in the metadata, checked when read
MARKERS = ("@tensor", "@ndarray", "@tuple", "@dict")


class StateFileError(UserError, ValueError):
    """A state file that is not one this module wrote, or is damaged."""


def encode(value, tensors: dict):
    """`value` as a JSON-able tree; its tensors moved into `tensors` under fresh keys."""
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
        return {"@tensor": key}
    if isinstance(value, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value).copy())
        return {"@ndarray": key, "dtype": str(value.dtype)}
    if isinstance(value, tuple):
        return {"@tuple": [encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and k not in MARKERS for k in value):
            return {k: encode(v, tensors) for k, v in value.items()}
        return {"@dict": [[encode(k, tensors), encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a state file: only tensors, numpy arrays, numbers, "
                    "strings, lists, tuples and dicts")


def decode(tree, tensors: dict):
    """The inverse of `encode`."""
    if isinstance(tree, list):
        return [decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "@tensor" in tree:
        return tensors[tree["@tensor"]]
    if "@ndarray" in tree:
        return tensors[tree["@ndarray"]].numpy().astype(tree["dtype"], copy=False)
    if "@tuple" in tree:
        return tuple(decode(v, tensors) for v in tree["@tuple"])
    if "@dict" in tree:
        return {decode(k, tensors): decode(v, tensors) for k, v in tree["@dict"]}
    return {k: decode(v, tensors) for k, v in tree.items()}


def save_state(state, path: str | os.PathLike):
    """Write `state` to `path` (not atomic by itself: call it through common.atomic.atomic_write)."""
    tensors: dict[str, torch.Tensor] = {}
    tree = encode(state, tensors)
    save_file(tensors, str(path), metadata={"format": FORMAT, "state": json.dumps(tree, allow_nan=True)})


def load_state(path: str | os.PathLike):
    """Read what `save_state` wrote. Nothing in the file can run code; a file of another format,
    or a damaged one, is a StateFileError naming it."""
    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT or "state" not in metadata:
                raise StateFileError(f"{path} is a safetensors file but not a training state written by this toolkit")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        return decode(json.loads(metadata["state"]), tensors)
    except (SafetensorError, OSError, json.JSONDecodeError, KeyError) as error:
        raise StateFileError(f"{path} cannot be read as a training state ({error}); it is damaged or truncated: "
                             "resume from another copy, or start a new --output-dir") from None
