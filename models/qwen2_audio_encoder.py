"""Qwen2-Audio's audio encoder (the `audio_tower`): the Whisper encoder with a pooling step.

Papers: Chu et al. 2024, "Qwen2-Audio Technical Report" (arXiv 2407.10759), whose audio encoder
is initialised from the encoder of Radford et al. 2022, "Robust Speech Recognition via
Large-Scale Weak Supervision" (Whisper large-v3). Ported by hand from transformers
`Qwen2AudioEncoder` (models/qwen2_audio/modeling_qwen2_audio.py), itself a copy of
`WhisperEncoder` (models/whisper/modeling_whisper.py); laid out after openai/whisper `model.py`.

    log-mel (B, n_mels, T)                      T <= 3000 frames of 10 ms
    -> conv1 (k3) + GELU -> conv2 (k3, stride 2) + GELU   (B, T', D)   T' = (T - 1) // 2 + 1
    -> + embed_positions[:T'] -> encoder_layers x pre-LN block (attention, MLP)
    -> avg_pooler (2, 2) -> layer_norm                    (B, T' // 2, D), one frame per 40 ms

Quirks of the reference, copied on purpose:
- `k_proj` has no bias; q, v and out do (Whisper's layout, and the checkpoint's keys).
- q is multiplied by head_dim ** -0.5 *before* q @ k^T and the attention call uses scale 1,
  which rounds differently from SDPA's own scaling; we keep the reference's order.
- The pooling sits between the last block and the final `layer_norm`. A Whisper encoder has
  the same keys and no pooler, with its `layer_norm` right after the last block, so Whisper
  weights loaded here compute Whisper's pre-norm states, pooled, then Whisper's norm.
- `embed_positions` is a frozen nn.Embedding whose table is *saved in the checkpoint* and loaded
  from it (Qwen2-Audio never recomputes it); we initialise it with Whisper's sinusoids only so
  that a randomly initialised tower is sensible.
- The reference forward ignores `scale_embedding` (it computes `embed_scale` but never uses it);
  LayerNorm eps is torch's default 1e-5 (not in the config); dropout and layerdrop are 0.0 in
  the released configs and are left out (LoRA brings its own dropout).
- The reference encoder demands exactly 3000 frames. We accept T <= 3000: the positional table
  is sliced to T', and `frame_mask` masks padded frames as attention keys, exactly as
  Qwen2AudioModel does with `feature_attention_mask` (lengths from the mask's row sums only,
  so valid frames must come first).

The boundary of a short clip. With L valid frames, the last valid conv2 frame reads input
frames up to L + 1 (two 3-tap convolutions, the second with stride 2), and attention carries
that frame into every valid output. The reference reads those frames from its 30 s padded
log-mel (the log-mel of silence, not zeros). So our valid outputs equal the reference's
exactly when frames L and L + 1 of every clip hold the same values: pass at least
min(max(L) + 2, 3000) frames of the same padded features. Cut at exactly max(L), the longest
clip's last conv frame reads the convolutions' zero padding instead, and all its outputs differ
slightly (tests/models/test_qwen2_audio_encoder.py shows both). Zero-valued features do not rescue
that: conv2 pads with zeros *after* conv1 + GELU, where the reference has gelu(conv1 bias) != 0.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

FP16_CLAMP = torch.finfo(torch.float16).max - 1000  # the reference's guard against fp16 inf


@dataclass(frozen=True)
class Qwen2AudioEncoderConfig:
    # Defaults are Qwen2-Audio-7B's, which HF also fills in for fields a config.json leaves out.
    num_mel_bins: int = 128  # conv1 input channels: 128 for Qwen2-Audio / Whisper large-v3, else 80
    d_model: int = 1280  # width of every frame vector
    encoder_layers: int = 32  # pre-LN transformer blocks
    encoder_attention_heads: int = 20  # head_dim = d_model / heads = 64
    encoder_ffn_dim: int = 5120  # MLP hidden width, 4 * d_model
    max_source_positions: int = 1500  # positional rows = conv2 frames of a 30 s clip (3000 // 2)

    @classmethod
    def from_hf(cls, cfg: dict) -> "Qwen2AudioEncoderConfig":
        """Read a config.json: Qwen2-Audio (`audio_config`), a bare encoder, or Whisper."""
        model_type = cfg.get("model_type")
        names = [f.name for f in fields(cls)]
        if model_type in ("qwen2_audio", "qwen2_audio_encoder"):
            audio = (cfg.get("audio_config") or {}) if model_type == "qwen2_audio" else cfg
            values = {name: audio[name] for name in names if name in audio}  # HF's defaults otherwise
        elif model_type == "whisper":
            # WhisperConfig's defaults describe whisper-tiny, not us: every field must be present.
            audio = cfg
            missing = [name for name in names if name not in cfg]
            if missing:
                raise ValueError(f"Whisper config.json lacks encoder field(s) {missing}")
            values = {name: cfg[name] for name in names}
        else:
            raise ValueError(
                f"config.json has model_type {model_type!r}; the audio tower reads only "
                "'qwen2_audio' (fields under audio_config), 'qwen2_audio_encoder' or 'whisper'"
            )
        # conv1/conv2 use GELU unconditionally in the reference; only the MLP reads this field.
        activation = audio.get("activation_function", "gelu")
        if activation != "gelu":
            raise ValueError(f"activation_function {activation!r} is not supported: only 'gelu'")
        return cls(**values)


def sinusoids(length: int, channels: int, max_timescale: float = 10000) -> torch.Tensor:
    """Whisper's positional table (openai/whisper model.py): sin on the first half, cos on the second."""
    log_timescale_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2))
    scaled_time = torch.arange(length)[:, None] * inv_timescales[None, :]  # (length, channels / 2)
    return torch.cat([scaled_time.sin(), scaled_time.cos()], dim=1)  # (length, channels)


