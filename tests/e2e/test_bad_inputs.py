"""Bad input cannot hurt a run: training manifests that mix good examples with every kind
of bad input, trained end to end by train.py on tiny towers.

    --on-bad-audio / --on-bad-image fail: each bad kind stops the run with an error naming its
                                          `manifest:line`, before training or when it is decoded
    skip: each is counted once over two epochs and listed in skipped.jsonl (path, manifest, line,
          reason); the losses stay finite; every good example reaches a training batch (recorded
          by wrapping train.train_step) and no bad one does

`audio_cases` and `image_cases` are the README's "Bad input" table: what each kind gets, and when
it is found ("manifest": when the manifest is read, before training; "file check": before training,
without decoding; "decoding": in the DataLoader, each time the example is drawn). The same tests
show the readers and decoders on their own: bad manifest lines collected (`bad_lines`) or raised,
invisible texts, 16-bit and CMYK images, decompression bombs, samples whose log-mel overflows.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

import train
from data.audio_text import AudioTextDataset, Skipped
from data.demo_models import SPECIAL_TOKENS, build_wordpiece, ensure_demo_instructblip, ensure_demo_models
from data.demo_shapes import ensure_shapes_set
from data.instructblip import read_vqa_manifest
from data.manifest import BadLine, ManifestError, load_manifest, read_manifest, text_problem
from models.audio import SAMPLE_RATE
from models.image import load_image
from tests.conftest import tone

BATCH = 4
CAPTIONS = ["a low tone", "a high tone", "a short beep", "a long hum", "silence", "a stereo tone",
            "a loud tone", "a quiet tone", "a tone then silence"]


@dataclass(frozen=True)
class Case:
    """One manifest line of a fuzz manifest: the kind of input, the row, and what it must get."""
    kind: str
    row: dict | str  # a JSON object, or a raw line (malformed JSON)
    reason: str | None = None  # None: a good example, which must train; else a fragment of the reason
    found: str = ""  # "manifest", "file check" or "decoding"
    file: str | None = None  # the audio/image file the line names, if any

    @property
    def good(self) -> bool:
        return self.reason is None


def manifest_text(cases: list[Case]) -> str:
    return "".join((c.row if isinstance(c.row, str) else json.dumps(c.row)) + "\n" for c in cases)


def seconds(duration: float, sr: int = SAMPLE_RATE) -> int:
    return round(duration * sr)


def write_wav(folder: Path, name: str, audio, sr: int = SAMPLE_RATE, subtype: str = "PCM_16") -> str:
    sf.write(folder / name, audio, sr, subtype=subtype)
    return name


def with_sample(value: float) -> np.ndarray:
    audio = tone(seconds(0.2))
    audio[100] = value
    return audio


def audio_cases(folder: Path) -> list[Case]:
    """Write every file, and return the lines of the skip run's manifest, good and bad mixed."""
    def good(name, caption, audio, sr=SAMPLE_RATE, subtype="PCM_16", kind=None):
        return Case(kind or name, {"audio": write_wav(folder, name, audio, sr, subtype), "text": caption}, file=name)

    def decoded(kind, name, reason):
        return Case(kind, {"audio": name, "text": "a low tone"}, reason, "decoding", name)

    def bad_line(kind, row, reason):  # a line the manifest reader cannot take; the file it names is a good one
        name = f"line_{kind.replace(' ', '_')}.wav"
        write_wav(folder, name, tone(seconds(0.3), freq=300))
        row = row if isinstance(row, str) else {"audio": name, **row}
        return Case(kind, row, reason, "manifest", name)

    (folder / "empty.wav").write_bytes(b"")
    (folder / "not_audio.wav").write_text("this is a text file, not audio\n" * 20)
    header = (folder / write_wav(folder, "whole.wav", tone(seconds(0.3)))).read_bytes()
    (folder / "truncated_header.wav").write_bytes(header[:20])  # RIFF....WAVEfmt and half a chunk size
    for name, value in (("nan.wav", np.nan), ("inf.wav", np.inf), ("neginf.wav", -np.inf), ("huge.wav", 1e30)):
        write_wav(folder, name, with_sample(value), subtype="FLOAT")  # a float WAV keeps any float32
    write_wav(folder, "one_sample.wav", tone(seconds(0.2))[:1])
    write_wav(folder, "20ms.wav", tone(seconds(0.02)))  # 320 samples: 2 log-mel frames, no encoder output
    write_wav(folder, "two_samples.wav", tone(seconds(0.2))[:2])
    return [
        good("tone_0.wav", "a low tone", tone(seconds(0.3), freq=200)),
        Case("missing file", {"audio": "missing.wav", "text": "a low tone"}, "audio file not found", "file check",
             "missing.wav"),
        good("stereo_8k_24bit.wav", "a stereo tone", tone(seconds(0.4, 8000), sr=8000, channels=2), sr=8000,
             subtype="PCM_24", kind="8 kHz 24-bit stereo"),
        Case("empty file", {"audio": "empty.wav", "text": "a low tone"}, "empty (0 bytes)", "file check", "empty.wav"),
        # the header check before training finds it
        Case("truncated header", {"audio": "truncated_header.wav", "text": "a low tone"},
             "audio file cannot be decoded", "file check", "truncated_header.wav"),
        bad_line("malformed JSON", '{"audio": "line_malformed_JSON.wav", "text": "a low tone}', "invalid JSON"),
        good("tone_1.wav", "a high tone", tone(seconds(0.25), freq=900)),
        Case("not audio", {"audio": "not_audio.wav", "text": "a low tone"}, "audio file cannot be decoded",
             "file check", "not_audio.wav"),
        bad_line("missing audio key", '{"text": "a high tone"}', 'missing "audio"'),
        good("surround_96k.wav", "a loud tone", tone(seconds(0.3, 96000), sr=96000, channels=6), sr=96000,
             kind="96 kHz 6-channel"),
        bad_line("missing caption key", {}, 'neither "text" nor "captions"'),
        decoded("NaN samples", "nan.wav", "non-finite samples"),
        bad_line("empty caption", {"text": ""}, '"text" is empty'),
        good("long_45s.wav", "a long hum", tone(seconds(45.0), freq=120, amplitude=0.1), kind="45 s"),
        decoded("inf samples", "inf.wav", "non-finite samples"),
        bad_line("whitespace caption", {"text": " \t "}, '"text" is empty'),
        good("zeros.wav", "silence", np.zeros(4000, dtype=np.float32), kind="all zeros"),
        decoded("1e30 samples", "huge.wav", "log-mel is non-finite"),
        bad_line("non-string caption", {"text": 7}, '"text" must be a string'),
        good("tone_2.wav", "a short beep", tone(seconds(0.2), freq=1500)),
        decoded("1 sample", "one_sample.wav", "too short"),
        bad_line("invisible caption", {"text": "\u200b"}, "tokenizes to nothing"),
        good("tone_3.wav", "a quiet tone", tone(seconds(0.35), freq=250, amplitude=0.05)),
        decoded("20 ms", "20ms.wav", "too short"),
        decoded("-inf samples", "neginf.wav", "non-finite samples"),
        decoded("2 samples", "two_samples.wav", "too short"),
        good("tone_4.wav", "a tone then silence", np.concatenate([tone(seconds(0.2)), np.zeros(1600, np.float32)])),
    ]


