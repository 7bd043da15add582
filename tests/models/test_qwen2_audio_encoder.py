"""Parity of models/qwen2_audio_encoder.py with transformers' Qwen2-Audio and Whisper encoders.

References, all tiny and random (d_model 64, 2 layers, 4 heads), fp32, eval mode:
- `transformers.Qwen2AudioEncoder` on 30 s (3000-frame) inputs, its only accepted length;
- `Qwen2AudioForConditionalGeneration` with `feature_attention_mask`: the masked path that
  yields each clip's valid audio features, read at the multi-modal projector's input;
- `WhisperModel`'s encoder with its final norm moved after an AvgPool1d(2, 2), composed by hand.
"""

import pytest
import torch
import torch.nn as nn

from models.qwen2_audio_encoder import Qwen2AudioEncoder, Qwen2AudioEncoderConfig

import transformers  # the reference; a missing install must fail, never skip

TINY = dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
            num_mel_bins=128, max_source_positions=1500)
N_FRAMES = 2 * TINY["max_source_positions"]  # 3000: the reference's fixed input length
TOL = dict(atol=1e-5, rtol=1e-5)


def ours_from(state: dict, **overrides) -> Qwen2AudioEncoder:
    model = Qwen2AudioEncoder(Qwen2AudioEncoderConfig(**{**TINY, **overrides})).eval()
    model.load_state_dict(state, strict=True)
    return model


@pytest.fixture(scope="module")
def hf_encoder():
    torch.manual_seed(0)
    return transformers.Qwen2AudioEncoder(transformers.Qwen2AudioEncoderConfig(**TINY)).eval()


@pytest.fixture(scope="module")
def features():
    torch.manual_seed(1)
    return torch.randn(2, TINY["num_mel_bins"], N_FRAMES)


def test_state_dict_keys_and_shapes_equal_the_reference(hf_encoder):
    ours = Qwen2AudioEncoder(Qwen2AudioEncoderConfig(**TINY)).state_dict()
    ref = hf_encoder.state_dict()
    assert set(ours) == set(ref)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}
    assert "layers.0.self_attn.k_proj.bias" not in ours  # Whisper's key projection has no bias


def test_meta_build_then_assign_load_leaves_nothing_on_meta(hf_encoder, features):
    with torch.device("meta"):
        ours = Qwen2AudioEncoder(Qwen2AudioEncoderConfig(**TINY))
    ours.load_state_dict(hf_encoder.state_dict(), strict=True, assign=True)
    tensors = list(ours.parameters()) + list(ours.buffers())
    assert all(t.device.type == "cpu" for t in tensors)
    assert not ours.embed_positions.weight.requires_grad  # frozen, as in the reference
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(features), hf_encoder(features).last_hidden_state, **TOL)


def test_matches_reference_on_30s_input(hf_encoder, features):
    ours = ours_from(hf_encoder.state_dict())
    with torch.no_grad():
        out = ours(features)
        ref = hf_encoder(features).last_hidden_state
    assert out.shape == (2, N_FRAMES // 4, TINY["d_model"])
    torch.testing.assert_close(out, ref, **TOL)


def test_gradients_reach_every_attention_projection(hf_encoder, features):
    ours = ours_from(hf_encoder.state_dict()).train()
    frame_mask = torch.arange(800)[None, :] < torch.tensor([[800], [333]])
    ours(features[:, :, :800], frame_mask).square().mean().backward()
    for layer in ours.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.v_proj):
            assert proj.weight.grad is not None
            assert torch.isfinite(proj.weight.grad).all() and proj.weight.grad.abs().sum() > 0
    assert ours.embed_positions.weight.grad is None


# --- the masked path: clips shorter than 30 s -------------------------------------------------

LENGTHS = [1001, 640, 17]  # valid log-mel frames per clip; odd and even, conv and pool remainders


@pytest.fixture(scope="module")
def hf_composite():
    torch.manual_seed(2)
    config = transformers.Qwen2AudioConfig(
        audio_config=dict(TINY, model_type="qwen2_audio_encoder"),
        text_config=dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1),
        audio_token_index=63,
    )
    return transformers.Qwen2AudioForConditionalGeneration(config).eval()


