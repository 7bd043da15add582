"""models/blip_vision.py, models/qformer.py and models/image.py against transformers' InstructBLIP.

Reference: a tiny random `InstructBlipForConditionalGeneration` (ViT 32 wide, 2 layers, 32 px
images in 8 px patches; Q-Former 32 wide, 2 layers, cross-attention on layer 0 only; a 1-layer T5
that is never run), every parameter re-randomised, fp32, eval mode, eager attention (so the
reference does not share our SDPA kernel). Images: `BlipImageProcessorPil`, transformers' PIL
backend of the BLIP image processor.
"""

import re

import pytest
import torch
from PIL import Image

from models.blip_vision import BlipVisionConfig, BlipVisionModel
from models.checkpoint import load_into
from models.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, load_image, preprocess_images
from models.qformer import QFormerConfig, QFormerModel

import transformers  # the reference; a missing install must fail, never skip
from tests.conftest import randomize

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8)
QFORMER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               vocab_size=100, max_position_embeddings=64, cross_attention_frequency=2)
N_QUERIES = 4
N_IMAGE = (32 // 8) ** 2 + 1  # 16 patches + the class token
LENGTHS = [7, 4, 1]  # a padded instruction batch: every row but the first has pad tokens
TOL = dict(atol=1e-5, rtol=1e-5)


def submodule_state(reference, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in reference.state_dict().items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def reference():
    config = transformers.InstructBlipConfig(
        vision_config=VISION, qformer_config=QFORMER, num_query_tokens=N_QUERIES,
        text_config=transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                          num_heads=4).to_dict(),
    )
    torch.manual_seed(0)
    model = transformers.InstructBlipForConditionalGeneration._from_config(config, attn_implementation="eager")
    randomize(model, seed=1)
    return model.eval()


@pytest.fixture(scope="module")
def config_dict(reference):
    return reference.config.to_dict()  # what config.json of a saved checkpoint holds


def build_vision(reference, config_dict) -> BlipVisionModel:
    with torch.device("meta"):
        ours = BlipVisionModel(BlipVisionConfig.from_hf(config_dict))
    return load_into(ours, submodule_state(reference, "vision_model."), "test vision_model.").eval()


def build_qformer(reference, config_dict) -> QFormerModel:
    with torch.device("meta"):
        ours = QFormerModel(QFormerConfig.from_hf(config_dict))
    return load_into(ours, submodule_state(reference, "qformer."), "test qformer.").eval()


def pixels(seed: int = 2) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def qformer_inputs(seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    B, L = len(LENGTHS), max(LENGTHS)
    input_ids = torch.randint(1, QFORMER["vocab_size"], (B, L), generator=generator)
    attention_mask = (torch.arange(L)[None, :] < torch.tensor(LENGTHS)[:, None]).long()  # (B, L)
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)  # pad id 0
    query_embeds = torch.randn(B, N_QUERIES, QFORMER["hidden_size"], generator=generator)
    image_embeds = torch.randn(B, N_IMAGE, VISION["hidden_size"], generator=generator)
    image_attention_mask = (torch.arange(N_IMAGE)[None, :] < torch.tensor([[17], [9], [12]])).long()
    return input_ids, attention_mask, query_embeds, image_embeds, image_attention_mask


def run_reference_qformer(reference, input_ids, attention_mask, query_embeds, image_embeds, image_attention_mask):
    """HF's Q-Former takes the mask over queries + text, built as the composite model does."""
    full_mask = torch.cat([torch.ones(len(LENGTHS), N_QUERIES, dtype=torch.long), attention_mask], dim=1)
    return reference.qformer(input_ids=input_ids, attention_mask=full_mask, query_embeds=query_embeds,
                             encoder_hidden_states=image_embeds,
                             encoder_attention_mask=image_attention_mask).last_hidden_state


def weighted_sum(out: torch.Tensor, seed: int = 4) -> torch.Tensor:
    """A scalar whose gradient differs per output element (a plain sum hides permuted outputs)."""
    return (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))).sum()


# ---- vision --------------------------------------------------------------------------------


def test_vision_keys_and_shapes_equal_the_reference(reference):
    ours = BlipVisionModel(BlipVisionConfig(**VISION)).state_dict()
    ref = submodule_state(reference, "vision_model.")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}
    # one fused bias of width 3D (q, zero k, v): HF checkpoints hold no q_bias / v_bias
    assert ours["encoder.layers.0.self_attn.qkv.bias"].shape == (3 * VISION["hidden_size"],)
    assert not any("q_bias" in k or "v_bias" in k for k in ref)


