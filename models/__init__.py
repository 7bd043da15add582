"""Hand-ported encoders that load Hugging Face safetensors checkpoints, and the audio front end.

    from models import load_audio_encoder, audio_to_features, load_text_encoder, load_tokenizer
    enc = load_audio_encoder("Qwen/Qwen2-Audio-7B-Instruct")      # or a local directory
    feats, frame_mask = audio_to_features(["a.wav", "b.flac"], n_mels=enc.config.num_mel_bins)
    hidden = enc(feats, frame_mask)                               # (B, T_out, d_model)
"""

from models.audio import audio_to_features, load_audio, log_mel_spectrogram
from models.instructblip import load_instructblip
from models.llama import load_llama
from models.loading import load_audio_encoder, load_instructblip_tokenizers, load_text_encoder, load_tokenizer
from models.qwen2_audio import load_qwen2_audio, load_qwen2_audio_tokenizer

__all__ = [
    "audio_to_features", "load_audio", "load_audio_encoder", "load_instructblip", "load_instructblip_tokenizers",
    "load_llama", "load_qwen2_audio", "load_qwen2_audio_tokenizer", "load_text_encoder", "load_tokenizer",
    "log_mel_spectrogram",
]