def reference_valid_outputs(model, features, frame_mask):
    """Run the reference forward as the processor would feed it; return each clip's valid features.

    The audio features are read at the multi-modal projector's input (the tower's output) and
    cut to the reference's own `audio_output_lengths`, as its forward does after projecting.
    """
    _, out_lengths = model.model.audio_tower._get_feat_extract_output_lengths(frame_mask.sum(-1))
    n_tokens = int(out_lengths.max())
    # one run of audio placeholder tokens per clip, right-padded with token 0
    input_ids = torch.zeros(len(out_lengths), n_tokens, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, n in enumerate(out_lengths.tolist()):
        input_ids[b, :n] = model.config.audio_token_id
        attention_mask[b, :n] = 1
    captured = []
    hook = model.model.multi_modal_projector.register_forward_hook(
        lambda module, args, output: captured.append(args[0]))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, input_features=features,
                  feature_attention_mask=frame_mask.long())
    finally:
        hook.remove()
    (tower_out,) = captured
    return [tower_out[b, :n] for b, n in enumerate(out_lengths.tolist())], out_lengths


def padded_batch():
    """(B, n_mels, 3000) features of clips of LENGTHS frames and their (B, 3000) mask.

    The padding is random: it stands in for the reference's log-mel of silence, which is not zero.
    """
    torch.manual_seed(3)
    features = torch.randn(len(LENGTHS), TINY["num_mel_bins"], N_FRAMES)
    frame_mask = torch.arange(N_FRAMES)[None, :] < torch.tensor(LENGTHS)[:, None]
    return features, frame_mask


def ours_valid_outputs(ours, features, frame_mask, n_frames):
    with torch.no_grad():
        out = ours(features[:, :, :n_frames], frame_mask[:, :n_frames])
    lengths = ours.output_lengths(frame_mask[:, :n_frames])
    return [out[b, :n] for b, n in enumerate(lengths.tolist())]


def test_output_lengths_equal_the_reference_for_every_length(hf_encoder):
    n_valid = torch.arange(N_FRAMES + 1)
    frame_mask = torch.arange(N_FRAMES)[None, :] < n_valid[:, None]  # (3001, 3000)
    _, ref = hf_encoder._get_feat_extract_output_lengths(n_valid)
    ours = Qwen2AudioEncoder.output_lengths(frame_mask)
    assert ours.dtype == torch.long
    assert torch.equal(ours, ref)
    assert ours[N_FRAMES] == N_FRAMES // 4  # a full 30 s clip gives 750 outputs


def test_masked_path_matches_reference_when_two_frames_past_each_clip_are_kept(hf_composite):
    """Exact on every clip once frames L and L + 1 (the conv boundary) hold the reference's values.

    Covers the 30 s path (--pad-to-30s) and the shortest slice that still holds those frames.
    """
    features, frame_mask = padded_batch()
    ref, ref_lengths = reference_valid_outputs(hf_composite, features, frame_mask)
    ours = ours_from(hf_composite.model.audio_tower.state_dict())
    assert torch.equal(ours.output_lengths(frame_mask), ref_lengths)
    for n_frames in (N_FRAMES, max(LENGTHS) + 2):
        for b, (o, r) in enumerate(zip(ours_valid_outputs(ours, features, frame_mask, n_frames), ref)):
            torch.testing.assert_close(o, r, **TOL, msg=f"clip {b}, {n_frames} frames")


def test_masked_path_cut_at_the_longest_clip_differs_only_for_that_clip(hf_composite):
    """Cut at exactly max(L) frames, the longest clip's last conv frame reads the convolutions' zero
    padding where the reference reads its padded features, and attention spreads the difference
    to all of that clip's outputs. Shorter clips keep their frames L and L + 1 and stay exact."""
    features, frame_mask = padded_batch()
    ref, _ = reference_valid_outputs(hf_composite, features, frame_mask)
    ours = ours_from(hf_composite.model.audio_tower.state_dict())
    out = ours_valid_outputs(ours, features, frame_mask, max(LENGTHS))
    longest = LENGTHS.index(max(LENGTHS))
    for b in range(len(LENGTHS)):
        if b != longest:
            torch.testing.assert_close(out[b], ref[b], **TOL)
    assert not torch.allclose(out[longest], ref[longest], **TOL)