def test_vision_forward_equals_the_reference(reference, config_dict):
    ours = build_vision(reference, config_dict)
    with torch.no_grad():
        out = ours(pixels())
        ref = reference.vision_model(pixel_values=pixels()).last_hidden_state
    assert out.shape == (2, N_IMAGE, VISION["hidden_size"])
    torch.testing.assert_close(out, ref, **TOL)


def test_vision_backward_equals_the_reference(reference, config_dict):
    ours = build_vision(reference, config_dict)
    ours_pixels, ref_pixels = pixels().requires_grad_(), pixels().requires_grad_()
    reference.zero_grad()
    weighted_sum(ours(ours_pixels)).backward()
    weighted_sum(reference.vision_model(pixel_values=ref_pixels).last_hidden_state).backward()
    assert torch.isfinite(ours_pixels.grad).all() and ours_pixels.grad.abs().sum() > 0
    torch.testing.assert_close(ours_pixels.grad, ref_pixels.grad, **TOL)
    ref_params = dict(reference.vision_model.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, **TOL, msg=lambda m: f"{name}: {m}")
    reference.zero_grad()


def test_the_key_bias_third_does_not_change_the_output(reference, config_dict):
    """The docstring's claim: the k part of qkv.bias (zero in checkpoints) only shifts every score
    of a query by the same q . b_k, which softmax ignores, while the q and v parts matter."""
    ours = build_vision(reference, config_dict)
    D = VISION["hidden_size"]
    with torch.no_grad():
        before = ours(pixels())
        bias = ours.encoder.layers[0].self_attn.qkv.bias
        bias[D:2 * D] = 0.0
        assert torch.allclose(ours(pixels()), before, atol=1e-5)
        bias[2 * D:] = 0.0
        assert not torch.allclose(ours(pixels()), before, atol=1e-3)


def test_vision_refuses_another_image_size(reference, config_dict):
    ours = build_vision(reference, config_dict)
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\).*preprocess_images"):
        ours(torch.zeros(1, 3, 24, 24))  # HF would silently use the first 10 positional rows


# ---- Q-Former ------------------------------------------------------------------------------


def test_qformer_keys_and_shapes_equal_the_reference(reference):
    ours = QFormerModel(QFormerConfig.from_hf(reference.config.to_dict()))
    state = ours.state_dict()
    ref = submodule_state(reference, "qformer.")
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in ref.items()}
    assert list(ours.buffers()) == []  # HF's position_ids is a non-persistent buffer; we have none
    # cross_attention_frequency 2: layer 0 reads the image, layer 1 does not; keys read the image width
    assert state["encoder.layer.0.crossattention.attention.key.weight"].shape == (32, VISION["hidden_size"])
    assert not any(k.startswith("encoder.layer.1.crossattention") for k in state)


@pytest.mark.parametrize("with_image_mask", [False, True])
def test_qformer_forward_equals_the_reference(reference, config_dict, with_image_mask):
    ours = build_qformer(reference, config_dict)
    input_ids, attention_mask, query_embeds, image_embeds, image_mask = qformer_inputs()
    image_mask = image_mask if with_image_mask else None
    with torch.no_grad():
        out = ours(query_embeds, input_ids, attention_mask, image_embeds, image_mask)
        ref = run_reference_qformer(reference, input_ids, attention_mask, query_embeds, image_embeds, image_mask)
    assert out.shape == (len(LENGTHS), N_QUERIES + max(LENGTHS), QFORMER["hidden_size"])
    torch.testing.assert_close(out[:, :N_QUERIES], ref[:, :N_QUERIES], **TOL)  # what the LM receives
    torch.testing.assert_close(out[:, N_QUERIES:], ref[:, N_QUERIES:], **TOL)  # pad rows included

    # every input must matter, or the comparison above proves little
    with torch.no_grad():
        other_text = ours(query_embeds, input_ids.roll(1, dims=1), attention_mask, image_embeds, image_mask)
        unmasked = ours(query_embeds, input_ids, None, image_embeds, image_mask)
        other_image = ours(query_embeds, input_ids, attention_mask, image_embeds.flip(0), image_mask)
    assert not torch.allclose(other_text[:, :N_QUERIES], out[:, :N_QUERIES], atol=1e-3), "queries read the text"
    assert not torch.allclose(unmasked[1, :N_QUERIES], out[1, :N_QUERIES], atol=1e-3), "the mask hides pad keys"
    assert not torch.allclose(other_image[:, :N_QUERIES], out[:, :N_QUERIES], atol=1e-3), "queries read the image"
    if with_image_mask:
        with torch.no_grad():
            image_unmasked = ours(query_embeds, input_ids, attention_mask, image_embeds, None)
        assert not torch.allclose(image_unmasked[1], out[1], atol=1e-3), "the image mask hides patches"


