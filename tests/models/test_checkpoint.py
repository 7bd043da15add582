"""models/checkpoint.py: read only the shards a prefix needs, from a directory or the hub cache,
and fail loudly, fast, with one UserError when the mistake is the user's. Checkpoints are tiny
random models written by transformers' own save_pretrained; the hub is never contacted (offline
mode for every test, a fake cache, a fake download, or an endpoint on a closed loopback port)."""

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx2
import pytest
import torch
import torch.nn as nn
from huggingface_hub import constants
from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from safetensors.torch import save_file

from common.errors import UserError
from models import checkpoint as checkpoint_module
from models.checkpoint import (INDEX, SINGLE, Checkpoint, CheckpointError, CheckpointNotFound, NotCached, load_into,
                               resolve_dtype)
from tests.hub_fixtures import closed_loopback_port, forbid_network, make_hub_cache, online_without_network


def tiny_qwen2_audio():
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    config = Qwen2AudioConfig(
        audio_config=dict(num_mel_bins=16, d_model=32, encoder_layers=2, encoder_attention_heads=2,
                          encoder_ffn_dim=64, max_source_positions=30),
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64),
    )
    torch.manual_seed(0)
    return Qwen2AudioForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One tiny Qwen2-Audio saved twice: in ~13 shards of 20 KB, and as a single file."""
    model = tiny_qwen2_audio()
    sharded, single = tmp_path_factory.mktemp("sharded"), tmp_path_factory.mktemp("single")
    model.save_pretrained(sharded, max_shard_size="20KB")
    model.save_pretrained(single)
    state = {key: tensor.detach().clone() for key, tensor in model.state_dict().items()}
    return sharded, single, state


def weight_map(directory: Path) -> dict:
    return json.loads((directory / INDEX).read_text())["weight_map"]


def audio_prefix(keys) -> str:
    """transformers 5 may write either layout; the checkpoint's own keys decide."""
    return "audio_tower." if any(key.startswith("audio_tower.") for key in keys) else "model.audio_tower."


def reference_audio_tower(state: dict) -> dict:
    return {key.split("audio_tower.", 1)[1]: tensor for key, tensor in state.items() if "audio_tower." in key}


def audio_shards(directory: Path) -> list[str]:
    index = weight_map(directory)
    prefix = audio_prefix(index)
    return sorted({shard for key, shard in index.items() if key.startswith(prefix)})


def assert_no_chained_traceback(error: BaseException):
    """Nothing would print under this error's own traceback ('During handling of ...', 'The above ...')."""
    assert error.__cause__ is None, repr(error.__cause__)
    assert error.__context__ is None or error.__suppress_context__, repr(error.__context__)


def assert_same_tensors(loaded: dict, reference: dict):
    assert sorted(loaded) == sorted(reference)
    for key, tensor in reference.items():
        assert torch.equal(loaded[key], tensor), key


# ---- local directories ---------------------------------------------------------------------


def test_sharded_checkpoint_opens_only_the_audio_tower_shards(saved):
    sharded, _, state = saved
    all_shards = sorted(set(weight_map(sharded).values()))
    wanted = audio_shards(sharded)
    assert 0 < len(wanted) < len(all_shards), "the fixture must split the tower from the language model"

    checkpoint = Checkpoint.open(sharded)
    assert checkpoint.source == str(sharded)
    assert checkpoint.config == json.loads((sharded / "config.json").read_text())
    assert checkpoint.weight_map == weight_map(sharded)
    assert checkpoint.opened_files == []  # open reads config.json and the index only

    prefix = audio_prefix(checkpoint.weight_map)
    assert checkpoint.shards_for(prefix) == wanted
    loaded = checkpoint.load_prefix(prefix)
    assert sorted(checkpoint.opened_files) == wanted
    assert_same_tensors(loaded, reference_audio_tower(state))


