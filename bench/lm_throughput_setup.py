"""What the parent and the workers of bench/lm_throughput.py share: the models' shapes (Qwen/Qwen2-0.5B's
released config, the small audio tower, their --tiny widths), the LoRA settings and targets, the sides, the
fixed texts of the audio examples, and the writer of the random-init checkpoints (run in a process of its own as
`bench/lm_throughput.py --write`). See bench/lm_throughput.py's docstring.
"""

from pathlib import Path

import torch

VERSION = 1  # bump when the written checkpoints change, so old ones are rewritten
LORA = dict(r=16, alpha=32, dropout=0.0)
TARGETS = {"text": r"model.*self_attn\.(q|k|v|o)_proj", "audio": r"language_model.*self_attn\.(q|k|v|o)_proj"}
ANSWER_TOKENS = 32  # the answer of every example, the only tokens with labels
SIDES = {"ours": "ours", "ours-packed": "ours, packed", "hf": "transformers + PEFT"}
GENERATION_SIDES = {"ours": "ours", "hf": "transformers"}
# Qwen/Qwen2-0.5B's config.json as released (transformers 4.40.1); num_hidden_layers is --layers here.
QWEN2_0_5B = {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
              "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
              "intermediate_size": 4864, "max_position_embeddings": 131072, "max_window_layers": 24,
              "model_type": "qwen2",
              "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
              "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
              "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}
AUDIO_VOCAB = 156032  # Qwen2-Audio's language model vocabulary
AUDIO_TOWER = dict(num_mel_bins=128, d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536,
                   max_source_positions=1500)  # Whisper-tiny's widths, Qwen2-Audio's 128 mels and 30 s of positions
TINY_TEXT = dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2, vocab_size=2048)
TINY_TOWER = dict(d_model=32, encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=64)
ANSWER_WORDS = [f"w{i}" for i in range(40)]  # answers are ANSWER_TOKENS - 1 of them, then <|im_end|>
QUESTION = "what do you hear in this recording"


def text_config(args) -> dict:
    config = dict(QWEN2_0_5B, num_hidden_layers=args.layers, max_window_layers=args.layers)
    return config | (TINY_TEXT if args.tiny else {})


def write_checkpoints(spec: dict) -> None:
    """The --write entry (a process of its own): the text model and the whole Qwen2-Audio, random init, bf16."""
    import transformers

    from data.demo_audio_qa import SPECIAL_TOKENS, UNK
    from data.demo_models import build_wordpiece
    from models.qwen2_audio import AUDIO, CHAT_TOKENS, chat_prompt

    transformers.logging.set_verbosity_error()
    root, text = Path(spec["root"]), spec["text_config"]
    torch.manual_seed(spec["seed"])
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**text))
    model.to(torch.bfloat16).save_pretrained(root / "text", max_shard_size="200MB")
    del model
    template = chat_prompt(QUESTION)
    for token in CHAT_TOKENS:
        template = template.replace(token, " ")
    tokenizer = build_wordpiece([template, QUESTION] + ANSWER_WORDS, SPECIAL_TOKENS, UNK, "$A")
    vocab = text["vocab_size"] if spec["tiny"] else AUDIO_VOCAB
    audio_text = dict(text, vocab_size=vocab, tie_word_embeddings=False)
    config = transformers.Qwen2AudioConfig(audio_config=spec["tower"], text_config=audio_text,
                                           audio_token_index=tokenizer.token_to_id(AUDIO))
    model = transformers.Qwen2AudioForConditionalGeneration(config)
    model.to(torch.bfloat16).save_pretrained(root / "audio", max_shard_size="200MB")
    tokenizer.save(str(root / "audio" / "tokenizer.json"))