@pytest.fixture(scope="module")
def audio_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-audio")
    (root / "captions.txt").write_text("".join(c + "\n" for c in CAPTIONS))
    towers = ensure_demo_models(root / "towers", root / "captions.txt", seed=0, verbose=False)
    (root / "clips").mkdir()
    return {**towers, "root": root, "folder": root / "clips", "cases": audio_cases(root / "clips")}


def audio_args(audio_set, manifest, out, *extra):
    return ["--audio-model", audio_set["audio_model"], "--text-model", audio_set["text_model"],
            "--train-data", str(manifest), "--output-dir", str(out), "--batch-size", str(BATCH), "--workers", "0",
            "--eval-every", "0", "--save-every", "0", "--warmup-steps", "1", "--rank", "4",
            "--cache-dir", str(audio_set["root"] / "cache"), *extra]


class Reached:
    """Wraps train.train_step: the (file, manifest line) of every example that reached a training
    batch, and every Skipped marker the batches carried (one per decode, so one per epoch)."""

    def __init__(self, monkeypatch):
        self.examples, self.skip_markers = [], []
        real = train.train_step

        def recording(task, model, micro_batches, *args, **kwargs):
            for batch in micro_batches:
                self.examples += [(Path(p).name, line) for p, line in zip(batch["paths"], batch["lines"])]
                self.skip_markers += [Path(s.path).name for s in batch["skipped"]]
            return real(task, model, micro_batches, *args, **kwargs)

        monkeypatch.setattr(train, "train_step", recording)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_skip_run(out: Path, manifest: Path, cases: list[Case], reached: Reached, printed: str, first_line: int = 1):
    """What a finished skip run must show for `cases`, the manifest's lines from `first_line` on."""
    bad = {line: c for line, c in enumerate(cases, start=first_line) if not c.good}
    good = {line: c for line, c in enumerate(cases, start=first_line) if c.good}
    # every good example trained on, in both epochs; no bad one ever reached a batch
    trained = [line for _, line in reached.examples]
    assert {line: trained.count(line) >= 2 for line in good} == {line: True for line in good}
    assert set(trained) == set(good)
    assert {name for name, _ in reached.examples} == {c.file for c in good.values()}
    # each bad input listed once, under its file (or its manifest:line when no file is at fault)
    listed = read_jsonl(out / "skipped.jsonl")
    assert sorted(entry["line"] for entry in listed) == sorted(bad)
    for entry in listed:
        case = bad[entry["line"]]
        assert entry["manifest"] == str(manifest) and case.reason in entry["reason"], (case.kind, entry)
        expected_path = f"{manifest}:{entry['line']}" if case.found == "manifest" else str(manifest.parent / case.file)
        assert entry["path"] == expected_path, (case.kind, entry)
    assert f"skipped inputs: {len(bad)}" in printed
    # files found by decoding were decoded (and skipped) in every epoch, yet counted and printed once
    for case in bad.values():
        if case.found == "decoding":
            assert reached.skip_markers.count(case.file) >= 2, case.kind
            assert printed.count(f"skipped {manifest.parent / case.file} ") == 1, case.kind
    records = read_jsonl(out / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and np.isfinite(losses).all() and not [r for r in records if "nonfinite" in r]
    assert max(r["epoch"] for r in records if "loss" in r) >= 1  # two epochs at least


def test_skip_trains_every_good_clip_and_counts_each_bad_input_once(audio_set, tmp_path, monkeypatch, capsys):
    cases = audio_set["cases"]
    decoded = sum(c.found == "decoding" for c in cases)
    assert (sum(c.good for c in cases) + decoded) % BATCH == 0  # no partial batch dropped: each epoch sees all
    manifest = audio_set["folder"] / "skip.jsonl"
    manifest.write_text(manifest_text(cases))
    reached = Reached(monkeypatch)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"skip\.jsonl:14: .*long_45s\.wav is 45\.00 s long; truncating it to 30 s"):
        assert train.main(audio_args(audio_set, manifest, out, "--epochs", "2", "--on-bad-audio", "skip")) == 0
    check_skip_run(out, manifest, cases, reached, capsys.readouterr().out)


