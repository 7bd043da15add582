"""data/manifest.py: every manifest format, path resolution, grouping, and errors that name the
manifest file and the 1-based line."""

import json
from pathlib import Path

import pytest

from data.manifest import Clip, ManifestError, check_files, read_manifest


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(*rows) -> str:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


def test_jsonl_text_and_captions_relative_to_the_manifest_folder(tmp_path):
    manifest = write(tmp_path / "sets" / "train.jsonl", jsonl(
        {"audio": "clips/a.wav", "text": "a dog barks", "duration": 3.2},  # extra keys are ignored
        {"audio": "../elsewhere/b.flac", "captions": ["rain", "rain on a roof"]},
        {"audio": str(tmp_path / "abs.wav"), "text": "absolute"},
    ))
    clips = read_manifest(manifest)
    assert clips == [
        Clip(tmp_path / "sets" / "clips" / "a.wav", ("a dog barks",), str(manifest), 1),
        Clip(tmp_path / "elsewhere" / "b.flac", ("rain", "rain on a roof"), str(manifest), 2),
        Clip(tmp_path / "abs.wav", ("absolute",), str(manifest), 3),
    ]
    assert all(clip.audio.is_absolute() for clip in clips)
    assert clips[1].where == f"{manifest}:2"


def test_audio_dir_overrides_the_manifest_folder(tmp_path):
    manifest = write(tmp_path / "m.json", jsonl({"audio": "a.wav", "text": "x"}))
    [clip] = read_manifest(manifest, audio_dir=tmp_path / "audio")
    assert clip.audio == tmp_path / "audio" / "a.wav"


def test_jsonl_rows_of_one_file_are_grouped_and_blank_lines_skipped(tmp_path):
    manifest = write(tmp_path / "m.jsonl", "\n" + jsonl(
        {"audio": "a.wav", "text": "first"},
        "   ",
        {"audio": "b.wav", "text": "other"},
        {"audio": "./a.wav", "captions": ["second", "third"]},  # same file, spelled differently
    ) + "\n\n")
    clips = read_manifest(manifest)
    assert [(c.audio.name, c.captions, c.line) for c in clips] == [
        ("a.wav", ("first", "second", "third"), 2),
        ("b.wav", ("other",), 4),
    ]


def test_clotho_csv_five_captions_per_row(tmp_path):
    header = "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n"
    rows = ('a.wav,one,two,three,four,five\n'
            '\n'
            '"b c.wav","a caption, with a comma",2,3,4,"five\nover two lines"\n'
            'd.wav,1,2,3,4,5\n')
    manifest = write(tmp_path / "clotho.csv", header + rows)
    clips = read_manifest(manifest, audio_dir=tmp_path / "development")
    assert [c.line for c in clips] == [2, 4, 6]  # line 4's record ends on line 5
    assert clips[0].captions == ("one", "two", "three", "four", "five")
    assert clips[1].audio == tmp_path / "development" / "b c.wav"
    assert clips[1].captions == ("a caption, with a comma", "2", "3", "4", "five\nover two lines")


def test_audiocaps_rows_grouped_per_clip_and_file_names_found(tmp_path):
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "101.wav").write_bytes(b"x")  # this clip's files are named by audiocap_id
    manifest = write(tmp_path / "test.csv", (
        "audiocap_id,youtube_id,start_time,caption\n"
        "101,yt1,30,a car passes\n"
        "205,yt2,0,birds sing\n"
        "102,yt1,30,traffic noise\n"
    ))
    clips = read_manifest(manifest, audio_dir=tmp_path / "audio")
    assert [(c.audio.name, c.captions, c.line) for c in clips] == [
        ("101.wav", ("a car passes", "traffic noise"), 2),
        ("yt2_0.wav", ("birds sing",), 3),  # no file found: the first convention, reported missing
    ]
    assert [(clip.audio.name, problem) for clip, problem in check_files(clips)] == [
        ("yt2_0.wav", "audio file not found")]


def expect_error(manifest: Path, line: int, *fragments: str):
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest)
    message = str(info.value)
    assert f"{manifest}:{line}:" in message, message
    for fragment in fragments:
        assert fragment in message, message


