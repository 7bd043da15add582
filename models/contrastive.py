"""The contrastive loss over the *global* batch: gathered across ranks, accumulated exactly.

For contrastive learning the batch is the set of negatives, so a run on N devices, or one that
builds its batch from small micro-batches, must compute the loss of the whole global batch, not
an average of small losses. Two pieces make that so:

1. Gather with gradients (open_clip `loss.py`, `gather_features(..., gather_with_grad=True)`).
   Every rank gathers every rank's embeddings, computes the *same* global loss, and
   back-propagates it. The backward of the gather sums, over ranks, each rank's gradient for the
   rows it owns; since every rank computed the same loss, that is world_size x the gradient of
   the loss. DDP then *averages* the parameter gradients over ranks (divides by world_size),
   which cancels that factor: the result is the full-batch gradient, with no extra scaling. A
   parameter used by the loss itself (logit_scale) gets the full gradient on every rank, and
   the average of identical values is that value.

2. GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
   Setup", arXiv:2101.06983), for a global batch built from several micro-batches per rank:
   - pass 1 runs every micro-batch without grad and keeps only its embeddings (B x E floats);
   - the loss over the global batch and its gradient with respect to every embedding (and to
     logit_scale) are computed once, from the gathered embeddings, on a small leaf graph;
   - pass 2 re-runs each micro-batch with grad and back-propagates `(embeddings * their
     gradient).sum()`, whose gradient with respect to the parameters is exactly the loss's
     (chain rule through the embeddings). Random state is replayed, so pass 2 draws the same
     dropout masks as pass 1 and differentiates the very function whose loss was computed.
   Memory holds one micro-batch's activations at a time, yet loss and gradient are those of the
   whole global batch.

Here every rank computes the global loss itself, so its gradient with respect to the rank's own
embeddings is read straight off the leaf graph; the DDP average is then undone by multiplying
the pass-2 surrogate by world_size (the same factor the gather's backward gives in piece 1).
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lora.distributed import distributed, host_all_gather

MAX_LOGIT_SCALE = math.log(100)  # CLIP/CLAP cap the scale at 100 so the logits cannot explode


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Concatenate every rank's rows, in rank order, *without* gradient: (n_r, ...) -> (sum n_r, ...).

    Ranks may hold different numbers of rows (a skipped clip shrinks a batch), so rows are padded
    to the largest count for the collective and cut back after. Returns the rows and the counts.
    """
    if not distributed():
        return x, [x.shape[0]]
    counts = host_all_gather(x.shape[0])
    padded = x.new_zeros((max(counts), *x.shape[1:]))  # (n_max, ...)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, counts)]), counts


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's rows."""

    @staticmethod
    def forward(ctx, x):
        gathered, counts = gather_rows(x)
        rank = dist.get_rank()
        ctx.rows = (sum(counts[:rank]), sum(counts[: rank + 1]))
        return gathered

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # sum over ranks: each rank's loss may depend on these rows
        start, end = ctx.rows
        return grad[start:end]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (rank order) with gradients flowing back to each rank's own rows; see the
    module docstring for why no world-size factor is needed afterwards under DDP."""
    return _GatherWithGrad.apply(x) if distributed() else x


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


def global_contrastive_loss(audio, text, logit_scale, keys) -> torch.Tensor:
    """The loss over every rank's rows, differentiable with respect to this rank's own rows (and
    logit_scale): what a single process holding the whole global batch would compute."""
    width = _max_width(keys)
    all_keys, _ = gather_rows(pad_columns(keys, width))
    loss, _ = contrastive_loss(gather_with_grad(audio), gather_with_grad(text), logit_scale, contrastive_targets(all_keys))
    return loss


def _max_width(keys: torch.Tensor) -> int:
    return max(host_all_gather(keys.shape[1]))


@dataclass
class CachedLoss:
    """What GradCache's middle step returns: the global loss, d loss / d (this rank's embeddings),
    and d loss / d logit_scale."""

    loss: torch.Tensor  # scalar, detached
    audio_grad: torch.Tensor  # (n_rank, E): rows of this rank, in its micro-batch order
    text_grad: torch.Tensor  # (n_rank, E)
    scale_grad: torch.Tensor  # scalar


def cached_loss_and_gradients(audio: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, keys: torch.Tensor) -> CachedLoss:
    """GradCache's middle step on this rank's pass-1 embeddings (no graph behind them): gather the
    global batch, compute its loss on leaf copies, and return the gradients for this rank's rows."""
    width = _max_width(keys)
    all_audio, counts = gather_rows(audio.detach().float())
    all_text, _ = gather_rows(text.detach().float())
    all_keys, _ = gather_rows(pad_columns(keys, width))
    rank = dist.get_rank() if distributed() else 0
    start, end = sum(counts[:rank]), sum(counts[: rank + 1])
    all_audio.requires_grad_(True)
    all_text.requires_grad_(True)
    scale = logit_scale.detach().float().requires_grad_(True)
    loss, _ = contrastive_loss(all_audio, all_text, scale, contrastive_targets(all_keys))
    audio_grad, text_grad, scale_grad = torch.autograd.grad(loss, (all_audio, all_text, scale))
    return CachedLoss(loss.detach(), audio_grad[start:end], text_grad[start:end], scale_grad)
