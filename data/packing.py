"""Padding-free batches for the decoder-only language models: several examples in one row.

A micro-batch of answer examples padded to its longest is mostly padding when lengths vary: a 30 s clip
is 750 audio placeholders, a 2 s clip 50, and every row is as long as the longest. Packing puts the
examples end to end into rows of at most `budget` tokens instead, so the language model computes on
little but real tokens (torchtune's packed datasets, the "padding-free" collators of TRL):

    example token rows [p0 a0] [p1 a1] [p2 a2] [p3 a3], budget 10
      -> row 0: [p0 a0 | p2 a2 | pad]       segment_ids [1 1 1 1 2 2 2 2 2 0]
         row 1: [p1 a1 | p3 a3 | pad pad]   position_ids restart at 0 for each example

What keeps each example's numbers exactly its unpacked ones (models/llama.py):
- segment_ids (R, W): k for the k-th example of the row, 0 for padding; the model builds a block-diagonal
  causal attention from them, so no token sees another example;
- position_ids (R, W): 0, 1, ... from each example's first token, the positions it has alone;
- the label of each example's first token is -100: the next-token loss scores labels[t + 1] with the
  hidden state at t, and at an example's start t is the previous example's last token. Unpacked, a row's
  first label is never scored either, so the loss (a mean over the same scored tokens) is the same.

Rows are filled first-fit in the given order: each example goes to the first row with room, or opens a
new one. The examples are then listed in reading order (row by row, left to right, `order`): the collates
put the clips, images and per-example fields (paths, lines, index) in that order, which is how the models
place audio and query embeddings on their examples.

The padding share (padding tokens / all tokens of the language model's input) is what packing removes;
`padding_counts` gives it for a padded batch too, so a run can report it either way.
"""

from dataclasses import dataclass

import torch

from models.lm_loss import IGNORE_INDEX


@dataclass(frozen=True)
class PackedRows:
    input_ids: torch.Tensor  # (R, W) long, examples end to end, pad_id after the last one of a row
    labels: torch.Tensor  # (R, W) long, -100 on padding and on each example's first token
    attention_mask: torch.Tensor  # (R, W) long, 1 on every example's tokens, 0 on padding
    position_ids: torch.Tensor  # (R, W) long, 0, 1, ... within each example, 0 on padding
    segment_ids: torch.Tensor  # (R, W) long, k = the k-th example of its row (from 1), 0 = padding
    spans: list[list[tuple[int, int]]]  # per row, (start, end) of each of its examples, left to right
    order: list[int]  # the given examples' indices in reading order: row 0's left to right, then row 1's, ...
    padding_tokens: int
    lm_tokens: int  # R * W

    @property
    def padding_share(self) -> float:
        return self.padding_tokens / self.lm_tokens if self.lm_tokens else 0.0

    def batch_fields(self) -> dict:
        """The fields a collate returns for packed rows: the five (R, W) tensors, `order` and the padding counts."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels,
                "position_ids": self.position_ids, "segment_ids": self.segment_ids, "order": self.order,
                "padding_tokens": self.padding_tokens, "lm_tokens": self.lm_tokens,
                "padding_share": self.padding_share}


def padding_counts(attention_mask: torch.Tensor, real_prefix: int = 0) -> dict:
    """A padded batch's {"padding_tokens", "lm_tokens", "padding_share"}: attention_mask (B, L), 1 on real tokens,
    and `real_prefix` positions the model puts in front of every row, all real (InstructBLIP's queries)."""
    rows, width = attention_mask.shape
    lm_tokens = rows * (real_prefix + width)
    padding = int((attention_mask == 0).sum())
    share = padding / lm_tokens if lm_tokens else 0.0
    return {"padding_tokens": padding, "lm_tokens": lm_tokens, "padding_share": share}


def first_fit(lengths: list[int], budget: int, names: list[str] | None = None) -> list[list[int]]:
    """Example indices grouped into rows of at most `budget` tokens, first fit in the given order."""
    rows, room = [], []
    for i, n in enumerate(lengths):
        if n > budget:
            where = f"{names[i]}: " if names else ""
            raise ValueError(f"{where}the example is {n} tokens long, more than the packing budget of {budget}; raise "
                             f"the budget to at least {max(lengths)} (the batch's longest example) or pack without it")
        row = next((r for r, left in enumerate(room) if left >= n), None)
        if row is None:
            rows.append([])
            room.append(budget)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= n
    return rows


def pack_examples(token_rows: list[list[int]], label_rows: list[list[int]], budget: int, pad_id: int,
                  names: list[str] | None = None) -> PackedRows:
    """Per-example token ids and labels (equal lengths, labels -100 where nothing is scored) -> rows of at most
    `budget` tokens, as wide as the longest row. `names` (e.g. "manifest.jsonl:12") name an example that does
    not fit the budget at all in the error."""
    if budget < 1:
        raise ValueError(f"the packing budget must be at least 1 token, not {budget}")
    if len(token_rows) != len(label_rows) or any(len(t) != len(lab) for t, lab in zip(token_rows, label_rows)):
        raise ValueError("every example needs as many labels as tokens")
    if not token_rows:
        raise ValueError("nothing to pack: the micro-batch holds no example")
    rows = first_fit([len(t) for t in token_rows], budget, names)
    width = max(sum(len(token_rows[i]) for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.zeros(shape, dtype=torch.long)
    spans = []
    for r, row in enumerate(rows):
        start, row_spans = 0, []
        for k, i in enumerate(row, start=1):
            end = start + len(token_rows[i])
            input_ids[r, start:end] = torch.tensor(token_rows[i], dtype=torch.long)
            labels[r, start:end] = torch.tensor(label_rows[i], dtype=torch.long)
            labels[r, start] = IGNORE_INDEX  # else the previous example's last token would predict it
            position_ids[r, start:end] = torch.arange(end - start)
            segment_ids[r, start:end] = k
            row_spans.append((start, end))
            start = end
        spans.append(row_spans)
    real = segment_ids > 0
    return PackedRows(input_ids=input_ids, labels=labels, attention_mask=real.long(), position_ids=position_ids,
                      segment_ids=segment_ids, spans=spans, order=[i for row in rows for i in row],
                      padding_tokens=int((~real).sum()), lm_tokens=real.numel())