GOOD = json.dumps({"audio": "a.wav", "text": "fine"})


@pytest.mark.parametrize("bad_row, fragments", [
    ('{"audio": "a.wav", "text": "unclosed}', ["invalid JSON"]),
    ('["a.wav", "a caption"]', ["JSON object", "list"]),
    ('{"text": "no audio"}', ['missing "audio"']),
    ('{"audio": 3, "text": "x"}', ['"audio" must be']),
    ('{"audio": "a.wav"}', ['neither "text" nor "captions"']),
    ('{"audio": "a.wav", "text": "x", "captions": ["y"]}', ['both "text" and "captions"']),
    ('{"audio": "a.wav", "captions": []}', ["non-empty list"]),
    ('{"audio": "a.wav", "captions": "one string"}', ["non-empty list"]),
    ('{"audio": "a.wav", "captions": ["ok", 7]}', ['"captions"[1] must be a string']),
    ('{"audio": "a.wav", "captions": ["ok", "  "]}', ['"captions"[1] is empty']),
    ('{"audio": "a.wav", "text": ""}', ['"text" is empty']),
    ('{"audio": "a.wav", "text": null}', ['"text" must be a string']),
])
def test_jsonl_errors_name_file_and_line(tmp_path, bad_row, fragments):
    manifest = write(tmp_path / "m.jsonl", f"{GOOD}\n\n{bad_row}\n{GOOD}\n")
    expect_error(manifest, 3, *fragments)


def test_non_utf8_manifest_names_the_line(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(f"{GOOD}\n{GOOD}\n".encode() + b'{"audio": "a.wav", "text": "caf\xe9"}\n')
    expect_error(manifest, 3, "UTF-8")


@pytest.mark.parametrize("body, line, fragments", [
    ("file_name,caption_1,caption_2\na.wav,x,y\nb.wav,x\n", 3, ["2 cells", "has 3"]),
    ("file_name,caption_1,caption_2\na.wav,x,y\nb.wav,x,\n", 3, ['"caption_2" is empty']),
    ("file_name,caption_1\n\n,x\n", 3, ['"file_name" is empty']),
    ("audiocap_id,youtube_id,start_time,caption\n1,yt,30,\n", 2, ['"caption" is empty']),
    ("audiocap_id,youtube_id,start_time,caption\n1,,30,x\n", 2, ['"youtube_id" is empty']),
    ("\npath,sentence\na.wav,x\n", 2, ["unknown CSV header", "file_name,caption_1",
                                       "audiocap_id,youtube_id,start_time,caption"]),
])
def test_csv_errors_name_file_and_line(tmp_path, body, line, fragments):
    expect_error(write(tmp_path / "m.csv", body), line, *fragments)


@pytest.mark.parametrize("name, body", [
    ("m.jsonl", "\n  \n"),
    ("m.csv", "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n\n"),
    ("m.csv", ""),
])
def test_a_manifest_without_clips_is_an_error(tmp_path, name, body):
    manifest = write(tmp_path / name, body)
    with pytest.raises(ManifestError, match="holds no clips|is empty") as info:
        read_manifest(manifest)
    assert str(manifest) in str(info.value)


def test_unknown_suffix_and_missing_manifest(tmp_path):
    manifest = write(tmp_path / "m.tsv", "a.wav\tx\n")
    with pytest.raises(ManifestError, match=r"m\.tsv.*unknown manifest suffix.*\.jsonl"):
        read_manifest(manifest)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_manifest(tmp_path / "nope.jsonl")


def test_check_files_reports_missing_and_empty_files_with_their_line(tmp_path):
    (tmp_path / "good.wav").write_bytes(b"RIFF")
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "folder.wav").mkdir()
    manifest = write(tmp_path / "m.jsonl", jsonl(*[{"audio": name, "text": "x"} for name in
                                                   ("good.wav", "empty.wav", "gone.wav", "folder.wav")]))
    problems = check_files(read_manifest(manifest))
    assert [(clip.audio.name, clip.line, problem) for clip, problem in problems] == [
        ("empty.wav", 2, "audio file is empty (0 bytes)"),
        ("gone.wav", 3, "audio file not found"),
        ("folder.wav", 4, "audio path is not a regular file"),
    ]
