"""The symmetric InfoNCE loss of one batch (CLIP, Radford et al. 2021), and what decides its targets.

AudioTextModel.forward (models/audio_text.py) computes it for the batch it is given. Across several
processes or micro-batches the loss is taken over the whole global batch instead, from these same
functions: tasks/contrastive.py gathers the embeddings of every rank and accumulates micro-batches
exactly (GradCache).
"""

import math

import torch
import torch.nn.functional as F

MAX_LOGIT_SCALE = math.log(100)  # CLIP/CLAP cap the scale at 100 so the logits cannot explode


def caption_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) ids and mask -> (B, L + 1) rows that are equal exactly when two captions tokenize the
    same: the ids with padding zeroed, then the length. Comparable across ranks once each rank's
    rows are padded to one length (pad_columns)."""
    ids = input_ids * attention_mask  # pad positions compare equal whatever the pad id
    return torch.cat([ids, attention_mask.sum(-1, keepdim=True)], dim=1)


def pad_columns(x: torch.Tensor, width: int) -> torch.Tensor:
    """(B, L) -> (B, width) with zeros on the right, so ranks can gather rows of one length."""
    return F.pad(x, (0, width - x.shape[1])) if x.shape[1] < width else x


def contrastive_targets(keys: torch.Tensor) -> torch.Tensor:
    """(B, B) target distribution from caption_keys: caption j is a positive for clip i when it is
    clip i's caption or the very same text. Identical captions of different clips (common in small
    caption sets) would otherwise be pushed apart as negatives."""
    same = (keys[:, None, :] == keys[None, :, :]).all(-1)  # (B, B)
    return same.float() / same.float().sum(-1, keepdim=True)


def contrastive_loss(audio: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, targets: torch.Tensor):
    """Symmetric InfoNCE (CLIP): (B, E) unit audio and text embeddings, the raw log-scale parameter
    and (B, B) targets -> (scalar loss, (B, B) logits), in fp32 even under autocast."""
    # Clamped here, so a scale at the cap gets no gradient pushing it further.
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    logits = scale * audio.float() @ text.float().T  # (B, B): clip i against caption j
    loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T)) / 2
    return loss, logits