def test_single_file_checkpoint_maps_every_key_to_the_file(saved):
    _, single, state = saved
    assert not (single / INDEX).exists()
    checkpoint = Checkpoint.open(single)
    assert checkpoint.index_file == SINGLE
    assert set(checkpoint.weight_map.values()) == {SINGLE}
    assert len(checkpoint.weight_map) == len(state)
    prefix = audio_prefix(checkpoint.weight_map)
    assert_same_tensors(checkpoint.load_prefix(prefix), reference_audio_tower(state))
    assert checkpoint.opened_files == [SINGLE]


def test_load_into_a_meta_module_adopts_the_checkpoint_tensors(saved):
    sharded, _, state = saved
    checkpoint = Checkpoint.open(sharded)
    prefix = "multi_modal_projector." if "multi_modal_projector.linear.weight" in checkpoint.weight_map \
        else "model.multi_modal_projector."
    with torch.device("meta"):
        projector = nn.ModuleDict(dict(linear=nn.Linear(32, 32)))
    projector.linear.weight.requires_grad_(False)
    load_into(projector, checkpoint.load_prefix(prefix), source=f"{sharded} [{prefix}]")
    assert checkpoint.opened_files == checkpoint.shards_for(prefix)
    assert not projector.linear.weight.is_meta
    reference = {key.split("multi_modal_projector.")[1]: tensor
                 for key, tensor in state.items() if "multi_modal_projector." in key}
    assert_same_tensors(projector.state_dict(), reference)
    assert projector.linear.weight.requires_grad is False and projector.linear.bias.requires_grad is True


