"""Pooled features of a frozen text tower, computed once per distinct caption and reused.

When LoRA trains only the audio side, the text tower is a fixed function: in eval mode (no
dropout) and with no parameter requiring grad, a caption's pooled features, the mean over its real
tokens of the tower's last hidden states (models/bert.py `mean_pool`, what
`AudioTextModel.pool_text` computes, before `text_proj`), are the same at every step. A data set
has a few thousand distinct captions, so after the first epoch the text tower never runs:

    pooled = cache.pooled(model.text_tower, batch["captions"], input_ids, attention_mask)  # (B, H)
    text_embeds = model.project_text(pooled)                   # text_proj trains as before

Same numbers: a caption's entry is what the tower gave it in the batch where it was first seen,
so a batch of distinct captions none of which is cached gets bit-for-bit the uncached result. In
a later batch the uncached tower would see the caption padded to another length. The attention
mask hides pad keys exactly (their softmax weight is 0) and mean_pool skips pad rows, so the math
is the same; what differs is float rounding in reductions whose length is the padded length
(measured on CPU fp32: other rows, same length, bit-equal; other padding, up to ~1e-6 absolute,
a few ulps, for a MiniLM-sized tower). The uncached numbers vary that much between batches anyway.

A run that fills the cache as batches come would hold values that depend on which batch a
caption met first, so a resumed run (empty cache, other first batches) would drift by those
ulps. `fill` instead computes every caption of a data set before training, in `canonical_chunks`
(by token count, then text, in chunks of a fixed size): the same numbers whenever and however
often the run starts, which keeps a resume bit-exact. `AudioTextModel.embed_text` computes in the
same chunks, so evaluation gives the same numbers with or without a cache, in train.py or eval.py.

Guards, so a cache can never serve stale features:
- `pooled` refuses (raises) a text tower in train mode or with any parameter requiring grad;
- an entry is keyed by the caption and by the compute setting (device, autocast dtype), so fp32
  evaluation never reads features computed under bf16 autocast;
- if the tower's tensors change (an in-place update bumps a tensor's version counter; `.to()`,
  a new tower or a reloaded checkpoint gives new tensors), every entry is dropped.
"""

import torch
from torch import nn

from models.bert import mean_pool


TEXT_CHUNK = 256  # texts a canonical chunk holds (a batch through the text tower)


def canonical_chunks(texts: list[str], tokenizer, chunk: int = TEXT_CHUNK) -> list[list[str]]:
    """The distinct `texts`, sorted by token count then text, cut into chunks of `chunk`: an order
    fixed by the set of texts alone (not by their order, nor a batch size), so features computed
    chunk by chunk are the same numbers whoever asks, whenever (little padding, too)."""
    ordered = sorted(set(texts), key=lambda text: (len(tokenizer.encode(text).ids), text))
    return [ordered[start : start + chunk] for start in range(0, len(ordered), chunk)]


class TextTowerTrainsError(RuntimeError):
    """The text tower is not frozen, so its features change and must not be cached."""


def check_frozen(text_tower: nn.Module) -> None:
    """Raise TextTowerTrainsError unless text_tower is in eval mode with nothing requiring grad."""
    trainable = [name for name, p in text_tower.named_parameters() if p.requires_grad]
    if trainable:
        raise TextTowerTrainsError(
            f"the text tower has {len(trainable)} parameters requiring grad ({', '.join(trainable[:3])}, ...): its "
            "features change every step, so they cannot be cached. Compute them with the model's pool_text instead")
    if text_tower.training:
        raise TextTowerTrainsError("the text tower is in train mode, so dropout changes its features on every call; "
                                   "call text_tower.eval() (it is frozen) before using the text cache")


def tensor_versions(module: nn.Module) -> tuple:
    """A cheap fingerprint of a module's tensors (no device sync): which tensors it holds, where,
    and how many times each was modified in place."""
    tensors = list(module.parameters()) + list(module.buffers())
    return (id(module),) + tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)


class FrozenTextCache:
    """caption -> (H,) pooled text features of a frozen text tower. One cache serves one tower."""

    def __init__(self):
        self._pooled: dict[tuple, torch.Tensor] = {}  # (setting, caption) -> (H,)
        self._versions = None  # tensor_versions of the tower the entries came from
        self.hits = 0  # captions served from the cache, over the cache's lifetime
        self.misses = 0  # captions run through the tower

    def __len__(self) -> int:
        return len(self._pooled)

    @torch.no_grad()
    def fill(self, text_tower: nn.Module, captions: list[str], tokenizer, device, chunk: int = TEXT_CHUNK) -> int:
        """Compute every caption not cached yet, in canonical chunks (`canonical_chunks`), under the
        caller's autocast (see the module docstring). Returns how many were computed."""
        from models.tokenizer import tokenize  # the text tower's own tokenizer, padding to a chunk's longest

        autocast = (torch.get_autocast_dtype(torch.device(device).type)
                    if torch.is_autocast_enabled(torch.device(device).type) else None)
        self._check(text_tower)
        new = [c for c in captions if (str(torch.device(device)), autocast, c) not in self._pooled]
        chunks = canonical_chunks(new, tokenizer, chunk)
        for texts in chunks:
            ids, mask = tokenize(tokenizer, texts)
            self.pooled(text_tower, texts, ids.to(device), mask.to(device))
        return sum(map(len, chunks))

    def _check(self, text_tower: nn.Module):
        check_frozen(text_tower)
        versions = tensor_versions(text_tower)
        if versions != self._versions:  # another tower, or its weights changed: nothing cached holds
            self._pooled.clear()
            self._versions = versions

    @torch.no_grad()
    def pooled(self, text_tower: nn.Module, captions: list[str], input_ids: torch.Tensor,
               attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, H) pooled features of `captions`, on input_ids' device, in the dtype the tower gives
        under the current autocast. input_ids and attention_mask (B, L) must be the tokenized
        `captions` (models/tokenizer.py `tokenize`), row for row. Only captions not cached yet go
        through the tower, each once. Raises TextTowerTrainsError if the tower is not frozen."""
        if len(captions) != input_ids.shape[0] or input_ids.shape != attention_mask.shape:
            raise ValueError(f"{len(captions)} captions for input_ids {tuple(input_ids.shape)} and attention_mask "
                             f"{tuple(attention_mask.shape)}: give the tokenized captions, one row each")
        self._check(text_tower)
        device = input_ids.device
        autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        keys = [(str(device), autocast, caption) for caption in captions]

        first_row = {}  # each missing caption once, at the row where it first appears
        for row, key in enumerate(keys):
            if key not in self._pooled and key not in first_row:
                first_row[key] = row
        if first_row:
            rows = list(first_row.values())
            if len(rows) == len(keys):  # the whole batch is new: run it as it is
                ids, mask = input_ids, attention_mask
            else:
                index = torch.tensor(rows, device=device)
                ids, mask = input_ids[index], attention_mask[index]  # (M, L)
            new = mean_pool(text_tower(ids, mask), mask)  # (M, L, H) -> (M, H)
            for j, key in enumerate(first_row):
                self._pooled[key] = new[j]
        self.misses += len(first_row)
        self.hits += len(keys) - len(first_row)
        return torch.stack([self._pooled[key] for key in keys])  # (B, H)
