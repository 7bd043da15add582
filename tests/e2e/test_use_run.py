"""Using a trained run: models.audio_text.load_run + embed_audio / embed_text reproduce eval.py and
training exactly (fp32 and bf16); eval.py --search with its index; eval.py --zero-shot."""

import csv
import json
import re
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import eval as evaluation
import train
from evaluation.retrieval import retrieval_metrics
from data.audio_text import captions_flat
from data.demo_models import ensure_demo_models
from data.demo_sounds import ensure_demo_set
from data.manifest import read_manifest
from models.audio_text import AudioTextModel, load_run

TARGETS = r"audio_tower.*self_attn\.(q|k|v|out)_proj"
BATCH = 8


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """The demo set in small, and `library`: 8 training clips from 8 different minimal pairs, one caption each.

    The runs train on the library. The random-init towers learn slowly: a few dozen steps on 48 clips
    with all their captions put a clip first for its caption among 8 clips only 2 or 3 times in 8,
    while the library itself is learned well enough for search to find each clip by its caption."""
    root = tmp_path_factory.mktemp("demo")
    sounds = ensure_demo_set(root / "sounds", n_train=16, n_eval=16, seed=0, verbose=False)
    towers = ensure_demo_models(root / "towers", sounds["captions"], seed=0, verbose=False)
    library = root / "library.jsonl"
    rows = [{"audio": str(clip.audio), "text": clip.captions[0]} for clip in read_manifest(sounds["train"])[0:16:2]]
    library.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {**towers, "train": sounds["train"], "eval": sounds["eval"], "library": str(library)}


def train_run(demo, out, *extra):
    args = train.parse_args([
        "--targets", TARGETS, "--audio-model", demo["audio_model"], "--text-model", demo["text_model"],
        "--train-data", demo["library"], "--eval-data", demo["eval"], "--output-dir", str(out),
        "--batch-size", str(BATCH), "--workers", "0", "--lr", "3e-3", "--warmup-steps", "3", "--eval-every", "0",
        "--save-every", "0", *extra,
    ])
    _, history = train.train(args)
    return out, history


@pytest.fixture(scope="module")
def fp32_run(tiny_demo, tmp_path_factory):
    return train_run(tiny_demo, tmp_path_factory.mktemp("fp32"), "--max-steps", "48")


@pytest.fixture(scope="module")
def bf16_run(tiny_demo, tmp_path_factory):
    return train_run(tiny_demo, tmp_path_factory.mktemp("bf16"), "--max-steps", "3", "--precision", "bf16")


def api_recall(run_dir, manifest, **load_kwargs):
    """Recall from the Python API alone: load_run, embed_audio, embed_text, then eval's metric."""
    model = load_run(run_dir, **load_kwargs)
    clips = read_manifest(manifest)
    texts, text_audio_index = captions_flat(clips)
    audio = model.embed_audio([clip.audio for clip in clips], batch_size=BATCH)
    text = model.embed_text(texts)  # canonical chunks, as eval.py and training compute
    # numpy's matmul, as eval.py's: torch's may order the sums otherwise and move a near-tie by an ulp
    return retrieval_metrics(text.numpy() @ audio.numpy().T, np.asarray(text_audio_index))


@pytest.mark.parametrize("run", ["fp32_run", "bf16_run"])
def test_api_eval_and_training_give_the_same_recall(run, tiny_demo, request):
    out, history = request.getfixturevalue(run)
    from_api = api_recall(out, tiny_demo["eval"])
    from_eval = evaluation.main(["--checkpoint", str(out), "--batch-size", str(BATCH)])
    assert from_api == from_eval
    # the training loop's final evaluation, same batches: equal only if eval rebuilt the run's precision
    assert from_eval == history["after"]


