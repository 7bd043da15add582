"""Text-to-audio search with a trained audio-text model: a library of clips (a folder, or the clips of a
manifest) is embedded once and kept in an index (data/search_index.py), then ranked against a query text
by cosine similarity."""

from pathlib import Path

import numpy as np

from data.audio_folder import AUDIO_SUFFIXES, find_audio_files
from data.manifest import read_manifest
from data.search_index import default_index_path, search_index


def rank_clips(audio: np.ndarray, query: np.ndarray, top: int) -> list[tuple[int, float]]:
    """(row, cosine similarity) of the `top` clips closest to the query, best first; ties keep file order."""
    scores = audio @ query  # (N,)
    order = np.argsort(-scores, kind="stable")[:top]
    return [(int(row), float(scores[row])) for row in order]


def search_clips(model, query: str, run_dir, audio_dir=None, data=None, top: int = 10, index=None,
                 with_adapter: bool = True, batch_size: int = 32, workers: int = 0, feature_cache=None) -> list[dict]:
    """The `top` clips of `audio_dir` (searched recursively), or of the `data` manifest, closest to `query`:
    [{"rank", "score", "path"}], printed as a table. The library's embeddings are read from (or kept in)
    `index` (default: a file in `run_dir` named after the library and the adapter setting)."""
    if data:
        clips = read_manifest(data, audio_dir=audio_dir)
        source = Path(data)
        root = Path(audio_dir) if audio_dir else source.parent
        files = list(dict.fromkeys(clip.audio for clip in clips))
    else:
        source = root = Path(audio_dir)
        files = find_audio_files(root)
        if not files:
            raise ValueError(f"{root} holds no audio files "
                             f"(looked recursively for {', '.join(sorted(AUDIO_SUFFIXES))})")
    index_path = Path(index) if index else default_index_path(run_dir, source, with_adapter)
    audio, names = search_index(model, files, root, index_path, with_adapter, batch_size, workers, feature_cache)
    query_embedding = model.embed_text([query]).numpy()[0]  # (E,)
    results = [{"rank": rank, "score": score, "path": names[row]}
               for rank, (row, score) in enumerate(rank_clips(audio, query_embedding, top), start=1)]
    print(f'"{query}": top {len(results)} of {len(names)} clips in {source} (cosine similarity)')
    for result in results:
        print(f"  {result['rank']:>3}  {result['score']:7.4f}  {result['path']}")
    return results
