"""The BLIP-2 / InstructBLIP vision transformer (the `vision_model`): EVA-CLIP ViT-g, frozen.

Papers: Li et al. 2023, "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image
Encoders and Large Language Models" (ICML); Dai et al. 2023, "InstructBLIP: Towards
General-purpose Vision-Language Models with Instruction Tuning" (NeurIPS); the encoder is
EVA-CLIP's ViT-g/14 (Fang et al. 2023, "EVA: Exploring the Limits of Masked Visual Representation
Learning at Scale"). Ported by hand from transformers v5 `models/instructblip/modeling_instructblip.py`
(InstructBlipVisionEmbeddings, InstructBlipAttention, InstructBlipMLP, InstructBlipEncoderLayer,
InstructBlipVisionModel), itself converted from Salesforce LAVIS `eva_vit.py`.

    pixels (B, 3, 224, 224), normalised (models/image.py)
    -> patch_embedding: Conv2d 14x14, stride 14               (B, 256, D)   a 16 x 16 grid
    -> [class_embedding; patches] + position_embedding        (B, 257, D)
    -> num_hidden_layers x pre-LN block (attention, MLP)
    -> post_layernorm                                         (B, 257, D)   what the Q-Former reads

Quirks of the reference, copied on purpose:
- q, k and v come from one fused `qkv` Linear. EVA-CLIP trains a bias for q and for v but none
  for k; HF's conversion stored them as one `qkv.bias` = cat(q_bias, zeros, v_bias), a single
  Parameter of width 3D (there are no `q_bias`/`v_bias` keys in an HF checkpoint). The middle
  third is zero in every released checkpoint, and harmless if it were not: a key bias adds
  q . b_k to all the scores of one query, which softmax ignores.
- `post_layernorm` is applied to the whole sequence, and the composite model feeds exactly that
  (`vision_outputs[0]`, the normalised last hidden state) to the Q-Former: it is LAVIS's
  `ln_vision`. (HF's `pooler_output` applies post_layernorm a second time to the class token;
  nothing in InstructBLIP reads it, so it is left out.)
- The released configs have 39 layers: BLIP-2 drops EVA-CLIP's 40th and reads the penultimate
  layer's output, so "the last hidden state" here is not EVA-CLIP's.
- LayerNorm eps is 1e-6 by default (the config's `layer_norm_eps`), not torch's 1e-5.
- "gelu" is the exact erf GELU.
- HF slices the positional table to the sequence length, so an image smaller than `image_size`
  runs with positions from the wrong grid cells; we refuse any other size. HF's optional
  `interpolate_pos_encoding` (bicubic resize of the table) is left out: InstructBLIP does not use it.
"""

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.bert import ACTIVATIONS


def _square(name: str, value) -> int:
    """image_size / patch_size may be an int or [height, width]; this port handles squares only."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"vision_config.{name}={value!r}: only square sizes are supported")
        value = value[0]
    return int(value)


@dataclass(frozen=True)
class BlipVisionConfig:
    # Defaults are transformers' InstructBlipVisionConfig's: EVA-CLIP ViT-g/14, minus its last layer.
    hidden_size: int = 1408
    intermediate_size: int = 6144  # MLP width
    num_hidden_layers: int = 39  # EVA-CLIP has 40; BLIP-2 reads the penultimate layer
    num_attention_heads: int = 16  # head_dim = 1408 / 16 = 88
    image_size: int = 224  # pixels per side: the positional table is (image_size / patch_size)^2 + 1 rows
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0  # on the attention weights; 0.0 in the released configs
    qkv_bias: bool = True  # the fused qkv Linear has a bias (see the module docstring)

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2  # 16 x 16 = 256 for ViT-g/14 at 224 px

    @classmethod
    def from_hf(cls, cfg: dict) -> "BlipVisionConfig":
        """Read a config.json: InstructBLIP's (fields under `vision_config`) or a bare vision config;
        a missing field takes transformers' default."""
        model_type = cfg.get("model_type")
        if model_type == "instructblip":
            vision = cfg.get("vision_config") or {}
        elif model_type == "instructblip_vision_model":
            vision = cfg
        else:
            raise ValueError(
                f"config.json has model_type {model_type!r}; the BLIP vision model reads only 'instructblip' "
                "(fields under vision_config) or 'instructblip_vision_model'"
            )
        values = {f.name: vision[f.name] for f in fields(cls) if f.name in vision}
        for name in ("image_size", "patch_size"):
            if name in values:
                values[name] = _square(name, values[name])
        return cls(**values)


class BlipVisionEmbeddings(nn.Module):
    def __init__(self, cfg: BlipVisionConfig):
        super().__init__()
        D = cfg.hidden_size
        # Bare Parameters, not nn.Embedding: the checkpoint stores them as (1, 1, D) and (1, N + 1, D).
        self.class_embedding = nn.Parameter(torch.randn(1, 1, D))
        self.patch_embedding = nn.Conv2d(3, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.randn(1, cfg.num_patches + 1, D))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B = pixel_values.shape[0]
        # the reference casts pixels to the weights' dtype, so a bf16 tower takes fp32 pixels
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, g, g)
        patches = patches.flatten(2).transpose(1, 2)  # (B, D, g, g) -> (B, D, N) -> (B, N, D), row by row
        x = torch.cat([self.class_embedding.expand(B, 1, -1).to(patches.dtype), patches], dim=1)  # (B, 1 + N, D)
        return x + self.position_embedding.to(patches.dtype)


class BlipAttention(nn.Module):
    def __init__(self, cfg: BlipVisionConfig):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        # One Linear for q, k and v; its bias is cat(q_bias, 0, v_bias) (module docstring).
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.projection = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout = cfg.attention_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        # (B, T, 3D) -> (B, T, 3, H, D/H) -> (3, B, H, T, D/H): q, k, v are the Linear's three thirds
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # (B, H, T, D/H), scale (D/H)^-0.5
        return self.projection(y.transpose(1, 2).reshape(B, T, D))  # (B, H, T, D/H) -> (B, T, D)


class BlipEncoderLayer(nn.Module):
    def __init__(self, cfg: BlipVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = BlipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        # a ModuleDict only to reproduce the checkpoint's `mlp.fc1` / `mlp.fc2` nesting
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(cfg.hidden_size, cfg.intermediate_size),
                                      fc2=nn.Linear(cfg.intermediate_size, cfg.hidden_size)))
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        x = x + self.mlp.fc2(self.act(self.mlp.fc1(self.layer_norm2(x))))
        return x


class BlipVisionModel(nn.Module):
    """pixel_values (B, 3, image_size, image_size) -> image features (B, 1 + num_patches, hidden_size)."""

    def __init__(self, cfg: BlipVisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = BlipVisionEmbeddings(cfg)
        layers = nn.ModuleList(BlipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.encoder = nn.ModuleDict(dict(layers=layers))  # encoder.layers.{i}, as in the checkpoint
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.gradient_checkpointing = False  # train.py --grad-checkpointing (if LoRA reaches the ViT)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)}: this vision model takes (B, 3, {size}, {size}); "
                f"resize with models.image.preprocess_images(images, size={size})"
            )
        x = self.embeddings(pixel_values)  # (B, 1 + N, D)
        for layer in self.encoder.layers:
            # not `self.training`: a frozen tower runs in eval mode yet may carry the gradient to LoRA before it
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)  # recompute in backward: less memory
            else:
                x = layer(x)
        # normalised, as InstructBLIP feeds it to the Q-Former (LAVIS's ln_vision)
        return self.post_layernorm(x)
