"""A fake Hugging Face hub cache, so hub ids resolve offline in tests."""

import shutil
from pathlib import Path


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
