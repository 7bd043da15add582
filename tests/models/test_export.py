"""python -m models.export: the adapter merged into the base's own Hugging Face layout, loaded back with
transformers and compared with ours-with-adapter (<= 1e-4, fp32), for a Whisper base (single file), a
sharded Qwen2-Audio base (untouched shards byte-identical) and InstructBLIP; and the refusals."""

import filecmp
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import eval as evaluation
import train
from data.demo_models import ensure_demo_instructblip, ensure_demo_models
from data.demo_shapes import ensure_shapes_set
from data.demo_sounds import ensure_demo_set
from models import export
from models.audio_text import load_run
from models.checkpoint import INDEX, SINGLE

# conv2 frames the towers hold: a 4 s demo clip needs 201; transformers' encoders take exactly 2x as many
# log-mel frames
POSITIONS = 256
AUDIO = dict(num_mel_bins=16, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
             max_source_positions=POSITIONS)


@pytest.fixture(scope="module")
def sounds(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    sounds = ensure_demo_set(root / "sounds", n_train=16, n_eval=4, seed=0, verbose=False)
    return {"train": sounds["train"], **ensure_demo_models(root / "towers", sounds["captions"], seed=0, verbose=False)}


def train_audio_text(sounds, audio_model, out):
    """Three steps at a high learning rate: LoRA B far from zero, so a wrong merge cannot pass at 1e-4."""
    train.train(train.parse_args([
        "--audio-model", str(audio_model), "--text-model", sounds["text_model"], "--train-data", sounds["train"],
        "--output-dir", str(out), "--max-steps", "3", "--batch-size", "8", "--lr", "1e-2", "--warmup-steps", "0",
        "--workers", "0", "--eval-every", "0", "--save-every", "0",
    ]))
    return out


@pytest.fixture(scope="module")
def whisper_run(sounds, tmp_path_factory):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                           decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64, max_target_positions=16,
                           **AUDIO)
    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("whisper")
    WhisperForConditionalGeneration(config).eval().save_pretrained(base)
    (base / "preprocessor_config.json").write_text(json.dumps({"feature_size": 16}))  # side files come along
    return base, train_audio_text(sounds, base, tmp_path_factory.mktemp("whisper_run"))


@pytest.fixture(scope="module")
def qwen2_audio_run(sounds, tmp_path_factory):
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    config = Qwen2AudioConfig(audio_config=AUDIO, text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=64,
                                                                   num_hidden_layers=2, num_attention_heads=2,
                                                                   num_key_value_heads=1))
    torch.manual_seed(1)
    base = tmp_path_factory.mktemp("qwen2_audio")
    Qwen2AudioForConditionalGeneration(config).eval().save_pretrained(base, max_shard_size="30KB")
    return base, train_audio_text(sounds, base, tmp_path_factory.mktemp("qwen2_audio_run"))


def features(seed=0):
    return torch.randn(2, 16, 2 * POSITIONS, generator=torch.Generator().manual_seed(seed))


def ours_with_adapter(run, x, with_adapter=True):
    with torch.no_grad():
        return load_run(run, with_adapter=with_adapter).audio_tower(x)


def assert_kept(base, out, report, replaced_prefix):
    """Every shard not rewritten is byte-identical; in rewritten ones only the merged tensors changed."""
    weight_map = json.loads((base / INDEX).read_text())["weight_map"] if (base / INDEX).exists() else None
    shards = sorted(set(weight_map.values())) if weight_map else [SINGLE]
    assert sorted(report["rewritten"] + report["linked"] + report["copied"]) == shards
    for shard in shards:
        if shard not in report["rewritten"]:
            assert filecmp.cmp(base / shard, out / shard, shallow=False), shard
            continue
        before, after = load_file(str(base / shard)), load_file(str(out / shard))
        assert sorted(before) == sorted(after)
        for key in before:
            assert after[key].dtype == before[key].dtype and after[key].shape == before[key].shape
            changed = not torch.equal(before[key], after[key])
            assert changed == (key in report["replaced_keys"]), key
    assert report["replaced_keys"] and all(key.startswith(replaced_prefix) for key in report["replaced_keys"])


def test_whisper_export_loads_in_transformers_and_equals_ours_with_adapter(whisper_run, tmp_path):
    from transformers import WhisperForConditionalGeneration

    base, run = whisper_run
    out = tmp_path / "merged"
    record = export.main(["--checkpoint", str(run), "--out", str(out)])
    [report] = record["bases"]
    assert report["rewritten"] == [SINGLE] and len(report["replaced_keys"]) == 2 * 4  # q, k, v, out in 2 layers
    assert_kept(base, out, report, "model.encoder.layers.")
    assert ({"config.json", "generation_config.json", "preprocessor_config.json", "heads.safetensors", "README.md"}
            <= {p.name for p in out.iterdir()})
    exported = WhisperForConditionalGeneration.from_pretrained(out).eval()
    encoder = exported.get_encoder()
    norm, encoder.layer_norm = encoder.layer_norm, torch.nn.Identity()
    x = features()
    with torch.no_grad():  # Qwen2-Audio's tower = Whisper's layers, AvgPool1d(2, 2), then Whisper's final norm
        pre_norm = encoder(x).last_hidden_state
        theirs = norm(torch.nn.functional.avg_pool1d(pre_norm.transpose(1, 2), 2, 2).transpose(1, 2))
    ours = ours_with_adapter(run, x)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    # the adapter matters at this tolerance
    assert (ours - ours_with_adapter(run, x, with_adapter=False)).abs().max() > 1e-2