def min_valid_frames(output_lengths) -> int:
    """The fewest valid log-mel frames for which `output_lengths` (a tower's) gives one output. For
    the Qwen2-Audio tower, V frames give ((V - 1) // 2 + 1 - 2) // 2 + 1 outputs (stride-2 conv,
    then the pool keeps whole pairs): 0 for V <= 2, so a clip needs V >= 3 (over 20 ms); with
    none, its pooled embedding would be a silent zero vector."""
    frames = 1
    while output_lengths(torch.ones(1, frames, dtype=torch.bool)).item() < 1:
        frames += 1
    return frames


def conv_output_lengths(n_frames: torch.Tensor) -> torch.Tensor:
    """Valid conv2 frames for n_frames valid log-mel frames (kernel 3, stride 2, padding 1)."""
    return (n_frames - 1) // 2 + 1


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        # No bias on the key: it would add q . b_k, one constant per query, to every score,
        # and softmax ignores such constants. Whisper drops it, so the checkpoint has none.
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x.shape
        head_dim = D // self.n_heads
        # (B, T, D) -> (B, T, H, D/H) -> (B, H, T, D/H)
        q = (self.q_proj(x) * head_dim**-0.5).view(B, T, self.n_heads, head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_heads, head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_heads, head_dim).transpose(1, 2)
        # scale=1.0: q is already scaled, in the reference's order (see the module docstring).
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=1.0)
        # (B, H, T, D/H) -> (B, T, H, D/H) -> (B, T, D)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, D))


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ffn_dim: int):
        super().__init__()
        self.self_attn = SelfAttention(d_model, n_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), key_mask)
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:  # the reference clamps fp16 residuals; copied for parity
            x = x.clamp(-FP16_CLAMP, FP16_CLAMP)
        return x


