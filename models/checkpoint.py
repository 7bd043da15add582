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

The hub goes through `huggingface_hub.hf_hub_download`, cache first: each file is looked up in
the local cache (HF_HUB_CACHE / HF_HOME) with local_files_only=True, so a cached checkpoint loads
with no network call at all. Only on a miss is the hub asked, and only if it can be reached: on a
machine without network hf_hub_download retries with backoff for half a minute before it gives
up, so one TCP connect to the hub (or the proxy the environment names), with a 2 s deadline,
decides first, once per process. HF_HUB_OFFLINE=1 skips even that. A file neither cached nor
downloadable is a `CheckpointNotFound` whose message starts with the `hf download` to run.

Every mistake of the user's (a wrong path, a file that is missing or corrupt, a model that is not
there) is a `CheckpointNotFound` or `CheckpointError`: a `UserError` (common/errors.py, printed as one
line by train.py and eval.py) that is also the FileNotFoundError / ValueError it used to be.

Convention for modules: load_into refuses a module with any tensor still on the meta device.
Non-persistent buffers are not in the checkpoint, so a module holding one defines
`init_non_persistent_buffers(self)`, which rebuilds its own buffers (on the device of its loaded
weights); load_into calls it on every submodule that has it, after loading.
"""

import json
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

import torch
import torch.nn as nn
from huggingface_hub import _CACHED_NO_EXIST, constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from safetensors import SafetensorError, safe_open

from common.errors import UserError

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name; anything else must be a local directory
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
CONVERT_HINT = ("only safetensors is supported; convert once with python -c \"from transformers import "
                "AutoModel; AutoModel.from_pretrained('{0}').save_pretrained('{0}')\"")
HUB_PROBE_TIMEOUT_S = 2.0  # name lookup + TCP connect to the hub; a reachable hub answers in milliseconds



def read_json_object(path: Path) -> dict:
    """A checkpoint's JSON file (config.json, tokenizer_config.json, ...) as a dict; {} when it does not exist,
    CheckpointError when it is not a JSON object."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); download it again") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object; download it again")
    return data

class CheckpointNotFound(UserError, FileNotFoundError):
    """A checkpoint, or a file it needs, is not there: no such directory, no config.json, a missing
    shard or tokenizer, a hub id that is not on the hub."""


class NotCached(CheckpointNotFound):
    """A hub file that is not in the local cache, with the hub not asked (HF_HUB_OFFLINE=1, or it
    cannot be reached). It may exist on the hub, so an optional file missing this way is not absent."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is there but cannot be used: corrupt JSON or safetensors, an index that
    disagrees with its shards, a model_type this loader does not read, a revision the hub lacks."""


_hub_probes: dict[tuple[str, int], str | None] = {}  # (host, port) -> why unreachable; probed once per process


