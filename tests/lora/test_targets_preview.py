"""--list-targets' preview: compact listing, counts, dead alternatives, siblings, non-Linear matches;
and the same dead alternatives as train-time warnings (check_target_alternatives)."""

import re

from torch import nn

from lora import LoRAConfig, inject_lora
from lora.targets import anchored, check_target_alternatives, compact_paths, format_preview, preview_targets
from tests.lora_fixtures import TinyNet, tiny_net, tiny_qwen2_audio_encoder

USERS_PATTERN = "audio_tower.*self_attn.(q|k|v|o)_proj"  # the user's own command, as typed


class WithAudioTower(nn.Module):
    """TinyNet under HF's top-level name, so the user's pattern reads as in a real run."""

    def __init__(self):
        super().__init__()
        self.audio_tower = TinyNet()


def test_compact_paths_folds_layer_indices_and_sibling_names():
    paths = ([f"audio_tower.layers.{i}.self_attn.{p}_proj" for i in range(32) for p in "qkv"]
             + ["head.0", "head.2", "x.fc1"])
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
    assert "did you mean '.*self_attn.(q|k|v|out)_proj'?" in text  # the same suggestion as at train time
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


def test_users_pattern_warns_that_o_proj_matches_nothing_and_names_out_proj():
    model = WithAudioTower()
    warnings = check_target_alternatives(model, [USERS_PATTERN])
    [finding] = warnings.findings
    assert (finding.pattern, finding.alternative, finding.nearest) == (USERS_PATTERN, "o_proj", ("out_proj",))
    assert finding.fixed_pattern == "audio_tower.*self_attn.(q|k|v|out)_proj"
    paths = [p for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert [p for p in paths if re.fullmatch(finding.fixed_pattern, p)] == [
        f"audio_tower.layers.{i}.self_attn.{name}_proj" for i in range(2) for name in ("q", "k", "v", "out")]
    assert warnings.message == (
        "warning: 'o_proj' (an alternative of 'audio_tower.*self_attn.(q|k|v|o)_proj') matches no module; "
        "beside the layers it matched is 'out_proj' (audio_tower.layers.{0..1}.self_attn.out_proj): "
        "did you mean 'audio_tower.*self_attn.(q|k|v|out)_proj'?")
    strict = warnings.format(strict=True)
    assert strict.startswith("error: 'o_proj'") and "--strict-targets" in strict.splitlines()[-1]


def test_the_warning_is_the_same_after_injection_and_backslashes_are_kept():
    pattern = r"audio_tower.*self_attn\.(q|k|v|o)_proj"
    model = WithAudioTower()
    inject_lora(model, LoRAConfig(pattern, r=2))  # lora_A / lora_B children must not count as names
    [finding] = check_target_alternatives(model, [pattern]).findings
    assert finding.fixed_pattern == r"audio_tower.*self_attn\.(q|k|v|out)_proj"


def test_patterns_whose_alternatives_all_match_give_no_warning():
    warnings = check_target_alternatives(WithAudioTower(),
                                         [r"audio_tower.*self_attn\.(q|k|v|out)_proj", "nothing_here"])
    assert not warnings and warnings.findings == [] and warnings.message == ""  # no match at all: inject_lora's error


def test_a_dead_alternative_away_from_the_matches_gets_the_nearest_unselected_name():
    model = WithAudioTower()
    [finding] = check_target_alternatives(model, [r"audio_tower.layers.\d+.(fc2|dense2)"]).findings
    assert finding.alternative == "dense2" and finding.nearest[0] == "dense"
    assert finding.fixed_pattern is None  # swapping in 'dense' would still not reach intermediate_query.dense
    assert ("the nearest Linear name in the model is 'dense' (audio_tower.layers.{0..1}.intermediate_query.dense)"
            in str(finding))
    [finding] = check_target_alternatives(model, [r".*\.(fc2|fc1)"]).findings  # fc2, the only close name, is selected
    assert finding.nearest == () and "no unselected Linear layer has a similar name" in finding.suggestion