# --- Whisper weights as the audio tower -------------------------------------------------------

def test_whisper_encoder_weights_load_as_the_tower_and_pool_before_the_final_norm():
    """Whisper's `encoder.*` (`model.encoder.*` in a WhisperForConditionalGeneration checkpoint)
    loads with its prefix stripped. The reference is WhisperEncoder's own forward with its final
    `layer_norm` swapped for Identity, then AvgPool1d(2, 2), then that `layer_norm`."""
    torch.manual_seed(4)
    config = transformers.WhisperConfig(
        **{**TINY, "num_mel_bins": 80}, decoder_layers=1, decoder_attention_heads=4,
        decoder_ffn_dim=128, vocab_size=64, max_target_positions=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3,
    )
    whisper = transformers.WhisperModel(config).eval()
    encoder_state = {k.removeprefix("encoder."): v for k, v in whisper.state_dict().items()
                     if k.startswith("encoder.")}
    ours = ours_from(encoder_state, num_mel_bins=80)
    assert Qwen2AudioEncoderConfig.from_hf(config.to_dict()) == ours.config

    features = torch.randn(2, 80, N_FRAMES)
    encoder = whisper.encoder
    final_norm, encoder.layer_norm = encoder.layer_norm, nn.Identity()
    with torch.no_grad():
        pre_norm = encoder(features).last_hidden_state  # (B, 1500, D)
        ref = final_norm(nn.functional.avg_pool1d(pre_norm.transpose(1, 2), 2, 2).transpose(1, 2))
        out = ours(features)
    torch.testing.assert_close(out, ref, **TOL)


# --- config.json ------------------------------------------------------------------------------

def fields_of(hf_config) -> Qwen2AudioEncoderConfig:
    return Qwen2AudioEncoderConfig(**{k: getattr(hf_config, k) for k in TINY})


def test_from_hf_reads_qwen2_audio_encoder_and_whisper_configs():
    small = dict(TINY, d_model=96, encoder_layers=3, encoder_attention_heads=6, num_mel_bins=80)
    full = transformers.Qwen2AudioConfig(audio_config=dict(small, model_type="qwen2_audio_encoder"))
    assert Qwen2AudioEncoderConfig.from_hf(full.to_dict()) == fields_of(full.audio_config)

    bare = transformers.Qwen2AudioEncoderConfig(**small)
    assert Qwen2AudioEncoderConfig.from_hf(bare.to_dict()) == fields_of(bare)

    whisper = transformers.WhisperConfig(**small)
    assert Qwen2AudioEncoderConfig.from_hf(whisper.to_dict()) == fields_of(whisper)


def test_from_hf_fills_a_sparse_audio_config_with_the_references_defaults():
    sparse = {"model_type": "qwen2_audio", "audio_config": {"model_type": "qwen2_audio_encoder"}}
    reference = transformers.Qwen2AudioConfig.from_dict(sparse).audio_config
    assert Qwen2AudioEncoderConfig.from_hf(sparse) == fields_of(reference)


def test_from_hf_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"'bert'.*qwen2_audio.*whisper"):
        Qwen2AudioEncoderConfig.from_hf({"model_type": "bert"})
    whisper = transformers.WhisperConfig().to_dict()
    del whisper["encoder_ffn_dim"]
    with pytest.raises(ValueError, match="encoder_ffn_dim"):
        Qwen2AudioEncoderConfig.from_hf(whisper)
    with pytest.raises(ValueError, match="relu"):
        Qwen2AudioEncoderConfig.from_hf({"model_type": "qwen2_audio_encoder", "activation_function": "relu"})


def test_too_many_frames_is_an_error_that_says_how_many_fit(hf_encoder):
    ours = ours_from(hf_encoder.state_dict())
    with pytest.raises(ValueError, match="at most 3000 frames"):
        ours(torch.zeros(1, TINY["num_mel_bins"], N_FRAMES + 2))