def test_skips_from_worker_processes_of_a_clotho_csv_are_counted_once(audio_set, tmp_path, monkeypatch, capsys):
    """Clotho CSV rows with a missing or an empty cell, and clips that fail to decode in two
    DataLoader workers over two epochs: each listed once, every good row trained on."""
    def row(kind, name, captions="a low tone,a high tone,a short beep,a long hum,silence", reason=None, found=""):
        return Case(kind, f"{name},{captions}", reason, found, name)

    cases = [row("tone 0", "tone_0.wav"), row("tone 1", "tone_1.wav"),
             row("missing cell", "line_empty_caption.wav", "a low tone,a high tone,silence,a long hum",
                 "5 cells, but the header on line 1 has 6", "manifest"),
             row("tone 2", "tone_2.wav"), row("nan", "nan.wav", reason="non-finite samples", found="decoding"),
             row("empty cell", "line_whitespace_caption.wav", "a low tone,,silence,a long hum,a tone",
                 'column "caption_2" is empty', "manifest"),
             row("zeros", "zeros.wav"), row("tone 3", "tone_3.wav"), row("tone 4", "tone_4.wav"),
             row("inf", "inf.wav", reason="non-finite samples", found="decoding")]
    assert (sum(c.good for c in cases) + 2) % BATCH == 0
    manifest = audio_set["folder"] / "clotho_captions_fuzz.csv"
    manifest.write_text("file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n" + manifest_text(cases))
    reached = Reached(monkeypatch)
    out = tmp_path / "run"
    assert train.main(audio_args(audio_set, manifest, out, "--epochs", "2", "--on-bad-audio", "skip",
                                 "--workers", "2")) == 0
    check_skip_run(out, manifest, cases, reached, capsys.readouterr().out, first_line=2)