def test_sharded_qwen2_audio_export_rewrites_only_the_merged_shards(qwen2_audio_run, tmp_path):
    from transformers import Qwen2AudioForConditionalGeneration

    base, run = qwen2_audio_run
    out = tmp_path / "merged"
    record = export.export_run(run, out)
    [report] = record["bases"]
    weight_map = json.loads((base / INDEX).read_text())["weight_map"]
    prefix = "audio_tower." if "audio_tower.conv1.weight" in weight_map else "model.audio_tower."
    assert sorted(report["rewritten"]) == sorted({weight_map[key] for key in report["replaced_keys"]})
    assert len(report["linked"]) > 2 and len(report["rewritten"]) >= 2  # several shards of each kind
    assert any(all(not key.startswith(prefix) for key, s in weight_map.items() if s == shard)
               for shard in report["linked"])
    assert_kept(base, out, report, prefix + "layers.")
    assert filecmp.cmp(base / INDEX, out / INDEX, shallow=False)
    assert all((out / shard).stat().st_ino == (base / shard).stat().st_ino for shard in report["linked"])
    exported = Qwen2AudioForConditionalGeneration.from_pretrained(out).eval()
    tower = exported.model.audio_tower if hasattr(exported, "model") else exported.audio_tower
    x = features(1)
    with torch.no_grad():
        theirs = tower(x).last_hidden_state
    torch.testing.assert_close(theirs, ours_with_adapter(run, x), atol=1e-4, rtol=1e-4)
    assert torch.equal(load_file(str(out / "heads.safetensors"))["audio_proj.weight"],
                       load_file(str(run / "heads.safetensors"))["audio_proj.weight"])
    text = (out / "README.md").read_text()
    assert "rank 16, alpha 32" in text and "audio_tower.layers.{0..1}.self_attn.{k,out,q,v}_proj" in text
    assert record["heads_beside"] == ["audio_proj.bias", "audio_proj.weight", "logit_scale", "text_proj.bias",
                                      "text_proj.weight"]


def test_export_into_a_copy_without_links_and_refusals(qwen2_audio_run, tmp_path, capsys):
    base, run = qwen2_audio_run
    (tmp_path / "empty").mkdir()
    record = export.export_run(run, tmp_path / "empty", link=False)  # an empty folder is fine
    [report] = record["bases"]
    assert report["linked"] == [] and report["copied"]
    assert all((tmp_path / "empty" / s).stat().st_ino != (base / s).stat().st_ino for s in report["copied"])
    for target, reason in [(base, "is the base checkpoint"), (base / "inside", "is the base checkpoint"),
                           (run, "is the run directory"), (tmp_path / "empty", "not an empty folder")]:
        with pytest.raises(SystemExit) as exit_info:
            export.main(["--checkpoint", str(run), "--out", str(target)])
        assert exit_info.value.code == 2 and reason in capsys.readouterr().err
    assert not (base / "inside").exists()


def test_a_non_finite_merge_writes_nothing(qwen2_audio_run, tmp_path, capsys):
    _, run = qwen2_audio_run
    broken = tmp_path / "broken_run"
    shutil.copytree(run, broken)
    adapter = load_file(str(broken / "adapter_model.safetensors"))
    key = sorted(k for k in adapter if k.endswith("lora_B.weight"))[-1]
    adapter[key][0, 0] = float("inf")
    save_file(adapter, str(broken / "adapter_model.safetensors"))
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--checkpoint", str(broken), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and re.search("refusing to merge LoRA layer .*layers.1", capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken_run"]  # no export, no leftover staging folder


def test_instructblip_export_merges_the_qformer_and_the_trained_projection(tmp_path_factory, tmp_path):
    from transformers import InstructBlipForConditionalGeneration

    root = tmp_path_factory.mktemp("shapes")
    shapes = ensure_shapes_set(root / "set", n_train=16, n_eval=4, image_size=64, seed=0, verbose=False)
    base = ensure_demo_instructblip(root / "model", shapes["texts"], seed=0, verbose=False)
    run = tmp_path / "run"
    train.train(train.parse_args([
        "--task", "instructblip", "--model", base, "--train-data", shapes["train"], "--output-dir", str(run),
        "--max-steps", "3", "--batch-size", "8", "--lr", "1e-2", "--warmup-steps", "0", "--workers", "0",
        "--eval-every", "0", "--save-every", "0", "--train-also", "language_projection",
    ]))
    out = tmp_path / "merged"
    record = export.export_run(run, out)
    [report] = record["bases"]
    assert (record["heads_into_checkpoint"] == ["language_projection.bias", "language_projection.weight"]
            and record["heads_beside"] == [])
    assert len(record["merged_layers"]) == 12 and all(p.startswith("qformer.") for p in record["merged_layers"])
    assert_kept(Path(base), out, report, "")
    assert all(key.startswith(("qformer.", "language_projection.")) for key in report["replaced_keys"])
    assert (out / "qformer_tokenizer" / "tokenizer.json").is_file() and (out / "tokenizer.json").is_file()

    ours, _, _ = evaluation.load_checkpoint(run)
    exported = InstructBlipForConditionalGeneration.from_pretrained(out).eval()
    g = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(2, 3, 64, 64, generator=g)
    qformer_ids = torch.randint(5, exported.config.qformer_config.vocab_size, (2, 6), generator=g)
    qformer_mask = torch.ones(2, 6, dtype=torch.long)
    qformer_mask[1, 4:] = 0
    with torch.no_grad():
        features = exported.get_image_features(pixel_values=pixel_values, qformer_input_ids=qformer_ids,
                                               qformer_attention_mask=qformer_mask)
        theirs = features.pooler_output if hasattr(features, "pooler_output") else features[0]
        torch.testing.assert_close(theirs, ours.query_embeddings(pixel_values, qformer_ids, qformer_mask),
                                   atol=1e-4, rtol=1e-4)
