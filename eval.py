"""Retrieval evaluation of an audio-text checkpoint: recall and mAP@10 in both directions.

    python eval.py --checkpoint runs/demo --data eval.jsonl [--json OUT.json] [--no-adapter]
                   [--save-embeddings OUT.npz]

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
"""

import numpy as np

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
