"""A tiny random Qwen2-Audio written by transformers' save_pretrained in shards, with a tokenizer.json that
holds the chat and audio special tokens (a WordPiece over a closed vocabulary, as the demos build)."""

from pathlib import Path

import torch

from data.demo_audio_qa import SPECIAL_TOKENS, UNK
from data.demo_models import build_wordpiece
from models.qwen2_audio import AUDIO, CHAT_TOKENS, chat_prompt

WORDS = ["what do you hear", "describe the sound briefly", "two short high tones", "a rising chirp", "loud noise"]


def tokenizer_for(texts=WORDS):
    template_words = [chat_prompt(text) for text in texts]
    for token in CHAT_TOKENS:
        template_words = [text.replace(token, " ") for text in template_words]
    return build_wordpiece(template_words + list(texts), SPECIAL_TOKENS, UNK, "$A")


def save_tiny_qwen2_audio(directory: Path, seed: int = 1, max_shard_size: str = "10KB", num_mel_bins: int = 128,
                          max_source_positions: int = 1500):
    """-> the transformers reference (eval mode, every weight random) saved in `directory` with tokenizer.json."""
    import transformers

    tokenizer = tokenizer_for()
    config = transformers.Qwen2AudioConfig(
        audio_config=dict(num_mel_bins=num_mel_bins, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                          encoder_ffn_dim=64, max_source_positions=max_source_positions),
        text_config=dict(model_type="qwen2", vocab_size=tokenizer.get_vocab_size(), hidden_size=32,
                         intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, rms_norm_eps=1e-5,
                         eos_token_id=tokenizer.token_to_id("<|im_end|>"), pad_token_id=0),
        audio_token_index=tokenizer.token_to_id(AUDIO))
    reference = transformers.Qwen2AudioForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(seed)
    # every weight random (unit norms and zero biases would hide a misplaced one), scaled by fan-in
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=generator) * p[0].numel() ** -0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1 + (1.0 if "norm" in name else 0.0))
    reference.eval()
    reference.save_pretrained(directory, max_shard_size=max_shard_size)
    tokenizer.save(str(Path(directory) / "tokenizer.json"))
    return reference
