"""models/bert.py and models/tokenizer.py against transformers and tokenizers, on tiny random
weights and a tiny WordPiece vocabulary trained here."""

import json

import pytest
import torch
import transformers
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from tokenizers.trainers import WordPieceTrainer

from models.bert import BertConfig, BertModel, bert_prefix, has_pooler, mean_pool
from models.tokenizer import load_tokenizer_dir, load_tokenizer_files, tokenize
from tests.conftest import randomize

TINY = dict(
    model_type="bert", vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=64, max_position_embeddings=40, type_vocab_size=2, pad_token_id=0,
)
LENGTHS = [9, 6, 3]  # a padded batch: every row but the first has pad tokens


def hf_config(**overrides) -> transformers.BertConfig:
    return transformers.BertConfig(**{**TINY, **overrides})


def pair(with_pooler: bool = True, **overrides):
    """A random HF BertModel and ours built from its config dict and loaded strictly from it."""
    torch.manual_seed(0)
    reference = transformers.BertModel(hf_config(**overrides), add_pooling_layer=with_pooler).eval()
    randomize(reference, seed=1)
    ours = BertModel(BertConfig.from_hf(reference.config.to_dict()), with_pooler=with_pooler).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return ours, reference


def padded_batch(seed: int = 2):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, TINY["vocab_size"], (len(LENGTHS), max(LENGTHS)), generator=generator)
    attention_mask = (torch.arange(max(LENGTHS))[None, :] < torch.tensor(LENGTHS)[:, None]).long()  # (B, L)
    input_ids = input_ids.masked_fill(attention_mask == 0, TINY["pad_token_id"])
    token_type_ids = torch.randint(0, 2, input_ids.shape, generator=generator) * attention_mask
    return input_ids, attention_mask, token_type_ids


# ---- model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("with_token_types", [False, True])
@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new", "relu"])
def test_forward_equals_transformers(hidden_act, with_token_types):
    ours, reference = pair(hidden_act=hidden_act)
    input_ids, attention_mask, token_type_ids = padded_batch()
    types = token_type_ids if with_token_types else None
    with torch.no_grad():
        out = ours(input_ids, attention_mask, types)
        ref = reference(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=types)
    assert out.shape == (len(LENGTHS), max(LENGTHS), TINY["hidden_size"])
    # the pad rows too: a pad query attends to the real keys in both implementations
    torch.testing.assert_close(out, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.pooler_output(out), ref.pooler_output, atol=1e-5, rtol=1e-5)

    # the inputs must matter, or the comparison above proves little
    with torch.no_grad():
        unmasked = ours(input_ids, None, types)
        other_types = ours(input_ids, attention_mask, 1 - token_type_ids)
    real = slice(0, LENGTHS[1])
    assert not torch.allclose(unmasked[1, real], out[1, real], atol=1e-3), "the mask must hide pad keys"
    assert not torch.allclose(other_types, out, atol=1e-3), "token types must change the output"


