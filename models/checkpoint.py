"""Reading weights from a Hugging Face checkpoint: the one loader behind every model in models/.

A checkpoint is a local directory or a hub id (`org/name`) holding `config.json` and safetensors
weights, either one `model.safetensors` or shards listed by `model.safetensors.index.json`.
We read only what a model needs ("Load only what is needed" in DESIGN.md):

    Checkpoint.open(dir or org/name)   config.json + the index only (the hub: downloaded or cached)
    .load_prefix("audio_tower.")       index -> the few shards holding that prefix -> fetched
                                       (hub) -> safe_open -> only those tensors, prefix stripped
    with torch.device("meta"):         the module costs no memory until its weights arrive
        tower = Qwen2AudioEncoder(cfg)
    load_into(tower, state, source)    shapes checked first, then load_state_dict(assign=True):
                                       the module adopts the checkpoint's tensors, no copy

so a 7B Qwen2-Audio's ~0.6B-parameter audio tower is read without downloading, or materialising,
the language model. A checkpoint without an index is one file: its header gives the key list,
so that file is fetched whole at open time.

The hub goes through `huggingface_hub.hf_hub_download`, which uses the local cache
(HF_HUB_CACHE / HF_HOME) and honours HF_HUB_OFFLINE=1; a file missing from the cache while
offline becomes an error that says how to fetch it.

Convention for modules: load_into refuses a module with any tensor still on the meta device.
Non-persistent buffers are not in the checkpoint, so a module holding one defines
`init_non_persistent_buffers(self)`, which rebuilds its own buffers (on the device of its loaded
weights); load_into calls it on every submodule that has it, after loading.
"""

import json
import re
from pathlib import Path

import torch
import torch.nn as nn
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                    RevisionNotFoundError)
from safetensors import SafetensorError, safe_open

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name; anything else must be a local directory
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
CONVERT_HINT = ("only safetensors is supported; convert once with python -c \"from transformers import "
                "AutoModel; AutoModel.from_pretrained('{0}').save_pretrained('{0}')\"")