def test_qformer_backward_equals_the_reference(reference, config_dict):
    ours = build_qformer(reference, config_dict)
    input_ids, attention_mask, query_embeds, image_embeds, image_mask = qformer_inputs()
    ours_q, ref_q = query_embeds.clone().requires_grad_(), query_embeds.clone().requires_grad_()
    ours_img, ref_img = image_embeds.clone().requires_grad_(), image_embeds.clone().requires_grad_()
    reference.zero_grad()
    weighted_sum(ours(ours_q, input_ids, attention_mask, ours_img, image_mask)).backward()
    weighted_sum(run_reference_qformer(reference, input_ids, attention_mask, ref_q, ref_img, image_mask)).backward()
    assert torch.isfinite(ours_q.grad).all() and ours_q.grad.abs().sum() > 0
    torch.testing.assert_close(ours_q.grad, ref_q.grad, **TOL)
    torch.testing.assert_close(ours_img.grad, ref_img.grad, **TOL)
    ref_params = dict(reference.qformer.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, **TOL, msg=lambda m: f"{name}: {m}")
    reference.zero_grad()


def test_gradient_checkpointing_gives_the_same_gradients(reference, config_dict):
    grads = []
    for checkpointing in (False, True):
        ours = build_qformer(reference, {**config_dict, "qformer_config": {
            **config_dict["qformer_config"], "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}})
        ours.train().gradient_checkpointing = checkpointing
        input_ids, attention_mask, query_embeds, image_embeds, image_mask = qformer_inputs()
        weighted_sum(ours(query_embeds, input_ids, attention_mask, image_embeds, image_mask)).backward()
        grads.append(ours.encoder.layer[0].crossattention.attention.value.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], **TOL)


def test_vision_then_qformer_equal_the_composite_model(reference, config_dict):
    """The InstructBLIP path: ViT -> the normalised last hidden state -> Q-Former with the learned
    query tokens and the instruction (HF's get_image_features)."""
    vision, qformer = build_vision(reference, config_dict), build_qformer(reference, config_dict)
    input_ids, attention_mask = qformer_inputs()[:2]
    input_ids, attention_mask = input_ids[:2], attention_mask[:2]
    with torch.no_grad():
        ref = reference.get_image_features(pixel_values=pixels(), qformer_input_ids=input_ids,
                                           qformer_attention_mask=attention_mask)
        image_embeds = vision(pixels())
        query_embeds = reference.query_tokens.expand(2, -1, -1)  # (1, Q, D) -> (B, Q, D)
        out = qformer(query_embeds, input_ids, attention_mask, image_embeds)
    torch.testing.assert_close(image_embeds, ref.last_hidden_state, **TOL)
    torch.testing.assert_close(out, ref.qformer_outputs.last_hidden_state, **TOL)


def test_lora_target_patterns_select_the_attention_projections(reference, config_dict):
    """PEFT semantics: re.fullmatch on the dotted module path, here under the composite's `qformer.`."""
    ours = build_qformer(reference, config_dict)
    modules = {f"qformer.{name}": module for name, module in ours.named_modules() if name}
    selected = {name for name in modules if re.fullmatch(r"qformer.*\.(query|key|value)", name)}
    assert len(selected) == 3 * 2 + 3  # self-attention in both layers, cross-attention in layer 0
    assert all(isinstance(modules[name], torch.nn.Linear) for name in selected)
    assert "qformer.encoder.layer.0.crossattention.attention.key" in selected
    loose = {name for name in modules if re.fullmatch(r"qformer.*(query|key|value)", name)}
    assert {name for name in loose - selected} == {
        f"qformer.encoder.layer.{i}.{part}" for i in range(2) for part in ("intermediate_query", "output_query")}
    assert not any(isinstance(modules[name], torch.nn.Linear) for name in loose - selected)


# ---- configs -------------------------------------------------------------------------------


def test_configs_read_the_composite_and_bare_configs(reference, config_dict):
    vision = BlipVisionConfig.from_hf(config_dict)
    assert vision == BlipVisionConfig(**VISION, layer_norm_eps=1e-6, qkv_bias=True)
    assert BlipVisionConfig.from_hf(reference.config.vision_config.to_dict()) == vision
    assert BlipVisionConfig.from_hf({**config_dict["vision_config"], "image_size": [32, 32]}).image_size == 32
    qformer = QFormerConfig.from_hf(config_dict)
    assert qformer == QFormerConfig(**QFORMER, encoder_hidden_size=VISION["hidden_size"])
    # InstructBlipConfig sets encoder_hidden_size to the vision width, whatever qformer_config says
    stale = {**config_dict, "qformer_config": {**config_dict["qformer_config"], "encoder_hidden_size": 1408}}
    assert QFormerConfig.from_hf(stale).encoder_hidden_size == VISION["hidden_size"]
    assert QFormerConfig.from_hf(reference.config.qformer_config.to_dict()) == qformer


@pytest.mark.parametrize("model_type", ["blip-2", "bert", None])
def test_configs_refuse_other_model_types(config_dict, model_type):
    with pytest.raises(ValueError, match=f"model_type {model_type!r}.*'instructblip'"):
        BlipVisionConfig.from_hf({**config_dict, "model_type": model_type})
    with pytest.raises(ValueError, match=f"model_type {model_type!r}.*'instructblip'"):
        QFormerConfig.from_hf({**config_dict, "model_type": model_type})


def test_configs_refuse_what_the_port_cannot_compute(config_dict):
    with pytest.raises(ValueError, match="only square"):
        BlipVisionConfig.from_hf({**config_dict["vision_config"], "image_size": [32, 48]})
    with pytest.raises(ValueError, match="hidden_act 'silu'"):
        QFormerConfig.from_hf({**config_dict["qformer_config"], "hidden_act": "silu"})


# ---- images --------------------------------------------------------------------------------


def sample_images(seed: int = 5) -> list[Image.Image]:
    """Non-square, every mode the RGB conversion treats differently, shrunk and enlarged."""
    generator = torch.Generator().manual_seed(seed)

    def noise(h, w, c):
        return torch.randint(0, 256, (h, w, c), dtype=torch.uint8, generator=generator).numpy()

    rgb = Image.fromarray(noise(45, 70, 3))
    rgba = Image.fromarray(noise(50, 30, 4))  # random alpha: composited onto white
    grey = Image.fromarray(noise(20, 13, 1)[:, :, 0])  # mode L, smaller than the target
    palette = rgb.convert("P")
    palette.info["transparency"] = 0  # palette index 0 transparent
    return [rgb, rgba, grey, palette]


@pytest.mark.parametrize("size", [32, 48])
def test_preprocess_images_equals_blip_image_processor(size):
    images = sample_images()
    assert [image.mode for image in images] == ["RGB", "RGBA", "L", "P"]
    # transformers 5's BlipImageProcessor resizes with torchvision when it is installed; its PIL
    # backend is BlipImageProcessorPil. In transformers 4 BlipImageProcessor is the PIL one.
    processor_class = getattr(transformers, "BlipImageProcessorPil", transformers.BlipImageProcessor)
    processor = processor_class(size={"height": size, "width": size})
    ref = processor(images=images, return_tensors="pt").pixel_values
    assert tuple(processor.image_mean) == OPENAI_CLIP_MEAN and tuple(processor.image_std) == OPENAI_CLIP_STD
    out = preprocess_images(images, size)
    assert out.shape == (4, 3, size, size) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, **TOL)


def test_load_image_converts_and_names_bad_files(tmp_path):
    rgba = sample_images()[1]
    rgba.save(tmp_path / "a.png")
    loaded = load_image(tmp_path / "a.png")
    assert loaded.mode == "RGB" and loaded.size == rgba.size
    torch.testing.assert_close(preprocess_images([tmp_path / "a.png"], 32), preprocess_images([rgba], 32))
    with pytest.raises(FileNotFoundError, match="no image file at .*missing.jpg"):
        load_image(tmp_path / "missing.jpg")
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="broken.png"):
        preprocess_images([str(tmp_path / "broken.png")], 32)
    with pytest.raises(TypeError, match="paths or PIL images"):
        preprocess_images([torch.zeros(3, 8, 8)], 32)
