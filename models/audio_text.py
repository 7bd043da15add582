"""The audio-text dual encoder trained with a symmetric contrastive loss (CLAP-style).

Papers: Radford et al. 2021 (CLIP) for the symmetric InfoNCE with a learnable temperature;
Elizalde et al. 2023 and Wu et al. 2023 (CLAP, LAION-CLAP) for its audio-text form. The towers
are this repository's ports (models/qwen2_audio_encoder.py, models/bert.py); the heads are new.

    log-mel (B, n_mels, T), frame_mask (B, T)
      -> audio_tower (Qwen2-Audio encoder, LoRA on its attention)   (B, T_out, D_audio)
      -> mean over the valid output frames only                     (B, D_audio)
      -> audio_proj -> L2 normalise                                 (B, E)
    token ids (B, L), attention_mask (B, L)
      -> text_tower (BERT) -> mean over real tokens -> text_proj -> L2 normalise   (B, E)
    logits = exp(logit_scale) * audio @ text.T                      (B, B)
    loss = (cross-entropy over texts + cross-entropy over clips) / 2

The children are named `audio_tower`, `text_tower`, `audio_proj`, `text_proj`, `logit_scale`,
so a target such as 'audio_tower.*self_attn.(q|k|v|o)_proj' selects the audio attention.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lora.atomic import atomic_write
from models.bert import mean_pool
from models.loading import load_audio_encoder, load_text_encoder

INIT_TEMPERATURE = 0.07  # CLIP's initial softmax temperature
MAX_LOGIT_SCALE = math.log(100)  # CLIP/CLAP cap the scale at 100 so the logits cannot explode


@dataclass
class ContrastiveOutput:
    loss: torch.Tensor  # scalar
    logits: torch.Tensor  # (B, B): clip i against caption j, temperature applied
    audio_embeds: torch.Tensor  # (B, E), unit length
    text_embeds: torch.Tensor  # (B, E), unit length


def pool_valid_frames(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean of each row's first lengths[b] frames, (B, T, D) -> (B, D); padded frames never count."""
    valid = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]  # (B, T)
    return mean_pool(hidden, valid)


def contrastive_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, B) target distribution: caption j is a positive for clip i when it is clip i's caption
    or the very same text. Identical captions of different clips (common in small caption sets)
    would otherwise be pushed apart as negatives."""
    ids = input_ids * attention_mask  # pad positions compare equal whatever the pad id
    same = (ids[:, None, :] == ids[None, :, :]).all(-1) & (attention_mask.sum(-1)[:, None] == attention_mask.sum(-1)[None, :])
    return same.float() / same.float().sum(-1, keepdim=True)


class AudioTextModel(nn.Module):
    def __init__(self, audio_tower: nn.Module, text_tower: nn.Module, embed_dim: int = 256):
        super().__init__()
        self.audio_tower = audio_tower
        self.text_tower = text_tower
        self.audio_proj = nn.Linear(audio_tower.config.d_model, embed_dim)
        self.text_proj = nn.Linear(text_tower.config.hidden_size, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / INIT_TEMPERATURE)))

    def encode_audio(self, features: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, T) log-mel and (B, T) frame mask -> (B, E) unit-length audio embeddings."""
        hidden = self.audio_tower(features, frame_mask)  # (B, T_out, D_audio)
        lengths = self.audio_tower.output_lengths(frame_mask)  # (B,) valid outputs per clip
        pooled = pool_valid_frames(hidden, lengths)  # (B, D_audio)
        return F.normalize(self.audio_proj(pooled.to(self.audio_proj.weight.dtype)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids and mask -> (B, E) unit-length text embeddings."""
        hidden = self.text_tower(input_ids, attention_mask)  # (B, L, D_text)
        pooled = mean_pool(hidden, attention_mask)  # (B, D_text)
        return F.normalize(self.text_proj(pooled.to(self.text_proj.weight.dtype)), dim=-1)

    def forward(self, features, frame_mask, input_ids, attention_mask) -> ContrastiveOutput:
        audio = self.encode_audio(features, frame_mask)  # (B, E)
        text = self.encode_text(input_ids, attention_mask)  # (B, E)
        # Clamped in the forward, so a scale at the cap gets no gradient pushing it further.
        scale = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        logits = scale * audio.float() @ text.float().T  # (B, B), fp32 even under autocast
        targets = contrastive_targets(input_ids, attention_mask)  # (B, B)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T)) / 2
        return ContrastiveOutput(loss, logits, audio, text)


def build_audio_text_model(audio_model: str, text_model: str, embed_dim: int = 256, seed: int = 0) -> AudioTextModel:
    """Both towers from their checkpoints (directory or hub id) plus freshly initialised heads.

    The heads' init is seeded, so a resumed or re-evaluated run rebuilds the same model before
    its saved tensors are loaded. Towers stay fp32 here; train.py's --precision uses autocast.
    """
    audio_tower, text_tower = load_audio_encoder(audio_model), load_text_encoder(text_model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AudioTextModel(audio_tower, text_tower, embed_dim)


def save_heads(model: nn.Module, path) -> list[str]:
    """Every trainable tensor that is not LoRA (projections, logit_scale, --train-also modules),
    atomically to a safetensors file; returns their names."""
    tensors = {
        name: param.detach().cpu().contiguous()
        for name, param in model.named_parameters()
        if param.requires_grad and ".lora_A." not in name and ".lora_B." not in name
    }
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    return sorted(tensors)


def load_heads(model: nn.Module, path) -> list[str]:
    """Load a save_heads file into the model; every tensor must name a parameter of the same shape."""
    tensors = load_file(str(path))
    params = dict(model.named_parameters())
    for name, tensor in tensors.items():
        if name not in params:
            raise ValueError(f"{path}: tensor {name!r} names no parameter of {type(model).__name__}")
        if params[name].shape != tensor.shape:
            raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model's is {tuple(params[name].shape)}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    return sorted(tensors)
