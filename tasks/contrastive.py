"""The contrastive loss over the *global* batch: gathered across ranks, accumulated exactly (GradCache).

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

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from common.distributed import device_rng_state, distributed, host_all_gather, set_device_rng_state, unwrap
from engine.training import StepEnv
from models.contrastive import caption_keys, contrastive_loss, contrastive_targets, pad_columns


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


def global_contrastive_loss(audio, text, logit_scale, keys) -> torch.Tensor:
    """The loss over every rank's rows, differentiable with respect to this rank's own rows (and
    logit_scale): what a single process holding the whole global batch would compute."""
    width = _max_width(keys)
    all_keys, _ = gather_rows(pad_columns(keys, width))
    loss, _ = contrastive_loss(gather_with_grad(audio), gather_with_grad(text), logit_scale,
                               contrastive_targets(all_keys))
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


def cached_loss_and_gradients(audio: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                              keys: torch.Tensor) -> CachedLoss:
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


def grad_cache(model: nn.Module, inputs: list[dict], env: StepEnv) -> torch.Tensor:
    """GradCache (piece 2 above): embeddings without grad, the global loss and its
    gradient once, then each micro-batch again with grad, its slice of that gradient pushed back."""
    states, audio, text, keys = [], [], [], []
    with torch.no_grad():  # pass 1: only the (B, E) embeddings survive each micro-batch
        for x in inputs:
            states.append(device_rng_state(env.device))  # replayed in pass 2: the same dropout masks
            with env.autocast():
                out = model(**x)
            audio.append(out.audio_embeds.float())
            text.append(out.text_embeds.float())
            keys.append(caption_keys(x["input_ids"], x["attention_mask"]))
    after = device_rng_state(env.device)
    width = max(k.shape[1] for k in keys)
    cached = cached_loss_and_gradients(torch.cat(audio), torch.cat(text), unwrap(model).logit_scale,
                                       torch.cat([pad_columns(k, width) for k in keys]))
    start = 0
    for i, x in enumerate(inputs):  # pass 2
        set_device_rng_state(states[i], env.device)
        last = i == len(inputs) - 1
        with env.sync(model, last):
            with env.autocast():
                out = model(**x)
            rows = slice(start, start + out.audio_embeds.shape[0])
            start = rows.stop
            # d(surrogate)/d(parameters) = d(loss)/d(embeddings) . d(embeddings)/d(parameters): the chain rule
            surrogate = ((out.audio_embeds.float() * cached.audio_grad[rows]).sum()
                         + (out.text_embeds.float() * cached.text_grad[rows]).sum())
            # DDP averages over ranks, but each rank's rows carry their own share of the gradient: undo the average
            surrogate = surrogate * env.world_size
            if last:  # logit_scale's gradient is the same on every rank, which the average keeps
                surrogate = surrogate + cached.scale_grad * out.logit_scale
            env.backward(surrogate)
    set_device_rng_state(after, env.device)
    return cached.loss