def test_bf16_run_is_rebuilt_in_bf16_and_precision_can_be_overridden(bf16_run, tiny_demo):
    out, _ = bf16_run
    model = load_run(out)
    assert model.precision == "bf16"
    assert model.audio_tower.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16  # frozen: bf16
    assert model.audio_tower.layers[0].self_attn.q_proj.lora_A.weight.dtype == torch.float32  # LoRA: fp32
    assert model.audio_proj.weight.dtype == torch.float32 and model.logit_scale.dtype == torch.float32  # heads: fp32
    as_fp32 = load_run(out, precision="fp32")
    assert {p.dtype for p in as_fp32.parameters()} == {torch.float32} and as_fp32.precision == "fp32"
    clip = read_manifest(tiny_demo["eval"])[0].audio
    bf16, fp32 = model.embed_audio([clip]), as_fp32.embed_audio([clip])
    assert not torch.equal(bf16, fp32) and torch.allclose(bf16, fp32, atol=0.05)
    without = evaluation.main(["--checkpoint", str(out), "--no-adapter"])  # --no-adapter works on a bf16 run
    assert without["n_audio"] == 16


def test_embed_takes_paths_and_arrays_and_returns_unit_rows(fp32_run, tiny_demo):
    out, _ = fp32_run
    model = load_run(out)
    assert not model.training and model.tokenizer is not None
    paths = [clip.audio for clip in read_manifest(tiny_demo["eval"])[:3]]
    from_paths = model.embed_audio(paths)
    waveforms = [sf.read(path, dtype="float32")[0] for path in paths]  # the demo clips are 16 kHz mono
    assert torch.equal(model.embed_audio(waveforms), from_paths)
    assert torch.equal(model.embed_audio([torch.from_numpy(w) for w in waveforms]), from_paths)
    assert torch.equal(model.embed_audio(str(paths[1])), model.embed_audio([paths[1]]))
    assert from_paths.shape == (3, 256) and from_paths.dtype == torch.float32
    torch.testing.assert_close(from_paths.norm(dim=-1), torch.ones(3))
    text = model.embed_text(["a rising chirp", "two short high beeps", "silence"], batch_size=2)
    assert text.shape == (3, 256)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    # the same texts in another order, duplicated: the same set of texts, so the same canonical chunks
    # (models/text_cache.py), the same batches through the tower on the same shapes: the same bits
    again = model.embed_text(["silence", "two short high beeps", "a rising chirp", "silence"], batch_size=2)
    assert torch.equal(again, text[[2, 1, 0, 2]])
    model.train()
    model.embed_text(["silence"])
    assert model.training  # the caller's mode is restored


def test_load_run_refuses_an_instructblip_run_and_a_plain_folder(tmp_path):
    (tmp_path / "run_config.json").write_text(json.dumps({"task": "instructblip"}))
    with pytest.raises(ValueError, match="task 'instructblip'"):
        load_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="output directory of train.py"):
        load_run(tmp_path / "nothing")


# ---- search ----------------------------------------------------------------------------------------

@pytest.fixture()
def library(tiny_demo, tmp_path):
    """The library's clips in nested folders, plus a non-audio file."""
    clips = read_manifest(tiny_demo["library"])
    folder = tmp_path / "library"
    for i, clip in enumerate(clips):
        target = folder / f"group {i % 3}" / f"clip_{i}.wav"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(clip.audio, target)
    (folder / "notes.txt").write_text("not audio")
    return folder, clips


def count_embedded(monkeypatch):
    counted = []
    real = AudioTextModel.embed_audio

    def spy(self, items, *args, **kwargs):
        counted.extend(items)
        return real(self, items, *args, **kwargs)

    monkeypatch.setattr(AudioTextModel, "embed_audio", spy)
    return counted


def test_search_ranks_each_clip_first_for_its_own_caption(fp32_run, library, tmp_path):
    out, _ = fp32_run
    folder, clips = library
    index = tmp_path / "index.npz"
    firsts = []
    for i, clip in enumerate(clips):
        results = evaluation.main(["--checkpoint", str(out), "--search", clip.captions[0], "--audio-dir", str(folder),
                                   "--top", "3", "--index", str(index)])
        firsts.append(results[0]["path"] == f"group {i % 3}/clip_{i}.wav")
    assert sum(firsts) >= 6, firsts  # chance is 1 in 8 per clip; two of the eight are near twins for this tiny model


