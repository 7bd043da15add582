"""--encoding-strategy of the audio-text task on a tiny Qwen2-Audio written by transformers in shards:
full_forward pools exactly transformers' hidden states at the audio positions and trains LoRA on the
language model; audio_tower never opens a language-model shard; LoRA where the forward never runs (LoRA on the
language model while the tower alone encodes) is caught by --diagnose check 7 and before training."""

import json

import pytest
import torch
import torch.nn.functional as F

import train
from tests.conftest import build_task, train_flags
from data.demo_models import write_text_tower
from data.demo_sounds import ensure_demo_set
from lora import lora_layers
from models import audio_to_features
from models import checkpoint as checkpoint_module
from models.audio_text import build_audio_text_model, full_forward_prompt_ids, load_run
from models.checkpoint import INDEX
from models.qwen2_audio import AUDIO, load_qwen2_audio_tokenizer
from tests.qwen2_audio_fixtures import save_tiny_qwen2_audio

LM_TARGETS = r"language_model.*self_attn\.(q|v)_proj"
TOWER_TARGETS = r"audio_tower.*self_attn\.(q|v)_proj"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("strategy")
    reference = save_tiny_qwen2_audio(root / "qwen2_audio")
    sounds = ensure_demo_set(root / "sounds", n_train=16, n_eval=8, seed=0, verbose=False)
    write_text_tower(root / "text_tower", (root / "sounds" / "captions.txt").read_text().splitlines(), seed=0)
    return dict(root=root, reference=reference, audio_model=str(root / "qwen2_audio"),
                text_model=str(root / "text_tower"), train=sounds["train"], eval=sounds["eval"])


def flags(tiny, out, *extra):
    return train_flags(tiny, out, *extra, batch_size=8, dropout=0, lr="3e-3", warmup_steps=1)

def clips(tiny):
    rows = [json.loads(line) for line in open(tiny["eval"])][:3]
    return [str(tiny["root"] / "sounds" / row["audio"]) for row in rows]