def hub_unreachable() -> str | None:
    """Why the hub endpoint (constants.ENDPOINT, HF_ENDPOINT), or the proxy the environment routes it
    through, takes no TCP connection within HUB_PROBE_TIMEOUT_S; None when it does. The name lookup
    runs inside the same deadline (in a thread): getaddrinfo has no timeout and can hang for seconds."""
    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    proxy = getproxies().get(url.scheme) or getproxies().get("all")
    if proxy and not proxy_bypass(host):  # httpx (under huggingface_hub) honours HTTPS_PROXY and NO_PROXY too
        proxy_url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname or "", proxy_url.port or 80
    if (host, port) not in _hub_probes:
        failure = [f"{host}:{port} did not answer within {HUB_PROBE_TIMEOUT_S:g} s"]

        def connect():
            try:
                socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
                failure[0] = None
            except OSError as error:  # refused, unreachable, timed out, name unknown
                failure[0] = f"{host}:{port}: {error.strerror or error}"

        probe = threading.Thread(target=connect, name="hub-probe", daemon=True)
        probe.start()
        probe.join(HUB_PROBE_TIMEOUT_S)
        _hub_probes[host, port] = failure[0]
    return _hub_probes[host, port]


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
        self.not_cached: dict[str, NotCached] = {}  # optional files the cache lacked, the hub not asked

    @classmethod
    def open(cls, path_or_hub_id: str | Path, revision: str | None = None, weights: bool = True) -> "Checkpoint":
        """config.json and, unless weights=False (a tokenizer needs none), the weight map."""
        source = str(path_or_hub_id)
        path = Path(source).expanduser()
        if path.exists() or not HUB_ID.fullmatch(source):
            if revision is not None:
                raise CheckpointError(f"revision={revision!r} applies to hub ids only, and {source!r} is a local path")
            if path.is_file():
                raise CheckpointNotFound(f"{path} is a file, not a checkpoint directory: pass the directory that "
                                         f"holds it ({path.parent}), with config.json beside the weights")
            if not path.is_dir():
                raise CheckpointNotFound(f"no checkpoint directory at {path}: pass a directory holding config.json "
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

    def _cached(self, filename: str) -> Path | None:
        """A hub file from the local cache alone, or None: no network call, online or not."""
        try:
            return Path(hf_hub_download(self.repo_id, filename, revision=self.revision, local_files_only=True))
        except LocalEntryNotFoundError:
            return None

    def _locate(self, filename: str) -> Path | None:
        """Local path of one file of the checkpoint (found in the cache, else downloaded); None if absent."""
        if self.directory is not None:
            path = self.directory / filename
            return path if path.is_file() else None
        if (path := self._cached(filename)) is not None:
            return path
        if try_to_load_from_cache(self.repo_id, filename, revision=self.revision) is _CACHED_NO_EXIST:
            return None  # an earlier download learned that the hub has no such file
        if constants.is_offline_mode():
            raise NotCached(self._not_cached(filename, "HF_HUB_OFFLINE=1 is set, so the hub is not asked"))
        if unreachable := hub_unreachable():  # asking anyway: half a minute of retries, then the same answer
            raise NotCached(self._not_cached(filename, f"the hub ({constants.ENDPOINT}) cannot be reached "
                                             f"({unreachable}; HF_HUB_OFFLINE=1 skips this check)"))
        try:
            return Path(hf_hub_download(self.repo_id, filename, revision=self.revision))
        except LocalEntryNotFoundError as error:  # reachable, yet no answer (the hub down, the connection lost)
            cause = str(error.__cause__ or error).splitlines()[0]
            raise CheckpointNotFound(self._not_cached(filename, f"downloading it failed ({cause})")) from error
        except EntryNotFoundError:  # the hub answered: this repo has no such file
            return None
        except GatedRepoError:
            raise CheckpointNotFound(f"hub model {self.repo_id} is gated: accept its terms on "
                                     f"{constants.ENDPOINT}/{self.repo_id}, then log in with `hf auth login`") from None
        except RepositoryNotFoundError:
            raise CheckpointNotFound(f"{self.source!r} is not a local directory, nor a model on the hub (if it is "
                                     "private, log in with `hf auth login`)") from None
        except RevisionNotFoundError:
            raise CheckpointError(f"hub model {self.repo_id} has no revision {self.revision!r}: pass a branch, "
                                  "tag or commit it has, or no revision for main") from None
        except HfHubHTTPError as error:  # 401 with a bad token, 429 rate limit, ...
            raise CheckpointNotFound(f"downloading {filename} of hub model {self.repo_id} failed: "
                                     f"{str(error).splitlines()[0]}") from error

    def _not_cached(self, filename: str, why: str) -> str:
        """The message for a hub file neither cached nor downloadable: what to run first, then why."""
        revision = f" --revision {self.revision}" if self.revision else ""
        files = "" if filename in (CONFIG, INDEX, SINGLE) else f" {filename}"  # a shard, a tokenizer: that file
        return (f"run `hf download {self.repo_id}{files}{revision}` on a machine that reaches the hub and copy the "
                "cache it fills (HF_HUB_CACHE, or HF_HOME/hub) here, or pass the DIR that "
                f"`hf download {self.repo_id}{revision} --local-dir DIR` fills instead of {self.source!r}: "
                f"{self.source!r} is not a local directory, and hub model {self.repo_id} is not in the local cache "
                f"({filename} is missing from {constants.HF_HUB_CACHE}) and {why}")

    def file(self, name: str, required: bool = True) -> Path | None:
        """Another file of the checkpoint (tokenizer.json, vocab.txt, preprocessor_config.json).
        With required=False, a file that is absent gives None; so does a hub file not in the cache while
        the hub is not asked (offline), and `not_cached` keeps its error, for when no alternative exists."""
        try:
            path = self._locate(name)
        except NotCached as error:
            if required:
                raise
            self.not_cached[name] = error
            return None
        if path is None and required:
            raise CheckpointNotFound(f"{self._where} has no {name}")
        return path

    def _read_config(self) -> dict:
        path = self._locate(CONFIG)
        if path is None:
            inside = sorted(str(p.parent) for p in self.directory.glob(f"*/{CONFIG}")) if self.directory else []
            hint = f"; did you mean {', '.join(inside[:3])}?" if inside else ""
            raise CheckpointNotFound(f"{self._where} has no {CONFIG}: a checkpoint is the directory that "
                                     f"save_pretrained writes, with config.json beside the weights{hint}")
        return read_json_object(path)

    def _read_weight_map(self) -> dict[str, str]:
        # A hub model with model.safetensors cached and no index is a single-file one: no index is asked for.
        single_cached = self._cached(SINGLE) if self.directory is None else None
        try:
            index_path = self._cached(INDEX) if single_cached else self._locate(INDEX)
        except NotCached:  # offline, and not cached: the checkpoint may well have no index
            index_path = None
        if index_path is not None:
            try:
                weight_map = dict(json.loads(index_path.read_text(encoding="utf-8"))["weight_map"])
            except (KeyError, TypeError, ValueError) as error:  # not JSON, no weight_map, not a mapping
                raise CheckpointError(f"{index_path} is not a safetensors index (JSON with a 'weight_map' object): "
                                      f"{error!r}; re-download the checkpoint") from None
            return weight_map
        single_path = single_cached or self._locate(SINGLE)
        if single_path is None:
            has_bin = self.directory is not None and any(self.directory.glob("pytorch_model*.bin"))
            hint = CONVERT_HINT.format(self.source) if has_bin else "is this a model checkpoint?"
            raise CheckpointNotFound(f"{self._where} holds neither {INDEX} nor {SINGLE}: {hint}")
        self.index_file, self._shard_paths[SINGLE] = SINGLE, single_path
        with self._open_shard(SINGLE) as handle:  # no index: the file's header lists its keys
            return {key: SINGLE for key in handle.keys()}

    def _open_shard(self, shard: str):
        """A safe_open handle (use it in a `with`) on one shard, fetched first if needed."""
        if shard not in self._shard_paths:
            path = self._locate(shard)
            if path is None:
                raise CheckpointNotFound(f"shard {shard}, listed in {self.index_file} of {self.source}, is missing "
                                         f"from {self._where}: download it again")
            self._shard_paths[shard] = path
        path = self._shard_paths[shard]
        try:
            handle = safe_open(str(path), framework="pt")
        except SafetensorError as error:
            raise CheckpointError(f"{path} is not a readable safetensors file ({error}): it is probably truncated "
                                  "or corrupted; delete it and download it again") from None
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
        state = {}
        for shard_state in self.iter_prefix(prefix, dtype):
            state.update(shard_state)
        return dict(sorted(state.items()))

    def iter_prefix(self, prefix: str, dtype: str | torch.dtype | None = None, group_bytes: int | None = None):
        """load_prefix piece by piece: yields {key: tensor} dicts under `prefix` (prefix stripped), each shard's
        tensors whole, or with `group_bytes` in groups of about that many bytes (a tensor larger than that is a
        group of its own), so a caller can adopt or quantize them and let them go before more are read.

        Each group is read through its own opening of the shard. safetensors maps the file into memory, and
        the pages a read touched count in the process's resident memory until the mapping is closed: read
        through one opening, a 4 GB shard would count whole however soon its tensors were quantized."""
        dtype = resolve_dtype(dtype) if dtype is not None else None
        keys = self.keys_with_prefix(prefix)
        if not keys:
            # Wrappers move keys: 'audio_tower.' is 'model.audio_tower.' in transformers 5's layout, or back.
            nearby = {key[: key.index(prefix) + len(prefix)] for key in self.weight_map if prefix in key}
            shorter = prefix.split(".", 1)[-1]
            nearby |= {shorter} if shorter and shorter != prefix and self.keys_with_prefix(shorter) else set()
            nearby = sorted(nearby)
            hint = f"; did you mean {', '.join(map(repr, nearby[:5]))}?" if nearby else ""
            raise CheckpointError(f"no tensor in {self.source} starts with {prefix!r}; this checkpoint's top-level "
                                  f"prefixes are: {', '.join(self.top_level_prefixes())}{hint}")
        for shard in self.shards_for(prefix):
            pending = [key for key in keys if self.weight_map[key] == shard]
            checked = False
            while pending:
                state, size = {}, 0
                with self._open_shard(shard) as handle:
                    if not checked:
                        absent = sorted(set(pending) - set(handle.keys()))
                        if absent:
                            raise CheckpointError(f"{shard} does not hold {absent[:5]} although {self.index_file} of "
                                                  f"{self.source} says it does: the index and the shards disagree; "
                                                  "download the checkpoint again")
                        checked = True
                    while pending and (group_bytes is None or not state or size < group_bytes):
                        key = pending.pop(0)
                        tensor = handle.get_tensor(key)
                        if dtype is not None and tensor.is_floating_point():
                            tensor = tensor.to(dtype)
                        state[key[len(prefix):]] = tensor
                        size += tensor.numel() * tensor.element_size()
                yield state
                del state  # these tensors now belong to the caller alone


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
    refuse_key_problems(module, source, missing, unexpected, mismatched)
    module.load_state_dict(state_dict, strict=True, assign=True)  # requires_grad stays the module's
    return finish_loading(module, source)


def refuse_key_problems(module: nn.Module, source: str, missing: list, unexpected: list, mismatched: list):
    """A ValueError listing what does not fit, if anything (shared with models/shard_loading.py)."""
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


def finish_loading(module: nn.Module, source: str) -> nn.Module:
    """Rebuild non-persistent buffers, then refuse a module with anything left on the meta device."""
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
