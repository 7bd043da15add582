"""models/text_cache.py: pooled features of a frozen text tower, once per caption. The reference
is the uncached computation, mean_pool(text_tower(ids, mask), mask), on the same batch (bit for
bit) and on other batch compositions (float rounding only)."""

import pytest
import torch

from lora import LoRAConfig, inject_lora, mark_only_lora_trainable
from models.bert import BertConfig, BertModel, mean_pool
from models.text_cache import FrozenTextCache, TextTowerTrainsError
from models.tokenizer import load_tokenizer_files, tokenize

WORDS = ["a", "dog", "barks", "loudly", "then", "rain", "falls", "on", "roof", "car", "passes", "by", "bird", "sings"]
TINY = BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=32)
FIRST = ["a dog barks", "rain falls on a roof then a car passes by", "a bird sings", "a car passes"]
SECOND = ["a bird sings", "a dog barks loudly then a bird sings then rain falls", "rain falls", "a dog barks"]


@pytest.fixture
def tokenizer(tmp_path):
    (tmp_path / "vocab.txt").write_text("".join(f"{w}\n"
                                                for w in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]))
    return load_tokenizer_files(None, tmp_path / "vocab.txt", max_length=TINY.max_position_embeddings)


def frozen_tower(seed=0):
    torch.manual_seed(seed)
    tower = BertModel(TINY).eval()
    for p in tower.parameters():
        p.requires_grad_(False)
    return tower


@torch.no_grad()
def uncached(tower, input_ids, attention_mask):
    return mean_pool(tower(input_ids, attention_mask), attention_mask)


def count_rows(tower):
    """Rows that go through the tower, counted by a forward hook."""
    rows = []
    tower.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    return rows


def test_a_new_batch_is_bit_equal_to_the_uncached_computation(tokenizer):
    tower, cache = frozen_tower(), FrozenTextCache()
    ids, mask = tokenize(tokenizer, FIRST)
    pooled = cache.pooled(tower, FIRST, ids, mask)
    assert pooled.shape == (4, TINY.hidden_size) and pooled.dtype == torch.float32 and not pooled.requires_grad
    assert torch.equal(pooled, uncached(tower, ids, mask))
    assert (cache.misses, cache.hits, len(cache)) == (4, 0, 4)


def test_cached_captions_are_reused_and_close_to_recomputing_in_another_batch(tokenizer):
    tower, cache = frozen_tower(), FrozenTextCache()
    first = cache.pooled(tower, FIRST, *tokenize(tokenizer, FIRST))
    rows = count_rows(tower)
    ids, mask = tokenize(tokenizer, SECOND)  # longer padding than FIRST's, other neighbours
    pooled = cache.pooled(tower, SECOND, ids, mask)
    assert rows == [2]  # only the two captions not seen before ran through the tower
    assert (cache.misses, cache.hits) == (6, 2)
    # the cached rows are exactly the first batch's ...
    assert torch.equal(pooled[0], first[2]) and torch.equal(pooled[3], first[0])
    assert torch.equal(cache.pooled(tower, SECOND, ids, mask), pooled) and rows == [2]  # all hits now
    # ... and what the tower gives in this batch up to float rounding: the mask hides padding
    recomputed = uncached(tower, ids, mask)
    torch.testing.assert_close(pooled, recomputed, rtol=0, atol=1e-5)
    assert not torch.allclose(recomputed[0], recomputed[1], atol=1e-3)  # the captions do differ


def test_a_caption_twice_in_a_batch_runs_once(tokenizer):
    tower, cache = frozen_tower(), FrozenTextCache()
    captions = ["a dog barks", "a bird sings", "a dog barks"]
    rows = count_rows(tower)
    pooled = cache.pooled(tower, captions, *tokenize(tokenizer, captions))
    assert rows == [2] and torch.equal(pooled[0], pooled[2])
    torch.testing.assert_close(pooled, uncached(tower, *tokenize(tokenizer, captions)), rtol=0, atol=1e-5)


def test_refuses_a_text_tower_that_trains(tokenizer):
    ids, mask = tokenize(tokenizer, FIRST)
    tower = frozen_tower()
    with pytest.raises(TextTowerTrainsError, match="train mode"):
        FrozenTextCache().pooled(tower.train(), FIRST, ids, mask)
    tower = frozen_tower()
    inject_lora(tower, LoRAConfig(targets=r"encoder\.layer\.\d+\.attention\.self\.(query|value)"))
    mark_only_lora_trainable(tower)  # LoRA on the text tower: its features change every step
    with pytest.raises(TextTowerTrainsError,
                       match=r"requiring grad \(encoder\.layer\.0\.attention\.self\.query\.lora_A"):
        FrozenTextCache().pooled(tower.eval(), FIRST, ids, mask)


def test_changed_weights_or_another_tower_drop_every_entry(tokenizer):
    tower, cache = frozen_tower(), FrozenTextCache()
    ids, mask = tokenize(tokenizer, FIRST)
    before = cache.pooled(tower, FIRST, ids, mask)
    with torch.no_grad():
        tower.encoder.layer[1].output.dense.weight.mul_(1.5)  # in place, as load_state_dict copies
    after = cache.pooled(tower, FIRST, ids, mask)
    assert not torch.allclose(after, before) and torch.equal(after, uncached(tower, ids, mask))
    other = frozen_tower(seed=1)
    assert torch.equal(cache.pooled(other, FIRST, ids, mask), uncached(other, ids, mask))
    assert cache.misses == 12 and cache.hits == 0


def test_autocast_is_part_of_the_key(tokenizer):
    tower, cache = frozen_tower(), FrozenTextCache()
    ids, mask = tokenize(tokenizer, FIRST)
    fp32 = cache.pooled(tower, FIRST, ids, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = cache.pooled(tower, FIRST, ids, mask)  # bf16 matmuls (the last LayerNorm is fp32)
        assert torch.equal(bf16, uncached(tower, ids, mask)) and not torch.allclose(bf16, fp32, atol=1e-4)
    assert torch.equal(cache.pooled(tower, FIRST, ids, mask), fp32) and cache.misses == 8


def test_captions_must_match_the_token_rows(tokenizer):
    ids, mask = tokenize(tokenizer, FIRST)
    with pytest.raises(ValueError, match="3 captions for input_ids"):
        FrozenTextCache().pooled(frozen_tower(), FIRST[:3], ids, mask)


def test_fill_gives_the_same_numbers_whatever_the_order_of_the_data(tokenizer):
    """A resumed run starts with an empty cache: what fill computes depends on the captions alone."""
    tower = frozen_tower()
    captions = FIRST + SECOND
    first, second = FrozenTextCache(), FrozenTextCache()
    assert first.fill(tower, captions, tokenizer, "cpu", chunk=3) == len(set(captions))
    second.fill(tower, list(reversed(captions)), tokenizer, "cpu", chunk=3)
    for caption in captions:
        ids, mask = tokenize(tokenizer, [caption])
        assert torch.equal(first.pooled(tower, [caption], ids, mask), second.pooled(tower, [caption], ids, mask))
        torch.testing.assert_close(first.pooled(tower, [caption], ids, mask), uncached(tower, ids, mask),
                                   atol=1e-6, rtol=0)
    assert first.fill(tower, captions, tokenizer, "cpu") == 0  # nothing left to compute