def test_full_forward_embedding_pools_transformers_hidden_states_at_the_audio_positions(tiny):
    model = build_audio_text_model(tiny["audio_model"], tiny["text_model"], embed_dim=16,
                                   encoding_strategy="full_forward").eval()
    assert model.encoding_strategy == "full_forward" and model.audio_proj.in_features == 32  # the LM's width
    paths = clips(tiny)
    features, frame_mask = audio_to_features(paths, n_mels=128)  # the batch's longest clip + 2 frames
    with torch.no_grad():
        pooled = model.pool_full_forward(features, frame_mask)
        embeds = model.encode_audio(features, frame_mask)

    # transformers: its processor's layout (30 s of features, the prompt then one <|AUDIO|> per output), written here
    tokenizer = load_qwen2_audio_tokenizer(tiny["audio_model"])
    audio_id = tokenizer.token_to_id(AUDIO)
    full, full_mask = audio_to_features(paths, n_mels=128, pad_to_30s=True)
    counts = [((n - 1) // 2 + 1 - 2) // 2 + 1 for n in full_mask.sum(1).tolist()]
    prefix = full_forward_prompt_ids(tokenizer)
    rows = [prefix + [audio_id] * n for n in counts]
    width = max(map(len, rows))
    input_ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    with torch.no_grad():
        hidden = tiny["reference"].model(input_ids=input_ids, attention_mask=attention_mask, input_features=full,
                                         feature_attention_mask=full_mask.long()).last_hidden_state  # (B, L, D)
    at_audio = (input_ids == audio_id)[:, :, None].float()
    expected = (hidden * at_audio).sum(1) / at_audio.sum(1)  # mean over each clip's audio positions
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embeds, F.normalize(model.audio_proj(expected), dim=-1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pooled[0], pooled[1], atol=1e-3)  # the clips are heard: their embeddings differ


def opened_shards(monkeypatch, source: str) -> list:
    """Every Checkpoint.open of `source` is recorded; returns the live list of those checkpoints."""
    opened, real_open = [], checkpoint_module.Checkpoint.open

    def spy(path, *args, **kwargs):
        checkpoint = real_open(path, *args, **kwargs)
        if str(path) == source:
            opened.append(checkpoint)
        return checkpoint

    monkeypatch.setattr(checkpoint_module.Checkpoint, "open", spy)
    return opened


def test_the_tower_strategy_never_opens_a_language_model_shard(tiny, monkeypatch, tmp_path):
    index = json.loads((tiny["root"] / "qwen2_audio" / INDEX).read_text())["weight_map"]
    audio_shards = {shard for key, shard in index.items() if key.startswith("audio_tower.")}
    language_shards = {shard for key, shard in index.items() if key.startswith("language_model.")} - audio_shards
    assert len(language_shards) >= 2, "the fixture must keep the language model in shards of its own"

    opened = opened_shards(monkeypatch, tiny["audio_model"])
    task, _ = build_task(train.parse_args(flags(tiny, tmp_path)))
    assert task.model.encoding_strategy == "audio_tower" and not hasattr(task.model, "language_model")
    files = {shard for checkpoint in opened for shard in checkpoint.opened_files}
    assert files == audio_shards and not files & language_shards

    opened.clear()  # the whole model, for contrast, reads them all
    build_task(train.parse_args(flags(tiny, tmp_path, "--encoding-strategy", "full_forward")))
    assert {shard for checkpoint in opened for shard in checkpoint.opened_files} >= language_shards


def test_diagnose_names_the_strategy_and_catches_lora_on_the_language_model(tiny, tmp_path, capsys):
    assert train.run_diagnosis(train.parse_args(flags(tiny, tmp_path, "--targets", LM_TARGETS, "--diagnose"))) == 1
    printed = capsys.readouterr().out
    assert "[FAIL] 1. LoRA layers are injected" in printed and "[FAIL] 7. LoRA sits where the forward runs" in printed
    assert "encoding strategy audio_tower: log-mel -> audio_tower" in printed
    assert (f"--targets '{LM_TARGETS}' selects 4 Linear layers in `language_model` "
            "(language_model.model.layers.{0..1}.self_attn.{q,v}_proj), which the audio_tower strategy "
            "never runs") in printed
    assert ("LoRA sits where the forward never runs" in printed
            and "fix: pass --encoding-strategy full_forward" in printed)

    # the tower's targets beside them: checks 1-6 pass on the tower's LoRA, 7 still fails on the language model's
    assert train.run_diagnosis(train.parse_args(flags(tiny, tmp_path, "--targets", TOWER_TARGETS,
                                                      "--targets", LM_TARGETS))) == 1
    printed = capsys.readouterr().out
    failed = [line for line in printed.splitlines() if "[FAIL]" in line]
    assert failed == ["  [FAIL] 7. LoRA sits where the forward runs"]

    # the fix: the whole model runs, LoRA on the language model gets its gradient
    assert train.run_diagnosis(train.parse_args(flags(tiny, tmp_path, "--targets", LM_TARGETS,
                                                      "--encoding-strategy", "full_forward"))) == 0
    printed = capsys.readouterr().out
    assert ("healthy" in printed
            and "encoding strategy full_forward: log-mel -> audio_tower -> multi_modal_projector" in printed)
    assert "4 LoRA layers: 4 in language_model" in printed

    with pytest.raises(train.TrainingError, match="LoRA sits where the forward never runs"):  # and before any training
        train.train(train.parse_args(flags(tiny, tmp_path / "run", "--targets", LM_TARGETS, "--max-steps", "1")))


def test_full_forward_trains_lora_on_the_language_model_and_load_run_rebuilds_it(tiny, tmp_path):
    out = tmp_path / "run"
    model, _ = train.train(train.parse_args(flags(tiny, out, "--targets", LM_TARGETS,
                                                  "--encoding-strategy", "full_forward",
                                                  "--max-steps", "3", "--save-every", "0")))
    layers = lora_layers(model)
    assert set(layers) == {f"language_model.model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"}
    assert all(layer.lora_B.weight.abs().sum() > 0 for layer in layers.values())  # trained: B left its zero init
    run = json.loads((out / "run_config.json").read_text())
    assert run["encoding_strategy"] == "full_forward" and run["language_model_dtype"] == "fp32"

    loaded = load_run(out)
    assert loaded.encoding_strategy == "full_forward"
    torch.testing.assert_close(loaded.embed_audio(clips(tiny)), model.embed_audio(clips(tiny)), atol=1e-5, rtol=0)
    assert not torch.allclose(load_run(out, with_adapter=False).embed_audio(clips(tiny)),
                              loaded.embed_audio(clips(tiny)), atol=1e-4)

    with pytest.raises(train.TrainingError, match="encoding_strategy: saved 'full_forward', now 'audio_tower'"):
        train.train(train.parse_args(flags(tiny, out, "--targets", TOWER_TARGETS, "--max-steps", "3", "--resume")))


def test_full_forward_needs_a_whole_qwen2_audio(tiny, tmp_path):
    from data.demo_models import write_audio_tower

    write_audio_tower(tmp_path / "tower", seed=0)  # a qwen2_audio config holding the tower alone
    args = flags(dict(tiny, audio_model=str(tmp_path / "tower")), tmp_path / "run",
                 "--encoding-strategy", "full_forward")
    with pytest.raises(train.TrainingError, match="--audio-model must be a whole Qwen2-Audio checkpoint"):
        build_task(train.parse_args(args))
