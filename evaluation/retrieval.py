"""Audio-text retrieval, evaluated: embed every clip and caption, rank, and score.

Conventions (LAION-CLAP's `evaluate_clotho_audiocaps`, also used by WavCaps), for clips with
several captions each:
- text -> audio: every caption is a query; its one relevant item is its clip.
  R@k = share of queries whose clip ranks in the top k; AP@10 = 1 / rank (0 beyond 10).
- audio -> text: every clip is a query; its relevant items are all of its captions.
  R@k counts the best-ranked of them; AP@10 = sum over its captions ranked in the top 10 of
  (precision at that rank), divided by its number of captions.
Ties are broken against the query: a relevant item tied with an irrelevant one ranks after it,
so a collapsed model (every similarity equal) scores chance, not perfection.
All numbers are percentages.

The embeddings are exactly `model.embed_audio` / `model.embed_text` (models/audio_text.py), so the
Python API, train.py's evaluations and eval.py score the same numbers.
"""

import numpy as np

from data.audio_text import captions_flat

RECALL_AT = (1, 5, 10)
MAP_AT = 10


def rank_relevance(similarity: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Each query's candidates sorted best first, as a bool matrix marking the relevant ones.

    similarity and relevant are (Q, C); the result's row q, column j says whether the candidate
    ranked j-th (0-based) for query q is relevant. Equal similarities put irrelevant candidates
    first, then order by candidate index, so the ranking is deterministic.
    """
    columns = np.broadcast_to(np.arange(similarity.shape[1]), similarity.shape)
    # np.lexsort sorts by the last key first: similarity descending, then relevant last, then index.
    order = np.lexsort((columns, relevant, -similarity.astype(np.float64)), axis=-1)  # (Q, C)
    return np.take_along_axis(relevant, order, axis=1)


def rank_metrics(similarity: np.ndarray, relevant: np.ndarray) -> dict[str, float]:
    """R@1/5/10 (best-ranked relevant item) and mAP@10, in percent, for (Q, C) queries x candidates."""
    hits = rank_relevance(similarity, relevant)  # (Q, C) bool, best first
    n_relevant = relevant.sum(axis=1)  # (Q,)
    if (n_relevant == 0).any():
        raise ValueError(f"query {int(np.argmin(n_relevant))} has no relevant candidate")
    first_hit = hits.argmax(axis=1)  # (Q,) 0-based rank of the best relevant item
    metrics = {f"R@{k}": 100.0 * float(np.mean(first_hit < k)) for k in RECALL_AT}
    top = hits[:, :MAP_AT]  # (Q, 10)
    precision = np.cumsum(top, axis=1) / np.arange(1, top.shape[1] + 1)  # precision at each rank
    average_precision = (precision * top).sum(axis=1) / n_relevant  # (Q,)
    metrics[f"mAP@{MAP_AT}"] = 100.0 * float(np.mean(average_precision))
    return metrics


def retrieval_metrics(similarity: np.ndarray, text_audio_index: np.ndarray) -> dict:
    """Both directions from a (N_text, N_audio) similarity matrix and each caption's clip index."""
    similarity = np.asarray(similarity)
    text_audio_index = np.asarray(text_audio_index)
    n_text, n_audio = similarity.shape
    if text_audio_index.shape != (n_text,):
        raise ValueError(f"text_audio_index has shape {text_audio_index.shape}, expected ({n_text},)")
    relevant = text_audio_index[:, None] == np.arange(n_audio)[None, :]  # (N_text, N_audio)
    return {
        "text_to_audio": rank_metrics(similarity, relevant),
        "audio_to_text": rank_metrics(similarity.T, relevant.T),
        "n_audio": int(n_audio),
        "n_text": int(n_text),
    }


def format_metrics(metrics: dict, title: str = "") -> str:
    """A small table of both directions, for the terminal."""
    names = [f"R@{k}" for k in RECALL_AT] + [f"mAP@{MAP_AT}"]
    head = f"{title or 'retrieval'} ({metrics['n_audio']} clips, {metrics['n_text']} captions)"
    lines = [head, f"  {'':<14}" + "".join(f"{n:>9}" for n in names)]
    for direction in ("text_to_audio", "audio_to_text"):
        row = metrics[direction]
        lines.append(f"  {direction:<14}" + "".join(f"{row[n]:>9.2f}" for n in names))
    return "\n".join(lines)


def encode_clips(model, tokenizer, clips, batch_size=32, pad_to_30s=None, workers=0, precision=None, progress=True,
                 feature_cache=None, text_cache=None):
    """Embed every clip and every caption: (audio (N_audio, E), text (N_text, E), text_audio_index (N_text,)).

    Exactly `model.embed_audio` / `model.embed_text` (models/audio_text.py), so the Python API and
    eval.py give the same numbers. precision None ("fp32", "bf16", "fp16" otherwise) and pad_to_30s None
    mean the model's own (a load_run model: its run's; a model built in memory: fp32, no padding), on
    the model's device. The caches (data/feature_cache.py,
    models/text_cache.py) serve what they hold. Every caption of every clip is a query
    (captions_flat); a bad file is an error here, since a dropped clip would shift the caption-to-clip index.
    """
    audio = model.embed_audio([clip.audio for clip in clips], batch_size=batch_size,
                              progress=None if progress else False, workers=workers, precision=precision,
                              pad_to_30s=pad_to_30s, feature_cache=feature_cache)
    texts, text_audio_index = captions_flat(clips)
    text = model.embed_text(texts, progress=None if progress else False, precision=precision, tokenizer=tokenizer,
                            text_cache=text_cache)  # in canonical chunks: no batch size to agree on
    return audio.numpy(), text.numpy(), np.asarray(text_audio_index)


def evaluate_retrieval(model, tokenizer, clips, **kwargs) -> dict:
    """retrieval_metrics of the model on these clips (all captions)."""
    audio, text, text_audio_index = encode_clips(model, tokenizer, clips, **kwargs)
    return retrieval_metrics(text @ audio.T, text_audio_index)
