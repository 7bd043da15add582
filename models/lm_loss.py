"""A causal language model's loss without its (tokens x vocabulary) logits.

What it computes is exactly what models/llama.py computed from full logits before, and what
transformers' ForCausalLMLoss computes: the hidden state at position t scores labels[t + 1]
(the last position scores nothing, labels[0] is never scored), labels of -100 are ignored, and
the loss is the mean over the scored tokens, in fp32.

How it avoids the logits:
1. Label-only. Only the positions whose next label is not -100 are projected onto the vocabulary.
   In a prompt-then-answer batch those are the answer's few tokens, not the audio placeholders,
   the image queries or the prompt.
2. Chunks recomputed in backward. The scored rows go through the LM head `chunk_size` rows at a
   time, each chunk under torch.utils.checkpoint: its logits and log-softmax are freed as soon as
   its summed loss is known and rebuilt during backward, so nothing vocabulary-sized is kept
   between forward and backward; at any moment at most one chunk's logits exist.
3. fp32 per chunk. A bf16 head gives bf16 logits; each chunk is upcast before the softmax (as the
   reference upcasts its whole logits), so only one chunk is ever held in fp32.

The memory arithmetic, for Qwen2-Audio-7B (vocabulary V = 156,032, width 4096, its language model
in bf16) on one 30 s clip: 750 audio placeholders + a ~40-token prompt + a 32-token answer = 822
positions.

    full logits      822 x 156,032 = 128.3 M values
      held from forward to backward: the bf16 logits (256.5 MB) + cross_entropy's fp32 log-softmax
      (513.0 MB) = 770 MB; at the loss the fp32 upcast (513.0 MB) sits on top: ~1.28 GB per clip,
      ~10 GB for a micro-batch of 8 clips, before a single activation of the 32 layers. With the
      language model in fp32 the logits are 513 MB themselves: ~1.03 GB held per clip.
    label-only        32 x 156,032 = 5.0 M values
      held from forward to backward: nothing of that size (the 32 scored rows, 32 x 4096 bf16 =
      262 KB); at the loss one chunk lives: bf16 logits 10 MB + fp32 upcast 20 MB + log-softmax
      20 MB, ~50 MB per clip (~80 MB while its backward runs; 8 clips: one chunk of 256 rows, ~400 MB).

That is 10-16 bytes per (scored row x V) value at the peak, against 6 bytes per (position x V) kept
through the whole backward of the layers. The head's matmul shrinks by 822 / 32 = 26x (13x with
the chunk recomputed in backward). A full chunk of 1024 rows peaks near 1024 x 156,032 x 16 bytes
= 2.6 GB, which bounds long answers and big micro-batches; lower `chunk_size` if that is too much.

The head is a callable (the model's own `logits`, so LoRA on lm_head and tied embeddings take the
same path as generation) or a bare (V, D) weight.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # labels that score nothing: prompt, padding, image queries, audio placeholders
CHUNK_POSITIONS = 1024  # scored rows per chunk: a full Qwen2-Audio-7B chunk peaks near 2.6 GB (see above)


def summed_cross_entropy(head: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor,
                         targets: torch.Tensor) -> torch.Tensor:
    """rows (n, D), targets (n,) -> the summed fp32 cross entropy of their logits (n, V), upcast here."""
    return F.cross_entropy(head(rows).float(), targets, reduction="sum")


def next_token_loss(hidden: torch.Tensor, labels: torch.Tensor,
                    head: Callable[[torch.Tensor], torch.Tensor] | torch.Tensor,
                    chunk_size: int = CHUNK_POSITIONS) -> torch.Tensor:
    """hidden (B, T, D) after the final norm, labels (B, T) aligned with the inputs (-100 ignored), head:
    (..., D) -> (..., V) or its (V, D) weight -> the mean next-token cross entropy over the scored tokens,
    a fp32 scalar; equal to F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten()).
    No scored token at all gives NaN, as that reference does (the mean of nothing)."""
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels have shape {tuple(labels.shape)}; they must align with the inputs: "
                         f"{tuple(hidden.shape[:2])}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, not {chunk_size}")
    if isinstance(head, torch.Tensor):
        weight = head  # (V, D)

        def head(rows: torch.Tensor) -> torch.Tensor:  # (n, D) -> (n, V)
            return F.linear(rows, weight)
    scored = labels[:, 1:] != IGNORE_INDEX  # (B, T - 1): position t predicts token t + 1
    rows = hidden[:, :-1][scored]  # (N, D): the scored positions, row by row (a small copy, not (N, V))
    targets = labels[:, 1:][scored]  # (N,)
    n = len(targets)
    if n == 0:  # nothing to score: NaN, attached to the graph like the reference's (callers skip such batches)
        return F.cross_entropy(head(rows).float(), targets)
    total = None
    for start in range(0, n, chunk_size):
        piece = slice(start, start + chunk_size)
        # the chunk's logits are rebuilt in backward; with the RNG replayed, a LoRA dropout on lm_head draws the
        # same mask
        part = checkpoint(summed_cross_entropy, head, rows[piece], targets[piece], use_reentrant=False)
        total = part if total is None else total + part
    return total / n
