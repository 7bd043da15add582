"""A fake Hugging Face hub cache, so hub ids resolve offline in tests; and an "online" mode in which
nothing can leave the machine, to test what happens when the hub is (un)reachable."""

import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import constants

from models import checkpoint as checkpoint_module


def make_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """huggingface_hub's cache layout: refs/main names a commit, snapshots/<commit>/<file> links
    to blobs/<hash>. Offline, hf_hub_download resolves refs/main and returns the snapshot path."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    (repo / "snapshots" / commit).mkdir(parents=True)
    for number, (name, source) in enumerate(sorted(files.items())):
        blob = repo / "blobs" / f"blob{number:04d}"
        shutil.copyfile(source, blob)
        (repo / "snapshots" / commit / name).symlink_to(Path("..", "..", "blobs", blob.name))


def closed_loopback_port() -> int:
    """A loopback port nothing listens on (bound, then released): a connection to it is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class HubCalls:
    cache_lookups: list[str] = field(default_factory=list)  # hf_hub_download(local_files_only=True): no network
    downloads: list[tuple[str, str, str | None]] = field(default_factory=list)  # (repo, file, revision): the hub asked
    connects: list[tuple[str, int]] = field(default_factory=list)  # socket.create_connection addresses (the probe)


def online_without_network(monkeypatch, port: int | None = None, serve=None) -> HubCalls:
    """Undo the suite's HF_HUB_OFFLINE=1 (tests/conftest.py), yet let nothing leave the machine: the
    endpoint is http://127.0.0.1:<port> (closed unless the test listens there), a cache lookup goes to
    the real huggingface_hub, any other hf_hub_download call goes to `serve(repo_id, filename, revision)`
    (by default, the test fails), and a TCP connect to anything but loopback is refused, unattempted.
    The probe's per-process memory starts empty. Returns the calls, recorded."""
    calls = HubCalls()
    endpoint = f"http://127.0.0.1:{port or closed_loopback_port()}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(checkpoint_module, "_hub_probes", {})
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
                 "no_proxy"):
        monkeypatch.delenv(name, raising=False)

    real_download, real_connect = checkpoint_module.hf_hub_download, socket.create_connection

    def never_served(repo_id, filename, revision):
        raise AssertionError(f"the hub was asked for {filename} of {repo_id}")

    def download(repo_id, filename, revision=None, local_files_only=False, **kwargs):
        if local_files_only:
            calls.cache_lookups.append(filename)
            return real_download(repo_id, filename, revision=revision, local_files_only=True, **kwargs)
        calls.downloads.append((repo_id, filename, revision))
        return (serve or never_served)(repo_id, filename, revision)

    def connect(address, *args, **kwargs):
        calls.connects.append(tuple(address))
        if address[0] != "127.0.0.1":
            raise OSError(f"tests reach no network: {address} refused")
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "hf_hub_download", download)
    monkeypatch.setattr(socket, "create_connection", connect)
    return calls


def forbid_network(monkeypatch) -> None:
    """Any name lookup or socket connect fails the test: for loads that must be served from the cache alone."""
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("a cached checkpoint touched the network")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