def test_search_scores_are_the_api_similarities(fp32_run, library, tmp_path, capsys):
    out, _ = fp32_run
    folder, _ = library
    query = "two slow clicks then a hum"
    results = evaluation.main(["--checkpoint", str(out), "--search", query, "--audio-dir", str(folder), "--top", "8",
                               "--index", str(tmp_path / "i.npz"), "--json", str(tmp_path / "r.json")])
    model = load_run(out)
    files = sorted(folder.rglob("*.wav"), key=lambda p: p.relative_to(folder).as_posix())
    # eval.py's arithmetic: the files in one batch of the run's size, then numpy's matrix-vector product;
    # other batches or torch's product could move two close scores by an ulp and swap them
    scores = model.embed_audio(files, batch_size=BATCH).numpy() @ model.embed_text([query]).numpy()[0]
    expected = sorted(zip(-scores, [f.relative_to(folder).as_posix() for f in files]))
    assert [r["path"] for r in results] == [name for _, name in expected]
    np.testing.assert_allclose([r["score"] for r in results], [-s for s, _ in expected], atol=1e-6)
    assert json.loads((tmp_path / "r.json").read_text())["results"] == results
    printed = capsys.readouterr().out
    assert f'"{query}": top 8 of 8 clips' in printed and results[0]["path"] in printed.splitlines()[1]


def test_search_index_is_reused_until_the_folder_or_checkpoint_changes(fp32_run, library, tmp_path, monkeypatch):
    out, _ = fp32_run
    folder, _ = library
    embedded = count_embedded(monkeypatch)
    index = tmp_path / "index.npz"

    def search(*extra):
        embedded.clear()
        evaluation.main(["--checkpoint", str(out), "--search", "a pause", "--audio-dir", str(folder),
                         "--index", str(index), *extra])
        return sorted(Path(p).name for p in embedded)

    assert len(search()) == 8  # first time: every clip
    assert search() == []  # unchanged: nothing
    touched = folder / "group 1" / "clip_1.wav"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    assert search() == ["clip_1.wav"]  # a newer modification time: that clip again
    shutil.copy2(folder / "group 0" / "clip_0.wav", folder / "group 0" / "é, copy.wav")
    (folder / "group 2" / "clip_2.wav").unlink()
    assert search() == ["é, copy.wav"]  # a new file embedded, a vanished one dropped
    assert sorted(np.load(index)["paths"].tolist())[-1] == "group 2/clip_5.wav"
    assert "group 2/clip_2.wav" not in np.load(index)["paths"].tolist()
    assert len(search("--no-adapter")) == 8  # another checkpoint: rebuilt
    index.write_bytes(b"damaged")
    assert len(search()) == 8  # a damaged index is rebuilt, never used


