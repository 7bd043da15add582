"""data/packing.py and the collates' pack= option: first-fit rows, segment and position ids, the label of each
example's first token, the padding share either way, the per-example fields in reading order, the refusals.
The packed batches' losses and gradients against the padded ones: tests/models/test_qwen2_audio.py and
tests/models/test_instructblip_vicuna.py."""

import numpy as np
import pytest
import torch

from data.audio_qa import collate_audio_qa
from data.packing import first_fit, pack_examples, padding_counts
from models.audio import clip_features
from tests.qwen2_audio_fixtures import tokenizer_for


def test_rows_are_filled_first_fit_and_read_in_order():
    tokens = [[10 + i] * n for i, n in enumerate([4, 5, 3, 2, 6])]
    labels = [[-100] + [7] * (len(t) - 1) for t in tokens]
    labels[1] = [5] * 5  # a first label that is scored unpacked never is packed: the packer clears it
    packed = pack_examples(tokens, labels, budget=8, pad_id=0)
    # 4 -> row 0 (4 left); 5 -> row 1 (3 left); 3 -> row 0 (1 left); 2 -> row 1 (1 left); 6 -> row 2 (2 left)
    assert first_fit([4, 5, 3, 2, 6], 8) == [[0, 2], [1, 3], [4]]
    assert packed.order == [0, 2, 1, 3, 4] and packed.spans == [[(0, 4), (4, 7)], [(0, 5), (5, 7)], [(0, 6)]]
    assert packed.input_ids.tolist() == [[10] * 4 + [12] * 3, [11] * 5 + [13] * 2, [14] * 6 + [0]]  # as wide as row 0
    assert packed.segment_ids.tolist() == [[1, 1, 1, 1, 2, 2, 2], [1] * 5 + [2] * 2, [1] * 6 + [0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 0, 1], [0, 1, 2, 3, 4, 5, 0]]
    assert packed.attention_mask.tolist() == (packed.segment_ids > 0).long().tolist()
    assert packed.labels.tolist() == [[-100, 7, 7, 7, -100, 7, 7], [-100, 5, 5, 5, 5, -100, 7],
                                      [-100, 7, 7, 7, 7, 7, -100]]
    assert (packed.padding_tokens, packed.lm_tokens) == (1, 21) and packed.padding_share == pytest.approx(1 / 21)
    # padded, the same five examples are 5 rows of 6: 10 padding tokens of 30
    mask = (torch.arange(6)[None, :] < torch.tensor([4, 5, 3, 2, 6])[:, None]).long()
    assert padding_counts(mask) == {"padding_tokens": 10, "lm_tokens": 30, "padding_share": pytest.approx(1 / 3)}
    assert padding_counts(mask, real_prefix=4)["lm_tokens"] == 50  # queries in front of every row are real


def test_an_example_over_the_budget_is_refused_by_name():
    with pytest.raises(ValueError, match=r"m.jsonl:2: the example is 9 tokens long, more than the packing budget of 8; "
                                         r"raise the budget to at least 9"):
        pack_examples([[1] * 3, [1] * 9], [[-100] * 3, [-100] * 9], 8, 0, names=["m.jsonl:1", "m.jsonl:2"])
    with pytest.raises(ValueError, match="as many labels as tokens"):
        pack_examples([[1, 2]], [[-100]], 8, 0)


def audio_items(seconds=(1.0, 0.6, 0.5, 0.1),
                answers=("loud noise", "a rising chirp", "two short high tones", "loud noise")):
    rng = np.random.default_rng(0)
    return [{"index": 10 + i, "features": clip_features(torch.as_tensor((rng.standard_normal(int(s * 16000)) * 0.1)
                                                                         .astype(np.float32)), 128),
             "prompt": "what do you hear", "answer": a, "path": f"clip{i}.wav", "line": i + 1,
             "where": f"m.jsonl:{i + 1}", "cache": None} for i, (s, a) in enumerate(zip(seconds, answers))]


def test_packed_audio_qa_batch_holds_each_padded_row_and_lists_examples_in_reading_order():
    tokenizer, items = tokenizer_for(), audio_items()
    padded = collate_audio_qa(items, tokenizer)
    lengths = padded["attention_mask"].sum(1).tolist()
    assert lengths == sorted(lengths, reverse=True)  # longest clip first, so the shortest joins it
    budget = lengths[1] + lengths[2]  # first fit: [0, 3] and [1, 2]
    packed = collate_audio_qa(items, tokenizer, pack=budget)
    order = packed["order"]
    assert order == [0, 3, 1, 2] and packed["input_ids"].shape == (2, budget)
    assert packed["paths"] == [padded["paths"][i] for i in order]
    assert packed["lines"] == [padded["lines"][i] for i in order]
    assert packed["index"].tolist() == [padded["index"][i].item() for i in order]
    assert packed["answers"] == [padded["answers"][i] for i in order]
    features = [item["features"].valid_frames for item in items]
    assert packed["feature_attention_mask"].sum(1).tolist() == [features[i] for i in order]  # clips in reading order
    assert torch.equal(packed["prompt_input_ids"], padded["prompt_input_ids"][order])
    spans = [(row, (packed["segment_ids"][row] == k).nonzero().flatten()) for row in range(packed["input_ids"].shape[0])
             for k in range(1, int(packed["segment_ids"][row].max()) + 1)]
    assert len(spans) == len(items)
    for (row, where), i in zip(spans, order):  # each example's tokens and labels, as its padded row holds them
        n = lengths[i]
        assert packed["input_ids"][row, where].tolist() == padded["input_ids"][i, :n].tolist()
        assert packed["labels"][row, where].tolist() == padded["labels"][i, :n].tolist()
        assert packed["position_ids"][row, where].tolist() == list(range(n))
    assert packed["padding_share"] < padded["padding_share"]
    assert padded["padding_share"] == pytest.approx(1 - sum(lengths) / padded["input_ids"].numel())
    assert packed["padding_tokens"] == packed["lm_tokens"] - sum(lengths)
    with pytest.raises(ValueError, match=r"m.jsonl:\d: the example is \d+ tokens long, more than the packing budget"):
        collate_audio_qa(items, tokenizer, pack=10)