BAD_AUDIO = ["missing file", "empty file", "truncated header", "malformed JSON", "not audio", "missing audio key",
             "missing caption key", "NaN samples", "empty caption", "inf samples", "whitespace caption", "1e30 samples",
             "non-string caption", "1 sample", "invisible caption", "20 ms", "-inf samples", "2 samples"]


def test_the_fail_cases_are_the_skip_run_s_bad_cases(audio_set):
    assert sorted(BAD_AUDIO) == sorted(c.kind for c in audio_set["cases"] if not c.good)


@pytest.mark.parametrize("kind", BAD_AUDIO)
def test_fail_stops_at_each_bad_clip_naming_its_line(audio_set, tmp_path, capsys, kind):
    cases = {c.kind: c for c in audio_set["cases"]}
    tones = [cases[f"tone_{k}.wav"] for k in range(4)]
    manifest = audio_set["folder"] / f"fail_{kind.replace(' ', '_')}.jsonl"
    manifest.write_text(manifest_text(tones[:2] + [cases[kind]] + tones[2:]))  # the bad one on line 3
    out = tmp_path / "run"
    assert train.main(audio_args(audio_set, manifest, out, "--max-steps", "2", "--batch-size", "5",
                                 "--no-feature-cache")) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {manifest}:3: ") and cases[kind].reason in error, error
    assert "--on-bad-audio skip" in error  # and what to do
    records = read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    assert not [r for r in records if "loss" in r]  # stopped before any update


def test_evaluation_manifests_stay_strict_under_skip(audio_set, tmp_path, capsys):
    cases = {c.kind: c for c in audio_set["cases"]}
    tones = [cases[f"tone_{k}.wav"] for k in range(4)]
    train_manifest = audio_set["folder"] / "strict_train.jsonl"
    train_manifest.write_text(manifest_text(tones))
    for kind in ("malformed JSON", "missing file"):
        eval_manifest = audio_set["folder"] / "strict_eval.jsonl"
        eval_manifest.write_text(manifest_text([tones[0], cases[kind]]))
        code = train.main(audio_args(audio_set, train_manifest, tmp_path / kind, "--max-steps", "1",
                                     "--on-bad-audio", "skip", "--eval-data", str(eval_manifest),
                                     "--no-feature-cache"))
        error = capsys.readouterr().err
        assert code == 2 and error.startswith(f"error: {eval_manifest}:2: ") and cases[kind].reason in error, error


# --- InstructBLIP ----------------------------------------------------------------------------