def test_dtype_casts_floating_tensors_only(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    save_file({"head.weight": torch.randn(2, 3), "head.ids": torch.arange(4)}, str(tmp_path / SINGLE))
    loaded = Checkpoint.open(tmp_path).load_prefix("head.", dtype="bf16")
    assert loaded["weight"].dtype == torch.bfloat16 and loaded["ids"].dtype == torch.int64
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        Checkpoint.open(tmp_path).load_prefix("head.", dtype="fp8")


def test_other_files_of_the_checkpoint(saved):
    sharded, _, _ = saved
    checkpoint = Checkpoint.open(sharded)
    assert checkpoint.file("generation_config.json") == sharded / "generation_config.json"
    assert checkpoint.file("tokenizer.json", required=False) is None
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        checkpoint.file("tokenizer.json")


# ---- the hub: a fake cache read by the real huggingface_hub, and a fake download -------------


@pytest.fixture
def record_downloads(monkeypatch):
    """Wrap the download function that models/checkpoint.py calls; keep the real one underneath."""
    requested = []
    real = checkpoint_module.hf_hub_download

    def recording(repo_id, filename, **kwargs):
        requested.append(filename)
        return real(repo_id, filename, **kwargs)

    monkeypatch.setattr(checkpoint_module, "hf_hub_download", recording)
    return requested


def test_offline_cache_holding_only_the_needed_files_is_enough(saved, tmp_path, monkeypatch, record_downloads):
    sharded, _, state = saved
    wanted = audio_shards(sharded)
    cache = tmp_path / "hub"
    make_hub_cache(cache, "org/tiny-qwen2-audio",
                   {name: sharded / name for name in ["config.json", INDEX, *wanted]})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    checkpoint = Checkpoint.open("org/tiny-qwen2-audio")
    assert record_downloads == ["config.json", SINGLE, INDEX]  # a cached model.safetensors would mean one file
    assert checkpoint.config == json.loads((sharded / "config.json").read_text())
    prefix = audio_prefix(checkpoint.weight_map)
    loaded = checkpoint.load_prefix(prefix)
    assert sorted(record_downloads[3:]) == wanted and sorted(checkpoint.opened_files) == wanted
    assert_same_tensors(loaded, reference_audio_tower(state))

    language_shard = sorted(set(weight_map(sharded).values()) - set(wanted))[-1]
    language_key = next(key for key, shard in checkpoint.weight_map.items() if shard == language_shard)
    with pytest.raises(NotCached, match=f"^run `hf download org/tiny-qwen2-audio {language_shard}`.*"
                                        f"{language_shard} is missing.*HF_HUB_OFFLINE=1 is set"):
        checkpoint.load_prefix(language_key)


def test_offline_cache_of_a_single_file_model(saved, tmp_path, monkeypatch, record_downloads):
    _, single, state = saved
    cache = tmp_path / "hub"
    make_hub_cache(cache, "org/single", {name: single / name for name in ["config.json", SINGLE]})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    checkpoint = Checkpoint.open("org/single")
    assert record_downloads == ["config.json", SINGLE, INDEX]  # model.safetensors cached, no index: one file
    assert checkpoint.index_file == SINGLE and len(checkpoint.weight_map) == len(state)
    # Offline, an uncached file may still exist on the hub: optional gives None, required says so.
    assert checkpoint.file("tokenizer.json", required=False) is None
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing from .*HF_HUB_OFFLINE=1 is set"):
        checkpoint.file("tokenizer.json")


def test_uncached_hub_id_offline_says_how_to_get_it(record_downloads):
    with pytest.raises(NotCached) as error:
        Checkpoint.open("org/never-downloaded")
    message = str(error.value)
    assert isinstance(error.value, UserError) and isinstance(error.value, FileNotFoundError)
    assert message.startswith("run `hf download org/never-downloaded` on a machine that reaches the hub")
    assert "org/never-downloaded is not in the local cache" in message and "HF_HUB_OFFLINE=1 is set" in message
    assert "--local-dir DIR" in message and "\n" not in message
    assert record_downloads == ["config.json"]  # the cache only: offline, the hub is not asked at all


# ---- the hub, "online": HF_HUB_OFFLINE unset, the endpoint on loopback, nothing leaves the machine


@pytest.fixture
def listening_port():
    """A loopback port that accepts TCP connections (the kernel completes them from the backlog)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


@pytest.mark.parametrize("layout", ["sharded", "single"])
def test_hub_download_requests_only_the_needed_files(saved, monkeypatch, listening_port, layout):
    """Online with an empty cache: each file is looked up in the cache, then (the hub answering the
    probe) downloaded; only config.json, the index and the wanted shards are asked for."""
    sharded, single, state = saved
    served = sharded if layout == "sharded" else single

    def serve(repo_id, filename, revision):
        if not (served / filename).is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(served / filename)

    calls = online_without_network(monkeypatch, port=listening_port, serve=serve)
    checkpoint = Checkpoint.open("org/tiny", revision="v1")
    prefix = audio_prefix(checkpoint.weight_map)
    assert_same_tensors(checkpoint.load_prefix(prefix), reference_audio_tower(state))
    assert {(repo, revision) for repo, _, revision in calls.downloads} == {("org/tiny", "v1")}
    names = [name for _, name, _ in calls.downloads]
    if layout == "sharded":
        assert names[:2] == ["config.json", INDEX] and sorted(names[2:]) == audio_shards(sharded)
    else:
        assert names == ["config.json", INDEX, SINGLE]
    assert set(names) <= set(calls.cache_lookups)  # the cache was asked first, every time
    assert calls.connects == [("127.0.0.1", listening_port)]  # one probe for the whole process


def test_uncached_hub_id_with_the_hub_unreachable_fails_at_once(monkeypatch):
    """The new user's case: no network, HF_HUB_OFFLINE unset, a hub id never downloaded. One probe
    (refused), no download attempt (hf_hub_download would retry with backoff for half a minute),
    one UserError that starts with the command to run."""
    calls = online_without_network(monkeypatch)
    started = time.perf_counter()
    with pytest.raises(CheckpointNotFound) as error:
        Checkpoint.open("Qwen/Qwen2-Audio-7B-Instruct")
    with pytest.raises(CheckpointNotFound):  # a second model: the probe's answer is remembered
        Checkpoint.open("openai/whisper-small", revision="v2")
    elapsed = time.perf_counter() - started
    message = str(error.value)
    assert isinstance(error.value, UserError) and isinstance(error.value, FileNotFoundError)
    assert message.startswith("run `hf download Qwen/Qwen2-Audio-7B-Instruct` on a machine that reaches the hub")
    assert f"the hub ({constants.ENDPOINT}) cannot be reached ({constants.ENDPOINT[7:]}: Connection refused; " \
        "HF_HUB_OFFLINE=1 skips this check)" in message
    assert "'Qwen/Qwen2-Audio-7B-Instruct' is not a local directory" in message and "\n" not in message
    assert_no_chained_traceback(error.value)
    assert calls.downloads == [] and calls.cache_lookups == ["config.json", "config.json"]
    assert len(calls.connects) == 1
    assert elapsed < 5, f"took {elapsed:.1f} s"


def test_probe_gives_up_at_its_deadline_even_when_the_lookup_hangs(monkeypatch):
    """getaddrinfo has no timeout: a resolver that never answers must not hold the load up."""
    calls = online_without_network(monkeypatch)
    monkeypatch.setattr(checkpoint_module, "HUB_PROBE_TIMEOUT_S", 0.2)
    release = threading.Event()

    def hangs(address, *args, **kwargs):
        calls.connects.append(address)
        release.wait(30)
        raise OSError("released")

    monkeypatch.setattr(socket, "create_connection", hangs)
    try:
        started = time.perf_counter()
        assert checkpoint_module.hub_unreachable() == f"127.0.0.1:{calls.connects[0][1]} did not answer within 0.2 s"
        assert time.perf_counter() - started < 1.5
        assert checkpoint_module.hub_unreachable() is not None and len(calls.connects) == 1
    finally:
        release.set()


def test_probe_goes_to_the_proxy_the_environment_names(monkeypatch):
    """httpx sends hub requests through HTTPS_PROXY unless NO_PROXY names the host: so does the probe."""
    calls = online_without_network(monkeypatch)
    proxy_port = closed_loopback_port()
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.example.org")
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy_port}")
    assert checkpoint_module.hub_unreachable() == f"127.0.0.1:{proxy_port}: Connection refused"
    monkeypatch.setenv("NO_PROXY", "hub.example.org")
    assert checkpoint_module.hub_unreachable().startswith("hub.example.org:443: tests reach no network")
    assert calls.connects == [("127.0.0.1", proxy_port), ("hub.example.org", 443)]  # the second refused, unattempted


@pytest.mark.parametrize("layout", ["sharded", "single"])
def test_cached_hub_checkpoint_loads_with_the_network_impossible(saved, tmp_path, monkeypatch, layout):
    """Online (HF_HUB_OFFLINE unset) and every file cached: no probe, no download, no socket at all."""
    sharded, single, state = saved
    directory = sharded if layout == "sharded" else single
    files = [path.name for path in directory.iterdir()]
    make_hub_cache(tmp_path / "hub", "org/cached", {name: directory / name for name in files})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    calls = online_without_network(monkeypatch)
    forbid_network(monkeypatch)
    checkpoint = Checkpoint.open("org/cached")
    assert_same_tensors(checkpoint.load_prefix(audio_prefix(checkpoint.weight_map)), reference_audio_tower(state))
    assert checkpoint.file("generation_config.json").name == "generation_config.json"
    assert calls.downloads == [] and calls.connects == []
    assert "config.json" in calls.cache_lookups


def http_response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("HEAD", "http://127.0.0.1/org/tiny/resolve/main/config.json"))


# What hf_hub_download raises when the hub answers the probe: the error we turn it into, its text, and whether
# the hub's error stays chained as the cause (where it holds what we could not say: a status, a request id).
HUB_ERRORS = {
    "no answer": (LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub"),
                  CheckpointNotFound, "^run `hf download org/tiny`.*downloading it failed", True),
    "no such repo": (RepositoryNotFoundError("404 Repository Not Found", response=http_response(404)),
                     CheckpointNotFound, "'org/tiny' is not a local directory, nor a model on the hub", False),
    "gated": (GatedRepoError("401 gated", response=http_response(401)),
              CheckpointNotFound, "hub model org/tiny is gated: accept its terms", False),
    "no such revision": (RevisionNotFoundError("404 Revision Not Found", response=http_response(404)),
                         CheckpointError, "hub model org/tiny has no revision 'v9'", False),
    "rate limited": (HfHubHTTPError("429 Too Many Requests\nretry later", response=http_response(429)),
                     CheckpointNotFound, "downloading config.json of hub model org/tiny failed: 429", True),
}


@pytest.mark.parametrize("case", HUB_ERRORS)
def test_hub_errors_are_one_line_user_errors(monkeypatch, listening_port, case):
    hub_error, expected, says, keeps_cause = HUB_ERRORS[case]

    def serve(repo_id, filename, revision):
        raise hub_error

    online_without_network(monkeypatch, port=listening_port, serve=serve)
    with pytest.raises(expected, match=says) as error:
        Checkpoint.open("org/tiny", revision="v9" if case == "no such revision" else None)
    assert isinstance(error.value, UserError) and "\n" not in str(error.value)
    if keeps_cause:
        assert error.value.__cause__ is hub_error
    else:
        assert_no_chained_traceback(error.value)


# ---- errors --------------------------------------------------------------------------------


def test_missing_directory_is_a_user_error_saying_what_to_pass(tmp_path, record_downloads):
    with pytest.raises(CheckpointNotFound) as error:
        Checkpoint.open(tmp_path / "absent")
    assert isinstance(error.value, UserError) and isinstance(error.value, FileNotFoundError)
    assert str(error.value) == (f"no checkpoint directory at {tmp_path / 'absent'}: pass a directory holding "
                                "config.json and model.safetensors (or its index), or a hub id like org/name")
    assert record_downloads == []  # not org/name-shaped: the hub is not involved

    save_file({"w": torch.zeros(1)}, str(tmp_path / SINGLE))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointNotFound, match=f"{tmp_path / SINGLE} is a file, not a checkpoint directory: pass "
                                                 f"the directory that holds it \\({tmp_path}\\)"):
        Checkpoint.open(tmp_path / SINGLE)
    (tmp_path / "runs" / "model").mkdir(parents=True)
    write_config(tmp_path / "runs" / "model")
    with pytest.raises(CheckpointNotFound, match=f"{tmp_path / 'runs'} has no config.json.*; did you mean "
                                                 f"{tmp_path / 'runs' / 'model'}\\?$"):
        Checkpoint.open(tmp_path / "runs")  # one level too high


def write_config(directory: Path, text: str = "{}") -> None:
    (directory / "config.json").write_text(text)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


# Each: what to do to a copy of the checkpoint, then what to call on it; the error class; the builtin it
# also is (so callers' except clauses keep working); the text that names the fault.
BROKEN = {
    "config not JSON": ("single", lambda d: write_config(d, "{not json"), Checkpoint.open,
                        CheckpointError, ValueError, "config.json is not valid JSON"),
    "config a list": ("single", lambda d: write_config(d, "[1, 2]"), Checkpoint.open,
                      CheckpointError, ValueError, "config.json holds a JSON list"),
    "no config": ("single", lambda d: (d / "config.json").unlink(), Checkpoint.open,
                  CheckpointNotFound, FileNotFoundError, "has no config.json"),
    "no weights": ("single", lambda d: (d / SINGLE).unlink(), Checkpoint.open,
                   CheckpointNotFound, FileNotFoundError, f"holds neither {INDEX} nor {SINGLE}"),
    "index not JSON": ("sharded", lambda d: (d / INDEX).write_text("{"), Checkpoint.open,
                       CheckpointError, ValueError, f"{INDEX} is not a safetensors index"),
    "index without weight_map": ("sharded", lambda d: (d / INDEX).write_text('{"metadata": {}}'), Checkpoint.open,
                                 CheckpointError, ValueError, f"{INDEX} is not a safetensors index"),
    "truncated single file": ("single", lambda d: truncate(d / SINGLE), Checkpoint.open,
                              CheckpointError, ValueError, f"{SINGLE} is not a readable safetensors file"),
    "truncated shard": ("sharded", lambda d: truncate(d / audio_shards(d)[0]),
                        lambda d: Checkpoint.open(d).load_prefix(audio_prefix(weight_map(d))),
                        CheckpointError, ValueError, "is not a readable safetensors file.*truncated or corrupted"),
    "missing shard": ("sharded", lambda d: (d / audio_shards(d)[0]).unlink(),
                      lambda d: Checkpoint.open(d).load_prefix(audio_prefix(weight_map(d))),
                      CheckpointNotFound, FileNotFoundError, f"listed in {INDEX} of .*, is missing"),
    "index and shards disagree": ("sharded", lambda d: (d / INDEX).write_text(json.dumps({"weight_map": {
        "audio_tower.ghost.weight": audio_shards(d)[0]} | weight_map(d)})),
        lambda d: Checkpoint.open(d).load_prefix("audio_tower.ghost."),
        CheckpointError, ValueError, "the index and the shards disagree"),
    "wrong prefix": ("single", lambda d: None, lambda d: Checkpoint.open(d).load_prefix("vision_model."),
                     CheckpointError, ValueError, "no tensor in .* starts with 'vision_model.'"),
    "revision of a directory": ("single", lambda d: None, lambda d: Checkpoint.open(d, revision="v1"),
                                CheckpointError, ValueError, "revision='v1' applies to hub ids only"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_every_mistake_in_a_checkpoint_is_a_user_error(saved, tmp_path, case):
    sharded, single, _ = saved
    layout, damage, call, error_class, builtin, says = BROKEN[case]
    directory = copy_checkpoint(sharded if layout == "sharded" else single, tmp_path / "broken")
    damage(directory)
    with pytest.raises(error_class, match=says) as error:
        call(directory)
    assert isinstance(error.value, UserError) and isinstance(error.value, builtin)
    assert str(directory) in str(error.value)  # the checkpoint at fault is named
    assert_no_chained_traceback(error.value)  # the message says it all


def test_directory_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} holds neither {INDEX} nor {SINGLE}"):
        Checkpoint.open(tmp_path)
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="only safetensors is supported; convert once"):
        Checkpoint.open(tmp_path)


def test_missing_or_invalid_config_names_the_file(tmp_path):
    save_file({"w": torch.zeros(1)}, str(tmp_path / SINGLE))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} has no config.json"):
        Checkpoint.open(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'} is not valid JSON"):
        Checkpoint.open(tmp_path)


def copy_checkpoint(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def test_missing_shard_is_named_with_its_index(saved, tmp_path):
    sharded, _, _ = saved
    directory = copy_checkpoint(sharded, tmp_path / "partial")
    prefix = audio_prefix(weight_map(directory))
    lost = audio_shards(directory)[0]
    (directory / lost).unlink()
    checkpoint = Checkpoint.open(directory)  # shards are looked for only when needed
    checkpoint.load_prefix(next(k for k, s in checkpoint.weight_map.items() if s != lost))
    with pytest.raises(FileNotFoundError, match=f"shard {lost}, listed in {INDEX} of {directory}, is missing"):
        checkpoint.load_prefix(prefix)


def test_truncated_shard_is_named(saved, tmp_path):
    sharded, _, _ = saved
    directory = copy_checkpoint(sharded, tmp_path / "truncated")
    broken = directory / audio_shards(directory)[0]
    broken.write_bytes(broken.read_bytes()[:-100])
    checkpoint = Checkpoint.open(directory)
    with pytest.raises(ValueError, match=f"{broken} is not a readable safetensors file.*truncated or corrupted"):
        checkpoint.load_prefix(audio_prefix(checkpoint.weight_map))


def test_corrupted_single_file_fails_at_open(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / SINGLE).write_bytes(b"<html>not a tensor file</html>")
    with pytest.raises(ValueError, match=f"{tmp_path / SINGLE} is not a readable safetensors file"):
        Checkpoint.open(tmp_path)


def test_unmatched_prefix_lists_the_prefixes_that_exist(saved, tmp_path):
    sharded, _, _ = saved
    with pytest.raises(ValueError, match="no tensor .* starts with 'audio_encoder.'") as error:
        Checkpoint.open(sharded).load_prefix("audio_encoder.")
    assert "audio_tower" in str(error.value) and "multi_modal_projector" in str(error.value)
    wrong = "model.audio_tower." if audio_prefix(weight_map(sharded)) == "audio_tower." else "audio_tower."
    with pytest.raises(ValueError, match=f"did you mean '{audio_prefix(weight_map(sharded))}'"):
        Checkpoint.open(sharded).load_prefix(wrong)

    (tmp_path / "config.json").write_text("{}")  # Whisper's layout
    save_file({"model.encoder.conv1.weight": torch.zeros(1), "model.decoder.embed_tokens.weight": torch.zeros(1),
               "proj_out.weight": torch.zeros(1)}, str(tmp_path / SINGLE))
    with pytest.raises(ValueError) as error:
        Checkpoint.open(tmp_path).load_prefix("encoder.")
    assert "top-level prefixes are: model.decoder, model.encoder, proj_out" in str(error.value)
    assert "did you mean 'model.encoder.'" in str(error.value)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.second = nn.Linear(4, 2, bias=False)


def two_layer_state() -> dict:
    return {"first.weight": torch.randn(4, 3), "first.bias": torch.randn(4), "second.weight": torch.randn(2, 4)}


def meta(module_class):
    with torch.device("meta"):
        return module_class()


def test_load_into_names_missing_unexpected_and_misshaped_keys():
    state = two_layer_state()
    del state["first.bias"]
    state["first.extra"] = torch.zeros(1)
    state["second.weight"] = torch.zeros(2, 5)
    with pytest.raises(ValueError) as error:
        load_into(meta(TwoLayers), state, source="ckpt/model.safetensors [tower.]")
    message = str(error.value)
    assert "cannot load ckpt/model.safetensors [tower.] into TwoLayers" in message
    assert "missing keys (1): first.bias" in message
    assert "unexpected keys (1): first.extra" in message
    assert "second.weight (module (2, 4), checkpoint (2, 5))" in message


def test_load_into_loads_a_complete_state():
    state = two_layer_state()
    module = load_into(meta(TwoLayers), state, source="test")
    assert torch.equal(module.first.weight, state["first.weight"]) and not module.second.weight.is_meta


class WithRotaryTable(TwoLayers):
    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.arange(3.0), persistent=False)  # never in a checkpoint


class RebuildsItsTable(WithRotaryTable):
    def init_non_persistent_buffers(self):
        self.table = torch.arange(3.0, device=self.first.weight.device)


def test_leftover_meta_buffer_is_an_error_unless_the_module_rebuilds_it():
    with pytest.raises(ValueError, match="still has tensors on the meta device: table.*init_non_persistent_buffers"):
        load_into(meta(WithRotaryTable), two_layer_state(), source="test")
    module = load_into(nn.Sequential(meta(RebuildsItsTable)), {f"0.{k}": v for k, v in two_layer_state().items()},
                       source="test")  # the hook is found on submodules too
    assert torch.equal(module[0].table, torch.arange(3.0))


def test_resolve_dtype():
    assert resolve_dtype("fp32") is torch.float32 and resolve_dtype("BF16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16 and resolve_dtype(torch.bfloat16) is torch.bfloat16
    for bad in ["half-ish", torch.int8, None]:
        with pytest.raises(ValueError, match="unknown dtype .*use one of fp32, float32, bf16"):
            resolve_dtype(bad)
