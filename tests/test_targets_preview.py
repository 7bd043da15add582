"""--list-targets' preview: compact listing, counts, dead alternatives, siblings, non-Linear matches."""

from lora.targets import anchored, compact_paths, format_preview, preview_targets
from tests.lora_fixtures import tiny_net, tiny_qwen2_audio_encoder


def test_compact_paths_folds_layer_indices_and_sibling_names():
    paths = [f"audio_tower.layers.{i}.self_attn.{p}_proj" for i in range(32) for p in "qkv"] + ["head.0", "head.2", "x.fc1"]
    assert compact_paths(paths) == ["audio_tower.layers.{0..31}.self_attn.{k,q,v}_proj", "head.{0,2}", "x.fc1"]


def test_users_pattern_on_the_audio_encoder_explains_o_proj():
    model, _ = tiny_qwen2_audio_encoder()
    preview = preview_targets(model, [r".*self_attn.(q|k|v|o)_proj"], r=4)
    assert preview.ok and len(preview.matched) == 6
    d = model.config.d_model
    assert preview.lora_params == 6 * 4 * (d + d)
    text = format_preview(preview, [r".*self_attn.(q|k|v|o)_proj"])
    assert "layers.{0..1}.self_attn.{k,q,v}_proj" in text
    assert "'o_proj' (an alternative of" in text and "exists nowhere" in text
    assert "layers.{0..1}.self_attn.out_proj" in text.split("left out by the targets")[1]
    assert f"{6 * 4 * 2 * d * 16 / 2**20:.1f} MiB" in text


def test_pattern_hitting_a_non_linear_module_names_it_and_suggests_the_anchored_pattern():
    preview = preview_targets(tiny_net(0), [".*(query|key|value)"], r=2)
    assert not preview.ok
    assert preview.not_linear == {f"layers.{i}.intermediate_query": "QueryFeedForward" for i in range(2)}
    text = format_preview(preview, [".*(query|key|value)"])
    assert "layers.0.intermediate_query matches but is a QueryFeedForward" in text
    assert r"try '.*\.(query|key|value)'" in text
    assert anchored("qformer.*(query|key|value)") == r"qformer.*\.(query|key|value)"


def test_pattern_matching_nothing_is_an_error_line():
    preview = preview_targets(tiny_net(0), ["nothing_here"], r=2)
    assert not preview.ok and "error: 'nothing_here' matches no module" in format_preview(preview, ["nothing_here"])