class Qwen2AudioEncoder(nn.Module):
    """Log-mel (B, n_mels, T) -> hidden (B, T_out, d_model); see the module docstring."""

    def __init__(self, config: Qwen2AudioEncoderConfig):
        super().__init__()
        self.config = config
        d_model = config.d_model
        self.conv1 = nn.Conv1d(config.num_mel_bins, d_model, kernel_size=3, padding=1)
        # stride 2 halves time: 3000 frames of 10 ms -> 1500 of 20 ms = max_source_positions
        self.conv2 = nn.Conv1d(d_model, d_model, kernel_size=3, stride=2, padding=1)
        # A Parameter, not a buffer, because the checkpoint stores it; frozen as in the reference.
        self.embed_positions = nn.Embedding(config.max_source_positions, d_model)
        self.embed_positions.weight.requires_grad_(False)
        with torch.no_grad():  # under torch.device("meta") this is computed on meta: no cost
            self.embed_positions.weight.copy_(sinusoids(config.max_source_positions, d_model))
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, config.encoder_attention_heads, config.encoder_ffn_dim)
            for _ in range(config.encoder_layers)
        )
        self.avg_pooler = nn.AvgPool1d(2, stride=2)  # no weights: absent from the checkpoint
        self.layer_norm = nn.LayerNorm(d_model)
        self.gradient_checkpointing = False  # train.py --grad-checkpointing

    @staticmethod
    def output_lengths(frame_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) mask of valid log-mel frames -> (B,) long: how many outputs of each row are valid.

        Exactly the reference's `_get_feat_extract_output_lengths`: (L - 1) // 2 + 1 after
        conv2, then (L' - 2) // 2 + 1 = L' // 2 after the pool, which keeps only pairs of valid
        conv frames. Only the first output_lengths[b] outputs of row b are meaningful.
        """
        return (conv_output_lengths(frame_mask.long().sum(-1)) - 2) // 2 + 1

    def min_valid_frames(self) -> int:
        """The fewest valid log-mel frames that give one output (3: see output_lengths)."""
        return min_valid_frames(self.output_lengths)

    def forward(self, input_features: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_features (B, n_mels, T), frame_mask (B, T) bool or None -> (B, T_out, d_model).

        T_out = ((T - 1) // 2 + 1) // 2; with a mask, row b is valid up to output_lengths[b].
        """
        # the reference casts features to the weights' dtype, so a bf16 tower takes fp32 features
        x = input_features.to(self.conv1.weight.dtype)
        x = F.gelu(self.conv1(x))  # (B, n_mels, T) -> (B, D, T)
        x = F.gelu(self.conv2(x))  # (B, D, T) -> (B, D, T'),  T' = (T - 1) // 2 + 1
        x = x.permute(0, 2, 1)  # (B, D, T') -> (B, T', D)
        n_positions = x.shape[1]
        if n_positions > self.config.max_source_positions:
            raise ValueError(
                f"{input_features.shape[-1]} log-mel frames give {n_positions} positions, more than "
                f"the {self.config.max_source_positions} the positional table holds "
                f"(at most {2 * self.config.max_source_positions} frames, 30 s): cut the clip"
            )
        x = x + self.embed_positions.weight[:n_positions]  # (B, T', D) + (T', D)

        key_mask = None
        if frame_mask is not None:
            valid = conv_output_lengths(frame_mask.long().sum(-1))  # (B,) as the reference
            positions = torch.arange(n_positions, device=x.device)
            # (B, T') -> (B, 1, 1, T'): one row per clip, broadcast over heads and queries;
            # True = may be attended to. Padded queries still run; their outputs are ignored.
            key_mask = (positions[None, :] < valid[:, None])[:, None, None, :]

        for layer in self.layers:
            # not `self.training`: a frozen tower runs in eval mode yet may carry the gradient to LoRA before it
            if self.gradient_checkpointing and torch.is_grad_enabled():
                # keep only each block's input; recompute its insides in backward (less memory, ~1/3 more compute)
                x = checkpoint(layer, x, key_mask, use_reentrant=False)
            else:
                x = layer(x, key_mask)

        # (B, T', D) -> (B, D, T') -> (B, D, T' // 2) -> (B, T' // 2, D)
        x = self.avg_pooler(x.permute(0, 2, 1)).permute(0, 2, 1)
        return self.layer_norm(x)