def test_search_over_a_manifest_and_the_default_index_in_the_run(fp32_run, tiny_demo, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(fp32_run[0], out)
    clips = read_manifest(tiny_demo["eval"])
    results = evaluation.main(["--checkpoint", str(out), "--search", clips[0].captions[0], "--data", tiny_demo["eval"],
                               "--top", "16"])
    assert sorted(r["path"] for r in results) == sorted(f"audio/{Path(c.audio).name}" for c in clips)
    assert len(list(out.glob("search-index-*.npz"))) == 1


# ---- zero-shot ------------------------------------------------------------------------------------

LABELS = ["high_beeps", "rising-chirp", "white noise", "slow clicks", "silence", "low_hum", "pink noise"]


@pytest.fixture()
def classes(tiny_demo, tmp_path):
    """The 16 eval clips in 7 class folders (class = clip index mod 7): ROOT/<label>/*.wav."""
    root = tmp_path / "classes"
    for i, clip in enumerate(read_manifest(tiny_demo["eval"])):
        (root / LABELS[i % 7]).mkdir(parents=True, exist_ok=True)
        shutil.copy2(clip.audio, root / LABELS[i % 7] / Path(clip.audio).name)
    return root


def recompute(run_dir, files, labels, template):
    """Zero-shot accuracies from the API's embeddings, written out independently of eval.py."""
    model = load_run(run_dir)
    names = sorted(set(labels))
    prompts = [template.replace("{label}", name.replace("_", " ").replace("-", " ")) for name in names]
    text = model.embed_text(prompts, batch_size=BATCH).numpy()  # eval.py's chunks
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    # in eval.py's batches (the run's batch size): a batch of other clips pads to another length, which can
    # move an embedding by an ulp and flip a near-tie
    similarity = model.embed_audio(files, batch_size=BATCH).numpy() @ text.T  # (N, C)
    truth = np.array([names.index(label) for label in labels])
    ranks = np.array([(similarity[i] > similarity[i, truth[i]]).sum() for i in range(len(truth))])
    correct = ranks == 0
    return {"accuracy": correct.mean(), "top5": (ranks < 5).mean(),
            "per_class": {name: correct[truth == c].mean() for c, name in enumerate(names)}}


def test_zero_shot_accuracy_equals_an_independent_recomputation(fp32_run, classes, tmp_path, capsys):
    out, _ = fp32_run
    metrics = evaluation.main(["--checkpoint", str(out), "--zero-shot", str(classes), "--template", "{label}",
                               "--json", str(tmp_path / "z.json")])
    files = sorted(classes.rglob("*.wav"), key=lambda p: p.relative_to(classes).as_posix())
    expected = recompute(out, files, [f.parent.name for f in files], "{label}")
    assert metrics["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
    assert metrics["top5"] == pytest.approx(expected["top5"], abs=1e-12)
    assert metrics["per_class"] == pytest.approx(expected["per_class"], abs=1e-12)
    assert metrics["n"] == 16 and metrics["n_classes"] == 7 and 0 <= metrics["accuracy"] <= metrics["top5"] < 1
    assert json.loads((tmp_path / "z.json").read_text()) == metrics
    printed = capsys.readouterr().out
    assert f"top-1 {100 * metrics['accuracy']:.2f}%, top-5 {100 * metrics['top5']:.2f}%" in printed
    assert "rising-chirp" in printed  # per class, under the folder's own name


def test_zero_shot_from_a_csv_equals_the_class_folders(fp32_run, classes, tmp_path):
    out, _ = fp32_run
    files = sorted(classes.rglob("*.wav"), key=lambda p: p.relative_to(classes).as_posix())
    table = tmp_path / "meta" / "labels.csv"
    table.parent.mkdir()
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([["filename", "fold", "category"]]
                                + [[f"{p.parent.name}/{p.name}", 1, p.parent.name] for p in files])
    args = ["--checkpoint", str(out), "--template", "a {label}", "--template", "{label}"]
    from_csv = evaluation.main([*args, "--zero-shot", str(table), "--audio-dir", str(classes)])
    from_folders = evaluation.main([*args, "--zero-shot", str(classes)])
    assert from_csv == from_folders and from_csv["templates"] == ["a {label}", "{label}"]


def refused(argv, capsys) -> str:
    """eval.py's `error:` line for argv, which must exit with status 2: the last line, after the
    unreadable files it may list, one a line."""
    with pytest.raises(SystemExit) as exit_info:
        evaluation.main(argv)
    lines = capsys.readouterr().err.splitlines()
    assert (exit_info.value.code == 2 and lines[-1].startswith("error: ")
            and not any("Traceback" in x for x in lines)), lines
    return lines[-1]


def test_zero_shot_refusals_name_the_problem(fp32_run, classes, tmp_path, capsys):
    out, _ = fp32_run
    assert "has no {label}" in refused(["--checkpoint", str(out), "--zero-shot", str(classes),
                                        "--template", "the sound of"], capsys)
    bad = tmp_path / "bad.csv"
    bad.write_text("file,tag\na.wav,dog\n")
    assert "bad.csv:1: the header must name a file column" in refused(
        ["--checkpoint", str(out), "--zero-shot", str(bad)], capsys)
    (classes / "high_beeps" / "broken.wav").write_bytes(b"RIFF not really")
    assert re.search("1 clip.* cannot be read",
                     refused(["--checkpoint", str(out), "--zero-shot", str(classes)], capsys))
