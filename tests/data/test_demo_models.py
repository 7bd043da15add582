"""The demo models: real HF-format checkpoints that our loaders read, byte-identical across processes."""

import hashlib
import subprocess
import sys
from pathlib import Path

from data.demo_models import build_wordpiece, ensure_demo_instructblip, ensure_demo_models, SPECIAL_TOKENS
from models import (load_audio_encoder, load_instructblip, load_instructblip_tokenizers, load_text_encoder,
                    load_tokenizer)

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["Three short high beeps then a low hum", "a rising chirp", "What colour is the shape?", "red", "two"]


def write_texts(path: Path) -> Path:
    path.write_text("\n".join(TEXTS) + "\n")
    return path


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(path.relative_to(directory).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_demo_checkpoints_are_identical_across_processes(tmp_path):
    texts = write_texts(tmp_path / "texts.txt")
    script = ("import sys; from data.demo_models import ensure_demo_models, ensure_demo_instructblip; "
              "ensure_demo_models(sys.argv[1], sys.argv[2], verbose=False); "
              "ensure_demo_instructblip(sys.argv[3], sys.argv[2], verbose=False)")
    for run in ("a", "b"):  # separate processes: a per-process hash order would show up here
        subprocess.run([sys.executable, "-c", script, str(tmp_path / run / "towers"), str(texts),
                        str(tmp_path / run / "vqa")],
                       cwd=ROOT, check=True)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_demo_checkpoints_load_through_the_public_loaders(tmp_path):
    texts = write_texts(tmp_path / "texts.txt")
    towers = ensure_demo_models(tmp_path / "towers", texts, verbose=False)
    assert load_audio_encoder(towers["audio_model"]).config.num_mel_bins == 128
    assert load_text_encoder(towers["text_model"]).config.hidden_size == 128
    assert load_tokenizer(towers["text_model"]).encode("a low hum").tokens == ["[CLS]", "a", "low", "hum", "[SEP]"]
    vqa = ensure_demo_instructblip(tmp_path / "vqa", texts, verbose=False)
    model = load_instructblip(vqa)
    qformer_tok, t5_tok = load_instructblip_tokenizers(vqa)
    assert (t5_tok.encode("red").tokens == ["red", "</s>"]
            and qformer_tok.encode("red").tokens == ["[CLS]", "red", "[SEP]"])
    assert model.config.num_query_tokens == 8


def test_wordpiece_vocabulary_is_the_sorted_words_after_the_specials():
    tok = build_wordpiece(TEXTS, SPECIAL_TOKENS, "[UNK]", "[CLS] $A [SEP]")
    vocab = sorted(tok.get_vocab(), key=tok.get_vocab().get)
    assert vocab[: len(SPECIAL_TOKENS)] == SPECIAL_TOKENS
    assert vocab[len(SPECIAL_TOKENS):] == sorted(vocab[len(SPECIAL_TOKENS):]) and "colour" in vocab
    assert tok.encode("a purple hum").tokens == ["[CLS]", "a", "[UNK]", "hum", "[SEP]"]
