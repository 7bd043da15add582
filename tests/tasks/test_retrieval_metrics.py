"""Retrieval metrics against hand-built similarity matrices with known ranks, and against a
line-by-line rewrite of LAION-CLAP's evaluation loop (5 captions per clip, no ties)."""

import numpy as np
import pytest

from evaluation.retrieval import format_metrics, retrieval_metrics


def clap_reference(logits_audio_text: np.ndarray) -> dict:
    """LAION-CLAP `evaluate_clotho_audiocaps` (training/train.py), rewritten plainly: 5 captions per clip,
    caption i belongs to clip i // 5; argsort ranks, so only valid without ties."""
    n_audio = logits_audio_text.shape[0]
    a2t_ranks, a2t_ap = np.zeros(n_audio), np.zeros(n_audio)
    for index in range(n_audio):
        inds = np.argsort(logits_audio_text[index])[::-1]
        rank, inds_map = 1e20, []
        for i in range(5 * index, 5 * index + 5):
            tmp = np.where(inds == i)[0][0]
            rank = min(rank, tmp)
            if tmp < 10:
                inds_map.append(tmp + 1)
        inds_map = np.sort(np.array(inds_map))
        a2t_ap[index] = np.sum(np.arange(1, len(inds_map) + 1) / inds_map) / 5 if len(inds_map) else 0.0
        a2t_ranks[index] = rank
    logits_text_audio = logits_audio_text.T
    ground_truth = np.repeat(np.arange(n_audio), 5)
    ranking = np.argsort(-logits_text_audio, axis=1)
    preds = np.array([np.where(row == gt)[0][0] for row, gt in zip(ranking, ground_truth)])
    t2a_ap = np.where(preds < 10, 1 / (preds + 1), 0.0)
    out = {}
    for name, ranks, ap in (("text_to_audio", preds, t2a_ap), ("audio_to_text", a2t_ranks, a2t_ap)):
        out[name] = {f"R@{k}": 100 * np.mean(ranks < k) for k in (1, 5, 10)} | {"mAP@10": 100 * np.mean(ap)}
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_laion_clap_loop_with_five_captions(seed):
    rng = np.random.default_rng(seed)
    n_audio = 30
    audio = rng.normal(size=(n_audio, 8))
    text = np.repeat(audio, 5, axis=0) + rng.normal(scale=1.5, size=(5 * n_audio, 8))  # noisy captions
    similarity = text @ audio.T  # (N_text, N_audio)
    ours = retrieval_metrics(similarity, np.repeat(np.arange(n_audio), 5))
    reference = clap_reference(similarity.T)
    for direction in ("text_to_audio", "audio_to_text"):
        for name, value in reference[direction].items():
            assert ours[direction][name] == pytest.approx(value, abs=1e-9), (direction, name)
    assert 0 < ours["text_to_audio"]["R@1"] < 100, "the case must be informative"
    assert ours["n_audio"] == n_audio and ours["n_text"] == 5 * n_audio


def test_hand_built_ranks():
    # 3 clips, captions: clip 0 has two (t0, t1), clip 1 one (t2), clip 2 one (t3).
    similarity = np.array(
        [
            [0.9, 0.1, 0.2],  # t0 -> clip 0 ranked 1st
            [0.1, 0.3, 0.2],  # t1 -> clip 0 ranked 3rd
            [0.5, 0.4, 0.0],  # t2 -> clip 1 ranked 2nd
            [0.0, 0.1, 0.8],  # t3 -> clip 2 ranked 1st
        ]
    )
    m = retrieval_metrics(similarity, np.array([0, 0, 1, 2]))
    t2a = m["text_to_audio"]
    assert t2a["R@1"] == pytest.approx(50.0)
    assert t2a["R@5"] == pytest.approx(100.0)
    assert t2a["mAP@10"] == pytest.approx(100 * (1 + 1 / 3 + 1 / 2 + 1) / 4)
    # audio -> text, columns: clip 0 ranks t0 (0.9) 1st, t2 (0.5) 2nd, t1 (0.1) 3rd (tie with... none: t3 0.0)
    # AP(clip 0) = (1/1 + 2/3) / 2; clip 1 ranks t2 (0.4) 1st; clip 2 ranks t3 (0.8) 1st.
    a2t = m["audio_to_text"]
    assert a2t["R@1"] == pytest.approx(100.0)
    assert a2t["mAP@10"] == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1 + 1) / 3)


def test_ties_count_against_the_query():
    similarity = np.ones((6, 3))  # a collapsed model: everything equally similar
    m = retrieval_metrics(similarity, np.array([0, 0, 1, 1, 2, 2]))
    # every caption's clip ranks after the 2 irrelevant clips tied with it
    assert m["text_to_audio"]["R@1"] == 0.0 and m["text_to_audio"]["R@5"] == 100.0
    assert m["text_to_audio"]["mAP@10"] == pytest.approx(100 / 3)
    # each clip's 2 captions come after the 4 irrelevant ones: ranks 5 and 6 (1-based)
    assert m["audio_to_text"]["R@1"] == 0.0 and m["audio_to_text"]["R@5"] == 100.0
    assert m["audio_to_text"]["mAP@10"] == pytest.approx(100 * (1 / 5 + 2 / 6) / 2)


def test_partial_tie_between_relevant_and_irrelevant():
    similarity = np.array([[0.5, 0.5, 0.1], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # t0 (clip 1) ties with clip 0
    m = retrieval_metrics(similarity, np.array([1, 0, 2]))
    assert m["text_to_audio"]["R@1"] == pytest.approx(200 / 3)
    assert m["text_to_audio"]["mAP@10"] == pytest.approx(100 * (1 / 2 + 1 + 1) / 3)


def test_shape_errors_and_table():
    with pytest.raises(ValueError, match="expected \\(2,\\)"):
        retrieval_metrics(np.zeros((2, 2)), np.array([0]))
    with pytest.raises(ValueError, match="no relevant candidate"):
        retrieval_metrics(np.zeros((2, 3)), np.array([0, 1]))  # clip 2 has no caption
    table = format_metrics(retrieval_metrics(np.eye(3), np.arange(3)), "demo")
    assert "demo (3 clips, 3 captions)" in table and "100.00" in table