def test_gradients_equal_transformers():
    ours, reference = pair()
    input_ids, attention_mask, _ = padded_batch()
    out = ours(input_ids, attention_mask)
    ref = reference(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    # every position in the loss, pad rows too, so the pad token's embedding is on the path
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    for i, layer in enumerate(ours.encoder.layer):
        grad = layer.attention.self.query.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
        reference_grad = reference.encoder.layer[i].attention.self.query.weight.grad
        torch.testing.assert_close(grad, reference_grad, atol=1e-5, rtol=1e-4)
    # padding_idx: the pad token's embedding row is frozen, as in HF
    word_grad = ours.embeddings.word_embeddings.weight.grad
    assert word_grad[TINY["pad_token_id"]].abs().sum() == 0 and word_grad[input_ids[0, 0]].abs().sum() > 0


def test_train_mode_dropout_matches_transformers():
    # dropout in the same places, drawn in the same order: the same seed gives the same masks
    ours, reference = pair()
    ours.train(), reference.train()
    input_ids, attention_mask, _ = padded_batch()
    torch.manual_seed(5)
    out = ours(input_ids, attention_mask)
    torch.manual_seed(5)
    ref = reference(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, ours.eval()(input_ids, attention_mask), atol=1e-3), "train mode must drop"


@pytest.mark.parametrize("with_pooler", [True, False])
def test_state_dict_keys_and_shapes_equal_transformers(with_pooler):
    ours, reference = pair(with_pooler=with_pooler)
    assert set(ours.state_dict()) == set(reference.state_dict())
    reference_shapes = {k: v.shape for k, v in reference.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == reference_shapes
    assert any(k.startswith("pooler.") for k in ours.state_dict()) == with_pooler
    assert list(ours.buffers()) == [], "a buffer would need rebuilding after a meta-device build"


def test_meta_build_and_assign_load_runs():
    _, reference = pair()
    with torch.device("meta"):
        ours = BertModel(BertConfig.from_hf(reference.config.to_dict()))
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)
    input_ids, attention_mask, _ = padded_batch()
    with torch.no_grad():
        out = ours.eval()(input_ids, attention_mask)
        ref = reference(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_prefixed_masked_lm_checkpoint_loads_by_prefix_filter():
    torch.manual_seed(0)
    mlm = transformers.BertForMaskedLM(hf_config()).eval()  # bert.* without a pooler, plus cls.*
    randomize(mlm, seed=4)
    state = mlm.state_dict()
    prefix = bert_prefix(state)
    assert prefix == "bert." and not has_pooler(state, prefix)
    ours = BertModel(BertConfig.from_hf(mlm.config.to_dict()), with_pooler=has_pooler(state, prefix)).eval()
    ours.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    input_ids, attention_mask, _ = padded_batch()
    with torch.no_grad():
        out = ours(input_ids, attention_mask)
        ref = mlm.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="with_pooler=False"):
        ours.pooler_output(torch.zeros(1, 2, TINY["hidden_size"]))


def test_too_long_input_names_the_limit():
    ours, _ = pair()
    with pytest.raises(ValueError, match="max_position_embeddings=40"):
        ours(torch.ones(1, 41, dtype=torch.long))


def test_mean_pool_by_hand():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]],
                           [[4.0, -2.0], [50.0, 50.0], [70.0, 70.0]],
                           [[9.0, 9.0], [9.0, 9.0], [9.0, 9.0]]])  # (B=3, L=3, H=2)
    attention_mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    expected = torch.tensor([[2.0, 4.0], [4.0, -2.0], [0.0, 0.0]])  # an empty row is 0, not NaN
    torch.testing.assert_close(mean_pool(hidden, attention_mask), expected)


# ---- config and checkpoint layout ----------------------------------------------------------


def test_config_from_hf_reads_its_fields_and_ignores_the_rest():
    minilm_like = {
        **TINY, "architectures": ["BertModel"], "hidden_act": "gelu_new", "layer_norm_eps": 1e-7,
        "gradient_checkpointing": False, "position_embedding_type": "absolute", "transformers_version": "4.8.2",
    }
    cfg = BertConfig.from_hf(minilm_like)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size) == (32, 2, 64, 99)
    assert (cfg.hidden_act, cfg.layer_norm_eps, cfg.max_position_embeddings) == ("gelu_new", 1e-7, 40)
    assert BertConfig.from_hf({"model_type": "bert"}) == BertConfig()  # transformers' defaults
    with pytest.raises(Exception):
        cfg.hidden_size = 64  # frozen


@pytest.mark.parametrize("change, message", [
    ({"model_type": "roberta"}, "'roberta'"),
    ({"model_type": None}, "None"),
    ({"hidden_act": "swish"}, "'swish'"),
    ({"position_embedding_type": "relative_key"}, "'relative_key'"),
    ({"num_attention_heads": 5}, "num_attention_heads 5"),
])
def test_config_refuses_what_it_cannot_run(change, message):
    with pytest.raises(ValueError, match=message):
        BertConfig.from_hf({**TINY, **change})


def test_bert_prefix_for_both_layouts():
    torch.manual_seed(0)
    assert bert_prefix(transformers.BertModel(hf_config()).state_dict()) == ""
    pretraining = transformers.BertForPreTraining(hf_config()).state_dict()
    assert bert_prefix(pretraining) == "bert." and has_pooler(pretraining, "bert.")


@pytest.mark.parametrize("keys, found", [
    (["distilbert.embeddings.word_embeddings.weight", "vocab_projector.weight"], "neither"),
    (["embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings.weight"], "both"),
])
def test_bert_prefix_error_lists_what_it_saw(keys, found):
    with pytest.raises(ValueError, match=found) as error:
        bert_prefix(keys)
    assert all(key.split(".")[0] in str(error.value) for key in keys)


# ---- tokenizer -----------------------------------------------------------------------------

