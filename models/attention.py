"""Which earlier tokens each token of models/llama.py's decoder attends to, and the attention call itself.

Padded rows (`attention_mask_and_positions`): causal, no padding keys, positions counted over the real tokens
only, as transformers' generate computes them.

Packed rows (data/packing.py): several examples in one row, `segment_ids` (B, T) numbering them 1, 2, ...
in each row (0 = padding) and `position_ids` restarting at 0 for each (`segment_positions` rebuilds them from
the segments alone). Attention is then block-diagonal causal (`BlockCausal`): a token sees the earlier tokens
of its own example only, so every example gets exactly the hidden states it gets alone. On the CPU that is
SDPA with an explicit boolean mask; on CUDA in fp16/bf16, torch's variable-length flash attention
(`torch.nn.attention.varlen`), which skips the masked blocks instead of computing them.

`attend` runs either: q, k, v in, the heads' outputs concatenated out.
"""

import functools

import torch
import torch.nn.functional as F


@functools.cache
def varlen_kernel():
    """torch >= 2.10's flash attention over packed variable-length sequences (CUDA, fp16/bf16), or None.
    Imported on first use: the module pulls in torch._dynamo, a second per process that CPU runs never need."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def attention_mask_and_positions(attention_mask: torch.Tensor | None, batch: int, start: int, T: int, device):
    """(B, 1, T, S) bool mask (True = may attend) and (B, T) positions for T new tokens after `start`
    cached ones; attention_mask (B, S = start + T), 1 on real tokens, or None (all real)."""
    S = start + T
    if attention_mask is None:
        attention_mask = torch.ones(batch, S, dtype=torch.long, device=device)
    if attention_mask.shape != (batch, S):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; it must cover the cached and the "
                         f"new positions: ({batch}, {S})")
    real = attention_mask.bool()
    # positions count real tokens only, so padding on either side shifts nothing (transformers' generate)
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(~real, 0)[:, start:]  # (B, T)
    query = torch.arange(start, S, device=device)[:, None]  # (T, 1) index of each new token in the sequence
    key = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = (key <= query) & real[:, None, :]  # (B, T, S): causal, and no padding keys
    # A padding query would see no key at all (a NaN row); let it see itself. Its output is never used.
    allowed = allowed | (key == query)
    return allowed[:, None], positions  # (B, 1, T, S)


def segment_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True where an example (or a row's padding run) begins; the first token of a row always."""
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """segment_ids (B, T) of packed rows -> (B, T) positions restarting at 0 where each example starts (0 on
    padding): what `position_ids` of data/packing.py hold, for a caller that passes only the segments."""
    B, T = segment_ids.shape
    index = torch.arange(T, device=segment_ids.device).expand(B, T)  # (B, T)
    first = torch.where(segment_starts(segment_ids), index, 0).cummax(dim=-1).values  # (B, T) its run's first index
    return (index - first).masked_fill(segment_ids == 0, 0)


class SharedMask:
    """The (B, 1, T, S) boolean mask of one forward (True = may attend), shared by every layer, and handed to SDPA
    as the additive float mask it would make of it (0 where allowed, -inf elsewhere: the same numbers), made
    once per dtype. Given the boolean mask, SDPA converts it at every call and its backward keeps each layer's
    copy: 2 x T x S floats per row per layer, 0.2 GiB over Qwen2-0.5B's 24 layers at 2 x 1041 tokens."""

    def __init__(self, allowed: torch.Tensor | None):
        self._mask = allowed  # (B, 1, T, S) bool; BlockCausal builds its own when first asked
        self._additive = {}

    def mask(self) -> torch.Tensor:
        return self._mask

    def additive(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._additive:
            allowed = self.mask()
            self._additive[dtype] = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
                allowed.logical_not(), float("-inf"))
        return self._additive[dtype]


class BlockCausal(SharedMask):
    """The attention of packed rows: token t of a row may attend to token s <= t when both belong to the same
    example (segment_ids equal and > 0). A padding token attends to itself only; its output is never read.

    Two spellings of the same attention, chosen per call by `attend`:
    - `mask()`: the (B, 1, T, T) boolean mask, built once per forward and shared by every layer (SDPA gets
      its additive float form, SharedMask);
    - `varlen_attention`: the row's examples laid end to end, (B * T, H, d), with the cumulative lengths of
      every example and of each row's padding run (treated as one more sequence), for torch's variable-length
      flash attention, which needs CUDA and fp16/bf16 and has no dropout."""

    def __init__(self, segment_ids: torch.Tensor):
        super().__init__(None)
        self.segment_ids = segment_ids  # (B, T) long, 0 = padding, k = the k-th example of its row
        self._varlen = None

    def mask(self) -> torch.Tensor:
        if self._mask is None:
            seg, T = self.segment_ids, self.segment_ids.shape[1]
            same = seg[:, :, None] == seg[:, None, :]  # (B, T, T): query t and key s in one example
            causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()  # (T, T)
            allowed = same & causal & (seg[:, None, :] > 0)  # no padding keys
            allowed |= torch.eye(T, dtype=torch.bool, device=seg.device)  # a padding query: itself, not a NaN row
            self._mask = allowed[:, None]  # (B, 1, T, T)
        return self._mask

    def varlen_applies(self, q: torch.Tensor, dropout: float) -> bool:
        fits = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and dropout == 0.0
        return fits and varlen_kernel() is not None

    def varlen_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, H, T, d), k and v (B, H_kv, T, d) -> (B, T, H*d), each example attending causally to itself."""
        B, H, T, d = q.shape
        if self._varlen is None:
            # (n,) first token of each sequence in (B * T): a row's start begins one too
            begins = segment_starts(self.segment_ids).flatten().nonzero().flatten()
            ends = torch.cat([begins[1:], begins.new_tensor([B * T])])
            cumulative = torch.cat([begins, begins.new_tensor([B * T])]).to(torch.int32)  # (n + 1,)
            self._varlen = cumulative, int((ends - begins).max())
        cumulative, longest = self._varlen
        packed = [t.transpose(1, 2).reshape(B * T, t.shape[1], d) for t in (q, k, v)]  # (B, H, T, d) -> (B*T, H, d)
        y = varlen_kernel()(*packed, cumulative, cumulative, longest, longest, window_size=(-1, 0),
                        enable_gqa=k.shape[1] != H)  # (-1, 0): causal
        return y.view(B, T, H * d)  # (B*T, H, d) -> (B, T, H*d)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | SharedMask,
           dropout: float) -> torch.Tensor:
    """q (B, H, T, d), k and v (B, H_kv, S, d), mask a (B, 1, T, S) bool tensor (True = may attend), the
    SharedMask of one, or the packed rows' BlockCausal -> (B, T, H*d). `dropout`: the attention dropout, 0
    outside training."""
    B, H, T, d = q.shape
    if isinstance(mask, BlockCausal) and mask.varlen_applies(q, dropout):  # packed rows, CUDA
        return mask.varlen_attention(q, k, v)  # (B, T, H*d)
    if isinstance(mask, SharedMask):
        mask = mask.additive(q.dtype)  # (B, 1, T, S)
    # each key/value head serves heads / kv_heads query heads: SDPA pairs them itself (enable_gqa), the same
    # numbers as repeating k and v, without a copy of the whole KV cache at every generated token
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                       enable_gqa=k.shape[1] != H)  # (B, H, T, d)
    return y.transpose(1, 2).reshape(B, T, H * d)  # (B, H, T, d) -> (B, T, H*d); explicit: B may be 0