class Checkpoint:
    """config.json and the weight map of one checkpoint; shards are fetched and read on demand."""

    def __init__(self, source: str, directory: Path | None, repo_id: str | None, revision: str | None):
        self.source = source  # what the user passed, for messages
        self.directory = directory  # a local checkpoint, or None for a hub id
        self.repo_id = repo_id
        self.revision = revision
        self.config: dict = {}  # config.json
        self.index_file = INDEX  # where the weight map comes from: the index, or the single file's header
        self.weight_map: dict[str, str] = {}  # tensor key -> shard file name
        self.opened_files: list[str] = []  # shard file names opened so far, in order
        self._shard_paths: dict[str, Path] = {}  # shards located (downloaded) so far

    @classmethod
    def open(cls, path_or_hub_id: str | Path, revision: str | None = None, weights: bool = True) -> "Checkpoint":
        """config.json and, unless weights=False (a tokenizer needs none), the weight map."""
        source = str(path_or_hub_id)
        path = Path(source).expanduser()
        if path.exists() or not HUB_ID.fullmatch(source):
            if revision is not None:
                raise ValueError(f"revision={revision!r} applies to hub ids only, and {source!r} is a local path")
            if not path.is_dir():
                raise FileNotFoundError(f"no checkpoint directory at {path}: pass a directory holding config.json "
                                        "and model.safetensors (or its index), or a hub id like org/name")
            checkpoint = cls(source, path, None, None)
        else:
            checkpoint = cls(source, None, source, revision)
        checkpoint.config = checkpoint._read_config()
        if weights:
            checkpoint.weight_map = checkpoint._read_weight_map()
        return checkpoint

    # ---- files ---------------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return str(self.directory) if self.directory is not None else f"hub model {self.repo_id}"

    def _locate(self, filename: str) -> Path | None:
        """Local path of one file of the checkpoint (downloaded or found in the cache); None if absent."""
        if self.directory is not None:
            path = self.directory / filename
            return path if path.is_file() else None
        try:
            return Path(hf_hub_download(self.repo_id, filename, revision=self.revision))
        except LocalEntryNotFoundError as error:  # not cached, and offline or the hub unreachable
            raise FileNotFoundError(self._not_cached(filename)) from error
        except EntryNotFoundError:  # the hub answered: this repo has no such file
            return None
        except RepositoryNotFoundError as error:
            raise FileNotFoundError(f"{self.source!r} is not a local directory, nor a model on the hub (if it is "
                                    "private or gated, log in with `hf auth login`)") from error
        except RevisionNotFoundError as error:
            raise ValueError(f"hub model {self.repo_id} has no revision {self.revision!r}") from error

    def _not_cached(self, filename: str) -> str:
        why = ("HF_HUB_OFFLINE=1 is set" if constants.is_offline_mode()
               else "the hub could not be reached (see the error above)")
        return (f"{self.source!r} is not a local directory, and model {self.repo_id} is not in the local cache "
                f"({filename} is missing from {constants.HF_HUB_CACHE}) and {why}; download it once with "
                f"`hf download {self.repo_id}` or pass a local directory")

    def file(self, name: str, required: bool = True) -> Path | None:
        """Another file of the checkpoint (tokenizer.json, vocab.txt, preprocessor_config.json).
        With required=False, a file that is absent (or, offline, not cached) gives None."""
        try:
            path = self._locate(name)
        except FileNotFoundError:
            if required:
                raise
            path = None
        if path is None and required:
            raise FileNotFoundError(f"{self._where} has no {name}")
        return path

    def _read_config(self) -> dict:
        path = self._locate(CONFIG)
        if path is None:
            raise FileNotFoundError(f"{self._where} has no {CONFIG}: a checkpoint is the directory that "
                                    "save_pretrained writes, with config.json beside the weights")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON ({error}); re-download the checkpoint") from error
        if not isinstance(config, dict):
            raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object of config fields")
        return config

    def _read_weight_map(self) -> dict[str, str]:
        try:
            index_path = self._locate(INDEX)
        except FileNotFoundError:  # not cached offline: a single-file checkpoint has no index to cache
            index_path = None
        if index_path is not None:
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{index_path} is not a safetensors index (JSON with a 'weight_map' object): "
                                 f"{error!r}; re-download the checkpoint") from error
            return dict(weight_map)
        single_path = self._locate(SINGLE)
        if single_path is None:
            has_bin = self.directory is not None and any(self.directory.glob("pytorch_model*.bin"))
            hint = CONVERT_HINT.format(self.source) if has_bin else "is this a model checkpoint?"
            raise FileNotFoundError(f"{self._where} holds neither {INDEX} nor {SINGLE}: {hint}")
        self.index_file, self._shard_paths[SINGLE] = SINGLE, single_path
        with self._open_shard(SINGLE) as handle:  # no index: the file's header lists its keys
            return {key: SINGLE for key in handle.keys()}

    def _open_shard(self, shard: str):
        """A safe_open handle (use it in a `with`) on one shard, fetched first if needed."""
        if shard not in self._shard_paths:
            path = self._locate(shard)
            if path is None:
                raise FileNotFoundError(f"shard {shard}, listed in {self.index_file} of {self.source}, is missing "
                                        f"from {self._where}: download it again")
            self._shard_paths[shard] = path
        path = self._shard_paths[shard]
        try:
            handle = safe_open(str(path), framework="pt")
        except SafetensorError as error:
            raise ValueError(f"{path} is not a readable safetensors file ({error}): it is probably truncated or "
                             "corrupted; delete it and download it again") from error
        if shard not in self.opened_files:
            self.opened_files.append(shard)
        return handle

    # ---- tensors -------------------------------------------------------------------------------

    def keys_with_prefix(self, prefix: str) -> list[str]:
        return sorted(key for key in self.weight_map if key.startswith(prefix))

    def shards_for(self, prefix: str) -> list[str]:
        return sorted({self.weight_map[key] for key in self.keys_with_prefix(prefix)})

    def top_level_prefixes(self) -> list[str]:
        """The first dotted part of each key, two under HF's base-model wrapper `model.`:
        a Whisper checkpoint gives 'model.decoder', 'model.encoder', 'proj_out'."""
        parts = [key.split(".") for key in self.weight_map]
        return sorted({".".join(p[:2] if p[0] == "model" and len(p) > 2 else p[:1]) for p in parts})

    def load_prefix(self, prefix: str, dtype: str | torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors whose key starts with `prefix`, prefix stripped, read from only the shards holding
        them; floating tensors cast to `dtype` if given (integer tensors keep theirs)."""
        dtype = resolve_dtype(dtype) if dtype is not None else None
        keys = self.keys_with_prefix(prefix)
        if not keys:
            # Wrappers move keys: 'audio_tower.' is 'model.audio_tower.' in transformers 5's layout, or back.
            nearby = {key[: key.index(prefix) + len(prefix)] for key in self.weight_map if prefix in key}
            shorter = prefix.split(".", 1)[-1]
            nearby |= {shorter} if shorter and shorter != prefix and self.keys_with_prefix(shorter) else set()
            nearby = sorted(nearby)
            hint = f"; did you mean {', '.join(map(repr, nearby[:5]))}?" if nearby else ""
            raise ValueError(f"no tensor in {self.source} starts with {prefix!r}; this checkpoint's top-level "
                             f"prefixes are: {', '.join(self.top_level_prefixes())}{hint}")
        state = {}
        for shard in self.shards_for(prefix):
            wanted = [key for key in keys if self.weight_map[key] == shard]
            with self._open_shard(shard) as handle:
                absent = sorted(set(wanted) - set(handle.keys()))
                if absent:
                    raise ValueError(f"{shard} does not hold {absent[:5]} although {self.index_file} of "
                                     f"{self.source} says it does: the index and the shards disagree; "
                                     "download the checkpoint again")
                for key in wanted:
                    tensor = handle.get_tensor(key)
                    if dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    state[key[len(prefix):]] = tensor
        return dict(sorted(state.items()))


def _listed(names: list[str], limit: int = 10) -> str:
    more = f", ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_into(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Strictly load `state_dict` into `module` (typically built under torch.device("meta")) by
    adopting its tensors (assign=True). `source` (file and prefix) is named in every error."""
    expected = module.state_dict()  # on meta: names and shapes, no memory
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [f"{key} (module {tuple(expected[key].shape)}, checkpoint {tuple(state_dict[key].shape)})"
                  for key in sorted(set(expected) & set(state_dict)) if expected[key].shape != state_dict[key].shape]
    if missing or unexpected or mismatched:
        problems = [f"cannot load {source} into {type(module).__name__}:"]
        if missing:
            problems.append(f"  missing keys ({len(missing)}): {_listed(missing)}")
        if unexpected:
            problems.append(f"  unexpected keys ({len(unexpected)}): {_listed(unexpected)}")
        if mismatched:
            problems.append(f"  shape mismatches ({len(mismatched)}): {_listed(mismatched)}")
        if missing and unexpected:
            problems.append("  (many of both usually mean a wrong prefix, or a config that does not match the weights)")
        raise ValueError("\n".join(problems))
    module.load_state_dict(state_dict, strict=True, assign=True)  # requires_grad stays the module's
    for submodule in module.modules():
        if callable(getattr(submodule, "init_non_persistent_buffers", None)):
            submodule.init_non_persistent_buffers()
    on_meta = [name for name, tensor in [*module.named_parameters(), *module.named_buffers()] if tensor.is_meta]
    if on_meta:
        raise ValueError(f"after loading {source}, {type(module).__name__} still has tensors on the meta device: "
                         f"{_listed(on_meta)}; they are not in the checkpoint (non-persistent buffers?): the module "
                         "that owns them must define init_non_persistent_buffers() to rebuild them")
    return module


def resolve_dtype(name_or_dtype: str | torch.dtype) -> torch.dtype:
    """'fp32'/'float32', 'bf16'/'bfloat16', 'fp16'/'float16', or one of those torch dtypes."""
    if isinstance(name_or_dtype, torch.dtype) and name_or_dtype in DTYPES.values():
        return name_or_dtype
    if isinstance(name_or_dtype, str) and name_or_dtype.lower() in DTYPES:
        return DTYPES[name_or_dtype.lower()]
    raise ValueError(f"unknown dtype {name_or_dtype!r}: use one of {', '.join(DTYPES)} "
                     "(or torch.float32, torch.bfloat16, torch.float16)")