CORPUS = [
    "A dog barks loudly in the park.", "The cat sleeps on a warm mat.", "Rain falls on the roof at night.",
    "Birds sing before dawn, near the café.", "Children laugh while the bells ring.",
]
TEXTS = [
    "A Dog BARKS in the park!", "rain", "The CAFÉ bells ring at dawn, near a warm roof.",
    "zebra xylophone 猫 [MASK] sleeps", "",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny WordPiece trained here, saved as tokenizer.json and, in another directory, as vocab.txt."""
    tok = Tokenizer(WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = WordPieceTrainer(vocab_size=90, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(CORPUS * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=64)  # a fixed padding that loading must replace
    json_dir, vocab_dir = tmp_path_factory.mktemp("json"), tmp_path_factory.mktemp("vocab")
    tok.save(str(json_dir / "tokenizer.json"))
    tok.model.save(str(vocab_dir))  # writes vocab.txt
    return json_dir, vocab_dir


def test_tokenizer_json_gives_the_files_ids_padded_to_the_longest(trained):
    json_dir, vocab_dir = trained
    tok = load_tokenizer_dir(json_dir, max_length=40)
    input_ids, attention_mask = tokenize(tok, TEXTS)
    reference = Tokenizer.from_file(str(json_dir / "tokenizer.json"))
    reference.no_padding()
    expected = [reference.encode(text).ids for text in TEXTS]
    assert input_ids.dtype == attention_mask.dtype == torch.long
    assert input_ids.shape == attention_mask.shape == (len(TEXTS), max(map(len, expected)))
    for row, ids in enumerate(expected):
        assert input_ids[row, : len(ids)].tolist() == ids
        assert attention_mask[row].tolist() == [1] * len(ids) + [0] * (input_ids.shape[1] - len(ids))
        assert set(input_ids[row, len(ids):].tolist()) <= {0}
    # tokenizer.json wins over vocab.txt when both are given
    both = load_tokenizer_files(json_dir / "tokenizer.json", vocab_dir / "vocab.txt")
    assert both.get_vocab() == reference.get_vocab()


@pytest.mark.parametrize("do_lower_case", [None, True, False])
def test_vocab_txt_fallback_equals_transformers(trained, tmp_path, do_lower_case):
    _, vocab_dir = trained
    (tmp_path / "vocab.txt").write_bytes((vocab_dir / "vocab.txt").read_bytes())
    if do_lower_case is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": do_lower_case}))
    # transformers 5's BertTokenizerFast(vocab_file=...) ignores the file and builds a 5-token
    # vocabulary; from_pretrained on a directory holding only vocab.txt reads it.
    reference = transformers.BertTokenizerFast.from_pretrained(str(tmp_path))
    expected = reference(TEXTS, padding=True, truncation=True, max_length=12)
    input_ids, attention_mask = tokenize(load_tokenizer_dir(tmp_path, max_length=12), TEXTS)
    assert input_ids.tolist() == expected["input_ids"]
    assert attention_mask.tolist() == expected["attention_mask"]
    # "A Dog BARKS": only lowercasing finds "bark" in this lowercase vocabulary
    assert (reference.convert_tokens_to_ids("bark") in input_ids[0].tolist()) == (do_lower_case is not False)


def test_truncation_keeps_cls_and_sep(trained):
    json_dir, vocab_dir = trained
    long_text = " ".join(CORPUS)
    from_json = load_tokenizer_files(json_dir / "tokenizer.json", None, max_length=7)
    from_vocab = load_tokenizer_files(None, vocab_dir / "vocab.txt", max_length=7)
    for tok in (from_json, from_vocab):
        input_ids, attention_mask = tokenize(tok, [long_text, "the"])
        assert input_ids.shape == (2, 7)
        assert input_ids[0, 0].item() == 2 and input_ids[0, -1].item() == 3  # [CLS] ... [SEP]
        assert attention_mask.tolist() == [[1] * 7, [1, 1, 1, 0, 0, 0, 0]]


def test_missing_tokenizer_files_name_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or vocab.txt") as error:
        load_tokenizer_dir(tmp_path / "empty-model")
    assert str(tmp_path / "empty-model") in str(error.value)


def test_tokenize_refuses_a_bare_string_and_an_unpadded_tokenizer(trained):
    json_dir, _ = trained
    with pytest.raises(ValueError, match="list of texts"):
        tokenize(load_tokenizer_dir(json_dir), "a dog")
    unpadded = Tokenizer.from_file(str(json_dir / "tokenizer.json"))
    unpadded.no_padding()
    with pytest.raises(ValueError, match="does not pad"):
        tokenize(unpadded, ["a dog", "a cat sleeps"])