def image_cases(folder: Path, shapes: dict) -> list[Case]:
    """Write the odd and bad images, and return the skip run's manifest lines, good and bad mixed."""
    rows = read_jsonl(Path(shapes["train"]))
    base = Path(shapes["dir"])

    def good(k):
        row = {**rows[k], "image": str(base / rows[k]["image"])}
        return Case(f"shapes line {k + 1}", row, file=Path(row["image"]).name)

    def image(kind, name, reason=None, found=""):
        return Case(kind, {"image": name, "prompt": rows[0]["prompt"], "answer": rows[0]["answer"]}, reason, found,
                    name)

    def bad_line(kind, row, reason):  # an image the manifest reader never gets to
        return Case(kind, row if isinstance(row, str) else {**rows[1], "image": str(base / rows[1]["image"]), **row},
                    reason, "manifest")

    picture = Image.open(base / rows[0]["image"]).convert("RGB")
    picture.convert("CMYK").save(folder / "cmyk.jpg")
    grey = np.asarray(picture.convert("L"), dtype=np.uint16) * 257  # 0..65535: 16 bits used in full
    Image.fromarray(grey).save(folder / "grey16.png")
    assert Image.open(folder / "cmyk.jpg").mode == "CMYK" and Image.open(folder / "grey16.png").mode == "I;16"
    (folder / "empty.png").write_bytes(b"")
    (folder / "not_an_image.png").write_text("this is text, not a PNG\n" * 10)
    picture.save(folder / "whole.png")
    picture.save(folder / "whole.jpg")
    for name in ("whole.png", "whole.jpg"):
        data = (folder / name).read_bytes()
        (folder / f"truncated{Path(name).suffix}").write_bytes(data[: len(data) // 2])
    data = (folder / "whole.png").read_bytes()  # a header PIL reads, pixels it cannot: found only by decoding
    (folder / "cut_late.png").write_bytes(data[: len(data) * 3 // 4])
    (folder / "cut_early.png").write_bytes(data[: len(data) // 4])
    too_long = "what colour is the shape " * 40  # 200 words: over the 128-token budget
    shared = str(base / rows[2]["image"])  # two over-long questions about an image other lines train on
    return [
        good(0), image("CMYK JPEG", "cmyk.jpg"),
        image("missing image", "missing.png", "image file not found", "file check"),
        good(1), image("unreadable image", "not_an_image.png", "image file cannot be read", "file check"),
        bad_line("malformed JSON", '{"image": "a.png", "prompt": "what colour?"', "invalid JSON"),
        good(2), image("16-bit PNG", "grey16.png"),
        image("empty image", "empty.png", "image file is empty", "file check"),
        Case("over-long prompt", {"image": shared, "prompt": too_long, "answer": "red"}, "prompt in Q-Former tokens",
             "manifest"),
        good(3), image("truncated PNG", "truncated.png", "cannot decode the image", "decoding"),
        bad_line("missing key", '{"image": "a.png", "prompt": "what colour?"}', 'missing "answer"'),
        good(4), bad_line("empty prompt", {"prompt": "  "}, '"prompt" is empty'),
        image("truncated JPEG", "truncated.jpg", "image file cannot be read", "file check"),
        good(5), bad_line("non-string answer", {"answer": 3}, '"answer" must be a string'),
        Case("over-long prompt again", {"image": shared, "prompt": "how many " + too_long, "answer": "two"},
             "prompt in Q-Former tokens", "manifest"),
        good(6), bad_line("invisible prompt", {"prompt": "\ufeff\u200b"}, "tokenizes to nothing"),
        Case("over-long answer", {"image": shared, "prompt": rows[0]["prompt"], "answer": "red " * 300},
             "answer in T5 tokens", "manifest"),
        good(7), image("PNG cut at 3 quarters", "cut_late.png", "cannot decode the image", "decoding"),
        good(8), good(9), image("PNG cut at 1 quarter", "cut_early.png", "cannot decode the image", "decoding"),
        good(10),
    ]


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-images")
    shapes = ensure_shapes_set(root / "shapes", n_train=11, n_eval=3, image_size=64, seed=0, verbose=False)
    model = ensure_demo_instructblip(root / "model", shapes["texts"], seed=0, verbose=False)
    (root / "images").mkdir()
    return {"model": model, "root": root, "folder": root / "images", "cases": image_cases(root / "images", shapes)}


def image_args(image_set, manifest, out, *extra):
    return ["--task", "instructblip", "--model", image_set["model"], "--train-data", str(manifest),
            "--output-dir", str(out), "--batch-size", str(BATCH), "--workers", "0", "--eval-every", "0",
            "--save-every", "0", "--warmup-steps", "1", "--rank", "4", *extra]


def test_skip_trains_every_good_example_and_counts_each_bad_one_once(image_set, tmp_path, monkeypatch, capsys):
    cases = image_set["cases"]
    decoded = sum(c.found == "decoding" for c in cases)
    assert (sum(c.good for c in cases) + decoded) % BATCH == 0
    manifest = image_set["folder"] / "skip.jsonl"
    manifest.write_text(manifest_text(cases))
    reached = Reached(monkeypatch)
    out = tmp_path / "run"
    assert train.main(image_args(image_set, manifest, out, "--epochs", "2", "--on-bad-image", "skip")) == 0
    check_skip_run(out, manifest, cases, reached, capsys.readouterr().out)


BAD_IMAGES = ["missing image", "unreadable image", "malformed JSON", "empty image", "over-long prompt",
              "truncated PNG", "missing key", "empty prompt", "truncated JPEG", "non-string answer",
              "invisible prompt", "over-long answer", "PNG cut at 3 quarters", "PNG cut at 1 quarter"]


def test_the_image_fail_cases_are_the_skip_run_s_bad_cases(image_set):
    assert sorted(BAD_IMAGES + ["over-long prompt again"]) == sorted(c.kind for c in image_set["cases"] if not c.good)


@pytest.mark.parametrize("kind", BAD_IMAGES)
def test_fail_stops_at_each_bad_example_naming_its_line(image_set, tmp_path, capsys, kind):
    cases = {c.kind: c for c in image_set["cases"]}
    goods = [c for c in image_set["cases"] if c.kind.startswith("shapes")][:4]
    manifest = image_set["folder"] / f"fail_{kind.replace(' ', '_')}.jsonl"
    manifest.write_text(manifest_text(goods[:2] + [cases[kind]] + goods[2:]))  # the bad one on line 3
    assert train.main(image_args(image_set, manifest, tmp_path / "run", "--max-steps", "1", "--batch-size", "5")) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {manifest}:3: ") and cases[kind].reason in error, error
    assert "--on-bad-image skip" in error


# --- the readers and decoders on their own ---------------------------------------------------


def test_manifest_readers_collect_bad_lines_when_asked_and_raise_otherwise(tmp_path):
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text('{"audio": "a.wav", "text": "a dog"}\n{"audio": "b.wav", "text": \n\n'
                     '{"audio": "c.wav", "captions": ["ok", 3]}\n'
                     '{"audio": "a.wav", "text": "barking"}\n')
    bad: list[BadLine] = []
    clips, _ = load_manifest(jsonl, bad_lines=bad)
    assert [(c.audio.name, c.captions, c.line) for c in clips] == [("a.wav", ("a dog", "barking"), 1)]
    assert [(b.where, b.line) for b in bad] == [(f"{jsonl}:2", 2), (f"{jsonl}:4", 4)]
    assert "invalid JSON" in bad[0].reason and '"captions"[1] must be a string' in bad[1].reason
    with pytest.raises(ManifestError, match=f"{jsonl}:2: invalid JSON"):
        read_manifest(jsonl)  # no list given: the first bad line is the error

    clotho = tmp_path / "clotho.csv"
    clotho.write_text("file_name,caption_1,caption_2\na.wav,x,y\nb.wav,x\nc.wav,x,\n,x,y\nd.wav,x,y\n")
    bad = []
    assert [c.audio.name for c in read_manifest(clotho, tmp_path, bad_lines=bad)] == ["a.wav", "d.wav"]
    assert [(b.line, b.reason.split(";")[0]) for b in bad] == [
        (3, "2 cells, but the header on line 1 has 3"), (4, 'column "caption_2" is empty'),
        (5, 'column "file_name" is empty')]
    audiocaps = tmp_path / "audiocaps.csv"
    audiocaps.write_text("audiocap_id,youtube_id,start_time,caption\n1,yt1,30,a car\n2,yt1,30,\u200b\n3,,0,birds\n")
    bad = []
    [clip] = read_manifest(audiocaps, tmp_path, bad_lines=bad)
    assert clip.captions == ("a car",) and [b.line for b in bad] == [3, 4]

    # whole-file problems stay errors, list or not
    (tmp_path / "h.csv").write_text("path,sentence\na.wav,x\n")
    with pytest.raises(ManifestError, match="unknown CSV header"):
        read_manifest(tmp_path / "h.csv", bad_lines=[])
    (tmp_path / "all_bad.jsonl").write_text('{"audio": "a.wav"}\nnot json\n')
    with pytest.raises(ManifestError,
                       match=r"none of its 2 rows can be read \(the first, .*all_bad\.jsonl:1: has neither"):
        read_manifest(tmp_path / "all_bad.jsonl", bad_lines=[])


def test_vqa_reader_collects_bad_lines_when_asked(tmp_path):
    manifest = tmp_path / "vqa.jsonl"
    manifest.write_text('{"image": "a.png", "prompt": "what?", "answer": "red"}\n[1, 2]\n'
                        '{"image": "b.png", "prompt": "\\u200b", "answer": "red"}\n'
                        '{"image": "c.png", "prompt": "what?"}\n')
    bad = []
    [example] = read_vqa_manifest(manifest, bad_lines=bad)
    assert example.line == 1 and [b.line for b in bad] == [2, 3, 4]
    assert "expected a JSON object" in bad[0].reason and "tokenizes to nothing" in bad[1].reason
    assert 'missing "answer"' in bad[2].reason
    with pytest.raises(ManifestError, match=f"{manifest}:2: expected a JSON object"):
        read_vqa_manifest(manifest)


@pytest.mark.parametrize("text", ["\u200b", "\ufeff", "\x00\x01", "\u0301\u0301", " \u3000 ", "\u2028"])
def test_an_invisible_text_tokenizes_to_nothing_and_is_refused(text):
    tokenizer = build_wordpiece(["a dog barks"], SPECIAL_TOKENS, "[UNK]", "[CLS] $A [SEP]")
    assert tokenizer.encode(text).tokens == ["[CLS]", "[SEP]"]  # what training would get: no word at all
    assert text_problem(text, '"text"') is not None


@pytest.mark.parametrize("text", ["a", "...", "7", "é", "\U0001f415", "a\u200bdog"])
def test_a_visible_text_is_accepted(text):
    assert text_problem(text, '"text"') is None


def test_16_bit_and_cmyk_images_decode_to_their_own_pixels(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    assert Image.open(tmp_path / "ramp16.png").mode == "I;16"
    rgb = np.asarray(load_image(tmp_path / "ramp16.png"))
    assert rgb.shape == (64, 64, 3) and (rgb == (ramp >> 8)[:, :, None]).all()  # Pillow's own convert: ~all 255
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "red.jpg")  # cyan 0, magenta and yellow full: red
    red = np.asarray(load_image(tmp_path / "red.jpg")).astype(int)
    assert abs(red - [255, 0, 0]).max() <= 2


def test_an_image_over_the_decompression_bomb_limit_is_a_bad_image(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 3)  # over twice the limit: Pillow refuses to decode
    with pytest.raises(ValueError, match="too large to decode safely"):
        load_image(tmp_path / "big.png")


def test_finite_samples_whose_log_mel_overflows_are_bad_audio(tmp_path):
    write_wav(tmp_path, "huge.wav", with_sample(1e30), subtype="FLOAT")
    (tmp_path / "m.jsonl").write_text('{"audio": "huge.wav", "text": "a tone"}\n')
    item = AudioTextDataset(read_manifest(tmp_path / "m.jsonl"), on_bad_audio="skip", n_mels=128)[0]
    assert isinstance(item, Skipped) and "log-mel is non-finite" in item.reason and "1e+30" in item.reason
