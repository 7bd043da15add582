"""Data: manifest parsing (manifest.py), audio-text batches (audio_text.py), the offline demo sets."""
