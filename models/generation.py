"""Greedy decoding for models/llama.py's LlamaForCausalLM (`LlamaForCausalLM.generate` calls `greedy_generate`),
with gpt-fast's static KV cache: every buffer that grows with the output is allocated once, before the first
step, and written in place.
"""

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: models/llama.py imports this module
    from models.llama import LlamaConfig, LlamaForCausalLM


class KVCache:
    """Keys and values of the positions decoded so far, one preallocated (B, H_kv, max_len, d) buffer
    per layer (gpt-fast's static cache); `length` positions are filled."""

    def __init__(self, cfg: "LlamaConfig", batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.length = 0  # advanced by LlamaModel.forward once every layer has written

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H_kv, T, d) after the cached positions; return all of them (B, H_kv, length + T, d)."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


@torch.no_grad()
def greedy_generate(model: "LlamaForCausalLM", input_ids=None, inputs_embeds=None, attention_mask=None,
                    max_new_tokens: int = 20, eos_token_id: int | tuple[int, ...] | None = None,
                    use_cache: bool = True) -> torch.Tensor:
    """Greedy decoding -> (B, n) long: only the n <= max_new_tokens new tokens, not the prompt. A row that
    emits eos keeps it and is padded after it (pad_token_id, else the first eos); decoding stops when every
    row has, as transformers' generate(do_sample=False, num_beams=1). Pad the prompt on the left: every row's
    next token then follows its last real one. eos_token_id (default: the config's) may be overridden, by one
    id or several (a checkpoint's generation_config.json lists several: models/tokenizer.py SpecialTokens).

    Everything that grows with the output is allocated once, for T + max_new_tokens positions: the KV cache
    (gpt-fast's static cache, written in place), the attention mask and the output ids; each step reads a
    prefix of them, so no step copies what the previous ones wrote."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    x = model.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
    B, T, _ = x.shape
    mask = torch.ones(B, T + max_new_tokens, dtype=torch.long, device=x.device)  # every new token is real
    if attention_mask is not None:
        mask[:, :T] = attention_mask
    eos_ids = model.config.eos_token_id if eos_token_id is None else eos_token_id
    eos = torch.tensor(eos_ids, dtype=torch.long, device=x.device).flatten()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else int(eos[0]) if len(eos) else 0
    cache = KVCache(model.config, B, T + max_new_tokens, x.dtype, x.device) if use_cache else None
    tokens = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=x.device)  # (B, n)
    finished = torch.zeros(B, dtype=torch.bool, device=x.device)
    step_input = x  # with a cache: the prompt, then one new token a step; without: everything so far
    for step in range(max_new_tokens):
        hidden = model.model(step_input, mask[:, :T + step], cache=cache)  # (B, T', D)
        next_token = model.logits(hidden[:, -1]).argmax(-1).masked_fill(finished, pad)  # (B,)
        tokens[:, step] = next_token
        finished |= torch.isin(next_token, eos)
        if finished.all():
            return tokens[:, :step + 1]
        new = model.model.embed_tokens(next_token[:, None]).to(x.dtype)  # (B, 1, D)
        step_input = new if use_cache else torch.cat([step_input, new], dim=1)
    return tokens
