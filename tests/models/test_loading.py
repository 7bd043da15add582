"""The public loaders (`from models import ...`) on checkpoints written by transformers:
Qwen2-Audio (sharded), Whisper (both HF layouts), a bare encoder, BERT (two layouts), the
tokenizer, and a hub id resolved offline from a fake cache; and the UserError each loader raises
for a checkpoint of the wrong kind, without a tokenizer, or not there."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from common.errors import UserError
from models import audio_to_features, load_audio_encoder, load_text_encoder, load_tokenizer
from models import checkpoint as checkpoint_module
from models.checkpoint import INDEX, CheckpointError, CheckpointNotFound, NotCached
from models.tokenizer import tokenize
from tests.hub_fixtures import forbid_network, make_hub_cache, online_without_network

AUDIO = dict(num_mel_bins=16, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
             max_source_positions=20)
TEXT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=40)


@pytest.fixture(scope="module")
def qwen2_audio(tmp_path_factory):
    """A tiny Qwen2-Audio saved in many small shards, and its audio tower as the reference."""
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    config = Qwen2AudioConfig(
        audio_config=AUDIO,
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1),
    )
    torch.manual_seed(0)
    model = Qwen2AudioForConditionalGeneration(config).eval()
    directory = tmp_path_factory.mktemp("qwen2_audio")
    model.save_pretrained(directory, max_shard_size="30KB")
    return directory, model.model.audio_tower if hasattr(model, "model") else model.audio_tower


def features(n_mels=16, frames=40, batch=2, seed=0):
    return torch.randn(batch, n_mels, frames, generator=torch.Generator().manual_seed(seed))


def test_qwen2_audio_checkpoint_loads_only_audio_shards_and_equals_reference(qwen2_audio, monkeypatch):
    directory, reference = qwen2_audio
    opened = []
    real_open = checkpoint_module.Checkpoint.open

    def spy(*args, **kwargs):
        opened.append(real_open(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(checkpoint_module.Checkpoint, "open", spy)
    encoder = load_audio_encoder(directory)
    index = json.loads((directory / INDEX).read_text())["weight_map"]
    audio_shards = sorted({shard for key, shard in index.items() if key.startswith("audio_tower.")})
    assert len(set(index.values())) > len(audio_shards) >= 2, "the fixture must spread the model over shards"
    assert sorted(opened[0].opened_files) == audio_shards
    x = features()
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), reference(x).last_hidden_state, atol=1e-5, rtol=1e-5)
    assert not encoder.training and encoder.config.num_mel_bins == 16


def test_bf16_dtype(qwen2_audio):
    directory, _ = qwen2_audio
    encoder = load_audio_encoder(directory, dtype="bf16")
    assert {p.dtype for p in encoder.parameters()} == {torch.bfloat16}
    assert encoder(features()).dtype == torch.bfloat16


@pytest.mark.parametrize("architecture", ["WhisperModel", "WhisperForConditionalGeneration"])
def test_whisper_checkpoint_maps_onto_the_audio_tower(architecture, tmp_path):
    import transformers

    config = transformers.WhisperConfig(
        vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, num_mel_bins=16,
        d_model=32, encoder_layers=2, encoder_attention_heads=4, decoder_layers=1, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=20, max_target_positions=16,
    )
    torch.manual_seed(1)
    model = getattr(transformers, architecture)(config).eval()
    model.save_pretrained(tmp_path)
    whisper = model.get_encoder()
    encoder = load_audio_encoder(tmp_path)
    x = features(frames=2 * 20)
    # Qwen2-Audio's tower = Whisper's layers, then AvgPool1d(2, 2), then Whisper's final LayerNorm.
    norm = whisper.layer_norm
    whisper.layer_norm = torch.nn.Identity()
    with torch.no_grad():
        pre_norm = whisper(x).last_hidden_state  # (B, T', D)
        expected = norm(torch.nn.functional.avg_pool1d(pre_norm.transpose(1, 2), 2, 2).transpose(1, 2))
        torch.testing.assert_close(encoder(x), expected, atol=1e-5, rtol=1e-5)


def test_standalone_encoder_checkpoint(tmp_path):
    from transformers import Qwen2AudioEncoder, Qwen2AudioEncoderConfig

    torch.manual_seed(2)
    reference = Qwen2AudioEncoder(Qwen2AudioEncoderConfig(**AUDIO)).eval()
    reference.save_pretrained(tmp_path)
    x = features()
    with torch.no_grad():
        torch.testing.assert_close(load_audio_encoder(tmp_path)(x), reference(x).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)


def test_unknown_model_type_is_named(tmp_path, qwen2_audio):
    directory, _ = qwen2_audio
    for name in directory.iterdir():
        (tmp_path / name.name).write_bytes(name.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"model_type": "wav2vec2"}))
    with pytest.raises(CheckpointError, match=f"^{tmp_path}: config.json has model_type 'wav2vec2'") as error:
        load_audio_encoder(tmp_path)
    assert isinstance(error.value, UserError) and isinstance(error.value, ValueError)


def test_audio_checkpoint_given_as_the_text_model_is_a_user_error(qwen2_audio):
    directory, _ = qwen2_audio
    with pytest.raises(CheckpointError, match=f"^{directory}: model_type 'qwen2_audio' is not a BERT checkpoint"):
        load_text_encoder(directory)


def test_missing_model_directory_is_a_user_error(tmp_path):
    for load in (load_audio_encoder, load_text_encoder, load_tokenizer):
        with pytest.raises(CheckpointNotFound, match=f"no checkpoint directory at {tmp_path / 'typo'}: pass a "
                                                     "directory holding config.json") as error:
            load(tmp_path / "typo")
        assert isinstance(error.value, UserError)


def test_hub_id_resolves_offline_from_the_cache(qwen2_audio, tmp_path, monkeypatch):
    from huggingface_hub import constants

    directory, reference = qwen2_audio
    index = json.loads((directory / INDEX).read_text())["weight_map"]
    needed = sorted({shard for key, shard in index.items() if key.startswith("audio_tower.")})
    make_hub_cache(tmp_path / "hub", "Qwen/Qwen2-Audio-tiny",
                   {n: directory / n for n in ["config.json", INDEX, *needed]})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    encoder = load_audio_encoder("Qwen/Qwen2-Audio-tiny")  # the language-model shards are not cached at all
    x = features()
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), reference(x).last_hidden_state, atol=1e-5, rtol=1e-5)
    with pytest.raises(NotCached, match="^run `hf download Qwen/not-cached`.*HF_HUB_OFFLINE=1"):
        load_audio_encoder("Qwen/not-cached")


def test_contract_snippet_from_wav_files(qwen2_audio, tmp_path):
    directory, reference = qwen2_audio
    paths = []
    for i, seconds in enumerate([0.3, 0.15]):
        t = np.arange(int(16000 * seconds)) / 16000
        sf.write(tmp_path / f"{i}.wav", 0.3 * np.sin(2 * np.pi * 440 * (i + 1) * t), 16000)
        paths.append(str(tmp_path / f"{i}.wav"))
    encoder = load_audio_encoder(directory)
    feats, frame_mask = audio_to_features(paths, n_mels=encoder.config.num_mel_bins)
    assert feats.shape == (2, 16, 30 + 2) and frame_mask.sum(-1).tolist() == [30, 15]
    hidden = encoder(feats, frame_mask)
    assert hidden.shape == (2, 8, 32) and torch.isfinite(hidden).all()  # 32 frames -> 16 conv -> 8 pooled
    assert encoder.output_lengths(frame_mask).tolist() == [7, 4]  # 30 -> 15 -> 7 and 15 -> 8 -> 4


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from tokenizers.trainers import WordPieceTrainer

    tok = Tokenizer(WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(["a dog barks", "two short beeps then a hum", "rain on a roof"] * 5,
                            WordPieceTrainer(vocab_size=60, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.mark.parametrize("architecture", ["BertModel", "BertForMaskedLM"])
def test_bert_checkpoint_and_tokenizer(architecture, tmp_path, tokenizer_json):
    import transformers

    torch.manual_seed(3)
    model = getattr(transformers, architecture)(transformers.BertConfig(**TEXT)).eval()
    model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    tok = load_tokenizer(tmp_path)
    input_ids, attention_mask = tokenize(tok, ["a dog barks", "two short beeps then a hum"])
    encoder = load_text_encoder(tmp_path)
    bert = model if architecture == "BertModel" else model.bert
    with torch.no_grad():
        expected = bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        torch.testing.assert_close(encoder(input_ids, attention_mask), expected, atol=1e-5, rtol=1e-5)
    assert (encoder.pooler is not None) == (architecture == "BertModel")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, tokenizer_json):
    """A BertModel save with its tokenizer.json and tokenizer_config.json: every file a loader reads."""
    import transformers

    torch.manual_seed(4)
    directory = tmp_path_factory.mktemp("bert")
    transformers.BertModel(transformers.BertConfig(**TEXT)).eval().save_pretrained(directory)
    (directory / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    (directory / "tokenizer_config.json").write_text('{"do_lower_case": true}')
    return directory


def cache_hub_model(cache, repo_id, directory, names=None):
    make_hub_cache(cache, repo_id, {name: directory / name for name in names or [p.name for p in directory.iterdir()]})


def test_checkpoint_without_a_tokenizer_is_a_user_error(bert_dir, tmp_path):
    for name in ["config.json", "model.safetensors"]:
        (tmp_path / name).write_bytes((bert_dir / name).read_bytes())
    with pytest.raises(CheckpointNotFound, match=f"^{tmp_path} has neither tokenizer.json nor vocab.txt") as error:
        load_tokenizer(tmp_path)
    assert isinstance(error.value, UserError) and isinstance(error.value, FileNotFoundError)

    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "truncated')
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'tokenizer.json'} is not a tokenizer.json the "
                                              "tokenizers library can read") as error:
        load_tokenizer(tmp_path)
    assert isinstance(error.value, ValueError) and error.value.__cause__ is None


def test_uncached_tokenizer_offline_says_how_to_get_it(bert_dir, tmp_path, monkeypatch):
    """Offline, a tokenizer.json missing from the cache may be on the hub: not 'ships no tokenizer'."""
    from huggingface_hub import constants

    cache_hub_model(tmp_path / "hub", "org/bert", bert_dir, ["config.json", "model.safetensors"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    load_text_encoder("org/bert")  # the weights are cached
    with pytest.raises(NotCached, match="^run `hf download org/bert tokenizer.json`.*tokenizer.json is missing from "
                                        ".*HF_HUB_OFFLINE=1 is set") as error:
        load_tokenizer("org/bert")
    assert isinstance(error.value, UserError)


def test_cached_hub_text_model_and_tokenizer_load_with_the_network_impossible(bert_dir, tmp_path, monkeypatch):
    """Online (HF_HUB_OFFLINE unset), everything cached: the loaders never probe the hub nor open a socket."""
    from huggingface_hub import constants

    cache_hub_model(tmp_path / "hub", "org/bert", bert_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    calls = online_without_network(monkeypatch)
    forbid_network(monkeypatch)
    encoder, tok = load_text_encoder("org/bert"), load_tokenizer("org/bert")
    input_ids, attention_mask = tokenize(tok, ["a dog barks"])
    assert encoder(input_ids, attention_mask).shape == (1, input_ids.shape[1], TEXT["hidden_size"])
    assert calls.downloads == [] and calls.connects == []
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(calls.cache_lookups)


def test_uncached_hub_model_with_the_hub_unreachable_fails_at_once(monkeypatch):
    import time

    calls = online_without_network(monkeypatch)
    started = time.perf_counter()
    for load in (load_audio_encoder, load_text_encoder, load_tokenizer):
        with pytest.raises(CheckpointNotFound, match="^run `hf download org/absent`.*cannot be reached"):
            load("org/absent")
    assert time.perf_counter() - started < 5
    assert calls.downloads == [] and len(calls.connects) == 1
