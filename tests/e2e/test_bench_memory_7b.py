"""bench/memory_7b.py on shrunk models: the streaming checkpoint writer against the loaders (ours and
transformers'), the released configs' 7B shapes, one training step of each case on both sides, and a failed
measurement turned into a row instead of a crash. The benchmark's numbers themselves are not tested."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("memory_7b", ROOT / "bench" / "memory_7b.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory-7b")
    dirs = {}
    for kind in ("qwen2-audio", "instructblip", "bert"):
        dirs[kind] = str(root / kind)
        (root / kind).mkdir()
        bench.write_main(kind, root / kind, tiny=True, seed=0)
    return dirs


def test_released_configs_give_the_7b_shapes():
    qwen = bench.parameter_layout(bench.QWEN2_AUDIO_7B_INSTRUCT)
    blip = bench.parameter_layout(bench.INSTRUCTBLIP_VICUNA_7B)
    bench.check_config_expands(bench.QWEN2_AUDIO_7B_INSTRUCT, qwen)  # transformers reads the sparse config alike
    bench.check_config_expands(bench.INSTRUCTBLIP_VICUNA_7B, blip)
    count = lambda layout, prefix="": sum(math.prod(s) for k, s in layout.items() if k.startswith(prefix))  # noqa: E731
    assert 8.3e9 < count(qwen) < 8.5e9 and 0.62e9 < count(qwen, "audio_tower.") < 0.65e9
    assert qwen["language_model.lm_head.weight"] == (156032, 4096)
    assert 7.8e9 < count(blip) < 8.0e9 and blip["language_model.model.embed_tokens.weight"] == (32001, 4096)
    assert [len(s) > 0 for s in bench.shard_plan(qwen, bench.SHARD_BYTES)] == [True] * 5  # model-0000k-of-00005
    assert len(bench.shard_plan(blip, bench.SHARD_BYTES)) == 4
    first = bench.shard_plan(qwen, bench.SHARD_BYTES)[0]
    assert all(k in first for k in qwen if k.startswith("audio_tower."))  # the tower is read from one shard


def test_streamed_shards_hold_the_layout_and_the_seeded_values(tiny_dirs):
    directory = Path(tiny_dirs["qwen2-audio"])
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shards = sorted({name for name in index["weight_map"].values()})
    assert shards == [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    layout = bench.parameter_layout(bench.shrink(bench.QWEN2_AUDIO_7B_INSTRUCT))
    assert set(index["weight_map"]) == set(layout)
    assert index["metadata"]["total_size"] == sum(2 * math.prod(s) for s in layout.values())
    values = {}
    for name in shards:
        with safe_open(str(directory / name), framework="pt") as shard:
            values |= {key: shard.get_tensor(key) for key in shard.keys()}
    assert all(tuple(values[k].shape) == shape and values[k].dtype == torch.bfloat16 for k, shape in layout.items())
    assert torch.equal(values["language_model.model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))
    assert torch.equal(values["audio_tower.layers.0.self_attn_layer_norm.weight"], torch.ones(64, dtype=torch.bfloat16))
    assert not values["language_model.model.layers.0.self_attn.q_proj.bias"].any()
    std = values["language_model.model.embed_tokens.weight"].float().std().item()
    assert abs(std - bench.INIT_STD) < 1e-3
    # a key's values depend on (seed, key) alone, not on the shard it landed in
    key = "audio_tower.conv1.weight"
    assert torch.equal(torch.cat(list(bench.tensor_chunks(key, layout[key], 0))), values[key].flatten())
    assert not torch.equal(torch.cat(list(bench.tensor_chunks(key, layout[key], 1))), values[key].flatten())


def test_the_toolkit_loads_the_written_checkpoints_and_tokenizers(tiny_dirs):
    from models import load_audio_encoder, load_instructblip_tokenizers, load_qwen2_audio, load_qwen2_audio_tokenizer
    from models.qwen2_audio import CHAT_TOKENS

    model = load_qwen2_audio(tiny_dirs["qwen2-audio"], dtype=torch.bfloat16)
    assert model.config.audio_token_id == 151646 and model.language_model.config.vocab_size == 156032
    assert load_audio_encoder(tiny_dirs["qwen2-audio"]).config.d_model == 64
    tok = load_qwen2_audio_tokenizer(tiny_dirs["qwen2-audio"])
    assert {t: tok.token_to_id(t) for t in CHAT_TOKENS} == bench.QWEN_SPECIAL_IDS
    assert len(tok.encode(bench.ANSWER, add_special_tokens=False).ids) == 32
    qformer, lm = load_instructblip_tokenizers(tiny_dirs["instructblip"])
    assert lm.encode(bench.VQA_PROMPT).ids[0] == 2 and lm.token_to_id("[PAD]") == 32000  # Vicuna's </s> BOS


@pytest.mark.parametrize("case", ["a", "b", "c"])
def test_one_step_of_each_case_on_both_sides_puts_lora_on_the_same_layers(tiny_dirs, case):
    spec = dict(case=case, dirs=tiny_dirs, device="cpu", steps=1, warmup=0)
    ours, reference = bench.worker(spec | {"impl": "ours-bf16"}), bench.worker(spec | {"impl": "hf-bf16"})
    assert ours["lora_layers"] == reference["lora_layers"] > 0
    assert ours["trainable"] == reference["trainable"]
    assert all(math.isfinite(x) for x in ours["losses"] + reference["losses"])
    assert ours["load_peak"] > 0 and ours["train_peak"] > 0 and ours["step_s"] > 0  # peak is their max, by definition


def test_a_failed_measurement_is_a_result_not_a_crash(tmp_path):
    spec = dict(case="a", impl="ours-bf16", dirs={"qwen2-audio": str(tmp_path / "missing"), "bert": str(tmp_path)},
                device="cpu", steps=1, warmup=0)
    failed = bench.run_child(["--worker", json.dumps(spec)], budget=8 * bench.GIB, timeout=300)
    assert failed["error"].startswith("exit 1:")
    killed = bench.run_child(["--worker", json.dumps(spec)], budget=1 << 20, timeout=300)  # 1 MiB: killed at once
    assert killed["error"].startswith("killed by the watchdog")
