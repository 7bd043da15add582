"""data/manifest.py on Clotho and AudioCaps laid out as they ship: the audio folder is found
without a flag and reported, the wrong folder is never taken, and file names with spaces, commas,
non-ASCII letters and either Unicode normalisation are matched to the file on disk."""

import csv
import functools
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data.manifest import AUDIOCAPS_HEADER, CLOTHO_HEADER, ManifestError, check_files, load_manifest, read_manifest

RATE = 16000
# as in Clotho: spaces, a comma, accents; "Café" is written to disk in NFD below, as macOS archives do
CLOTHO_NAMES = ["rain on a roof.wav", "ambience, office 01.wav", "Café ambiance.wav", "Übergang_Straße.wav"]


def nfd(name: str) -> str:
    return unicodedata.normalize("NFD", name)


def tiny_wav(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(seed).uniform(-0.1, 0.1, 800).astype(np.float32)  # 50 ms
    sf.write(path, noise, RATE, format="OGG" if path.suffix == ".ogg" else None)
    return path


def clotho_csv(path: Path, names) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:  # csv quotes the names with commas
        writer = csv.writer(f)
        writer.writerow(CLOTHO_HEADER)
        for k, name in enumerate(names):
            writer.writerow([name] + [f"caption {j} of clip {k}" for j in range(1, 6)])
    return path


def clotho_as_shipped(root: Path, split="development", names=CLOTHO_NAMES, on_disk=nfd) -> Path:
    for k, name in enumerate(names):
        tiny_wav(root / split / on_disk(name), seed=k)
    return clotho_csv(root / f"clotho_captions_{split}.csv", names)


def test_clotho_as_shipped_finds_the_split_folder_and_says_so(tmp_path):
    manifest = clotho_as_shipped(tmp_path / "clotho")
    clips, location = load_manifest(manifest, flag="--train-audio-dir")
    folder = tmp_path / "clotho" / "development"
    assert (location.folder, location.how, location.found, location.total) == (folder, "Clotho layout", 4, 4)
    assert location.note == f"audio of {manifest} found in {folder} (Clotho layout: 4 of 4 files)"
    assert [clip.audio for clip in clips] == [folder / nfd(name) for name in CLOTHO_NAMES]  # the names on disk
    assert [clip.line for clip in clips] == [2, 3, 4, 5]
    assert clips[1].captions[0] == "caption 1 of clip 1"
    assert check_files(clips) == []
    assert all(sf.info(clip.audio).frames == 800 for clip in clips)
    assert read_manifest(manifest) == clips


def test_clotho_validation_and_evaluation_find_their_own_folder(tmp_path):
    root = tmp_path / "clotho"
    clotho_as_shipped(root, "development", CLOTHO_NAMES[:2])
    for split in ("validation", "evaluation"):
        manifest = clotho_as_shipped(root, split, CLOTHO_NAMES[2:])
        _, location = load_manifest(manifest)
        assert location.folder == root / split


def test_clotho_in_aac_datasets_layout(tmp_path):
    root = tmp_path / "CLOTHO_v2.1"
    for k, name in enumerate(CLOTHO_NAMES):
        tiny_wav(root / "clotho_audio_files" / "evaluation" / name, seed=k)
    manifest = clotho_csv(root / "clotho_csv_files" / "clotho_captions_evaluation.csv", CLOTHO_NAMES)
    clips, location = load_manifest(manifest)
    assert location.folder == root / "clotho_audio_files" / "evaluation" and not check_files(clips)


def test_nfc_names_on_disk_match_an_nfd_manifest(tmp_path):
    nfc = functools.partial(unicodedata.normalize, "NFC")
    manifest = clotho_as_shipped(tmp_path, names=[nfd(n) for n in CLOTHO_NAMES], on_disk=nfc)
    clips, _ = load_manifest(manifest)
    assert [clip.audio.name for clip in clips] == [nfc(n) for n in CLOTHO_NAMES]
    assert not check_files(clips)


def test_files_beside_the_csv_keep_the_old_behaviour(tmp_path):
    for k, name in enumerate(CLOTHO_NAMES):
        tiny_wav(tmp_path / name, seed=k)
    tiny_wav(tmp_path / "development" / CLOTHO_NAMES[0])  # a stray copy must not pull the folder away
    clips, location = load_manifest(clotho_csv(tmp_path / "clotho_captions_development.csv", CLOTHO_NAMES))
    assert (location.folder, location.how, location.note) == (tmp_path, "beside the manifest", None)
    assert clips[0].audio == tmp_path / CLOTHO_NAMES[0]


def test_a_given_audio_dir_is_used_as_is(tmp_path):
    manifest = clotho_as_shipped(tmp_path)
    elsewhere = tmp_path / "mine"
    tiny_wav(elsewhere / "rain on a roof.wav")
    clips, location = load_manifest(manifest, audio_dir=elsewhere)
    assert (location.folder, location.how, location.found, location.note) == (elsewhere, "given", 1, None)
    assert [clip.audio.parent for clip in clips] == [elsewhere] * 4
    assert len(check_files(clips)) == 3  # missing files in a given folder are reported, not searched for


def test_no_folder_holds_the_audio_names_every_folder_tried_and_the_flag(tmp_path):
    manifest = clotho_csv(tmp_path / "clotho" / "clotho_captions_development.csv", CLOTHO_NAMES)
    (tmp_path / "clotho" / "development").mkdir()
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest, flag="--train-audio-dir")
    message = str(info.value)
    assert message.startswith(f"{manifest}: none of its 4 audio files (the first: 'rain on a roof.wav')")
    assert f"{tmp_path / 'clotho'}  (beside the manifest): 0 found" in message
    assert f"{tmp_path / 'clotho' / 'development'}  (Clotho layout): 0 found" in message
    assert f"{tmp_path / 'clotho_audio_files' / 'development'}  (Clotho layout): no such folder" in message
    assert message.endswith("pass the folder that holds them with --train-audio-dir")


def test_a_folder_with_a_few_of_the_files_is_not_taken(tmp_path):
    manifest = clotho_csv(tmp_path / "clotho_captions_evaluation.csv", CLOTHO_NAMES)
    tiny_wav(tmp_path / "evaluation" / CLOTHO_NAMES[3])  # 1 of 4: not this set's folder
    with pytest.raises(ManifestError, match=r"only 1 of its 4 audio files were found, the most in .*evaluation"):
        load_manifest(manifest)


def test_an_unconventional_csv_name_is_not_searched_and_the_error_says_why(tmp_path):
    manifest = clotho_csv(tmp_path / "my_clotho.csv", CLOTHO_NAMES)
    for name in CLOTHO_NAMES:
        tiny_wav(tmp_path / "development" / name)
    with pytest.raises(ManifestError, match=r"clotho_captions_<split>\.csv is also looked for") as info:
        load_manifest(manifest, flag="--eval-audio-dir")
    assert "--eval-audio-dir" in str(info.value)


def test_jsonl_paths_stay_relative_to_the_manifest_and_match_across_normalisations(tmp_path):
    on_disk = tiny_wav(tmp_path / nfd("Café") / nfd("Öl, Wasser.wav"))  # folder and file stored NFD
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio": "Café/Öl, Wasser.wav", "text": "one"}\n', encoding="utf-8")
    [clip], location = load_manifest(manifest)
    assert (location.how, location.found, clip.audio) == ("beside the manifest", 1, on_disk)
    # two spellings of one file are one clip
    manifest.write_text('{"audio": "Café/Öl, Wasser.wav", "text": "one"}\n'
                        f'{{"audio": "./{nfd("Café/Öl, Wasser.wav")}", "text": "two"}}\n', encoding="utf-8")
    [clip] = read_manifest(manifest)
    assert clip.audio == on_disk and clip.captions == ("one", "two")


def audiocaps_csv(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(AUDIOCAPS_HEADER)
        writer.writerows(rows)
    return path


AUDIOCAPS_ROWS = [(91139, "r1nicOVtvkQ", 130, "a man speaks"), (58146, "UDGBjjwyaqE", 20, "rain falls"),
                  (91140, "r1nicOVtvkQ", 130, "someone talks"), (11362, "-2xiZDEuHd8", 0, "a dog barks")]
YTIDS = [("r1nicOVtvkQ", 130, 91139), ("UDGBjjwyaqE", 20, 58146), ("-2xiZDEuHd8", 0, 11362)]


@pytest.mark.parametrize("csv_at, audio_at, name", [
    ("audiocaps/{split}.csv", "audiocaps/{split}/{aid}.wav", "audiocaps-download, wav"),
    ("audiocaps/{split}.csv", "audiocaps/{split}/{aid}.ogg", "audiocaps-download, default vorbis"),
    ("AUDIOCAPS/{split}.csv", "AUDIOCAPS/audio_32000Hz/{split}/{yt}_{start}.flac", "aac-datasets"),
    ("AUDIOCAPS/csv_files_v1/{split}.csv", "AUDIOCAPS/audio_32000Hz/{split}/{yt}_{start}.flac",
     "aac-datasets v1 csv folder"),
    ("AUDIOCAPS_32000Hz/{split}.csv", "AUDIOCAPS_32000Hz/audio/{split}/{yt}_{start}.flac", "aac-datasets 0.3"),
    ("audiocaps-dl/data/{split}.csv", "audiocaps-dl/{split}/{yt}_{start_ms}_{end_ms}.wav",
     "audiocaps-dl, milliseconds"),
    ("ac/dataset/{split}.csv", "ac/audio/Y{yt}.wav", "AudioSet's Y prefix, one flat folder"),
    ("ac/{split}.csv", "ac/audio/{split}/{yt}.wav", "yt-dlp's %(id)s"),
])
def test_audiocaps_layouts_of_common_download_tools(tmp_path, csv_at, audio_at, name):
    split = "val"
    for k, (yt, start, aid) in enumerate(YTIDS):
        name_fields = dict(aid=aid, yt=yt, start=start, start_ms=start * 1000, end_ms=(start + 10) * 1000)
        tiny_wav(tmp_path / audio_at.format(split=split, **name_fields), seed=k)
    manifest = audiocaps_csv(tmp_path / csv_at.format(split=split), AUDIOCAPS_ROWS)
    clips, location = load_manifest(manifest)
    expected_folder = (tmp_path / audio_at.format(split=split, aid=0, yt="x", start=0, start_ms=0, end_ms=0)).parent
    assert (location.folder, location.how, location.found) == (expected_folder, "AudioCaps layout", 3), name
    assert location.note.startswith(f"audio of {manifest} found in {expected_folder} (AudioCaps layout")
    assert [(c.captions, c.line) for c in clips] == [(("a man speaks", "someone talks"), 2), (("rain falls",), 3),
                                                     (("a dog barks",), 5)]
    assert not check_files(clips)


def test_audiocaps_val_csv_finds_a_validation_folder(tmp_path):
    for yt, start, _ in YTIDS:
        tiny_wav(tmp_path / "validation" / f"{yt}_{start}.wav")
    _, location = load_manifest(audiocaps_csv(tmp_path / "val.csv", AUDIOCAPS_ROWS))
    assert location.folder == tmp_path / "validation"


def test_audiocaps_clip_found_through_a_later_rows_audiocap_id(tmp_path):
    # audiocaps-download saves one file per caption row; the first row's download may have failed
    tiny_wav(tmp_path / "test" / "91140.wav")
    tiny_wav(tmp_path / "test" / "58146.wav")
    tiny_wav(tmp_path / "test" / "11362.wav")
    clips, _ = load_manifest(audiocaps_csv(tmp_path / "test.csv", AUDIOCAPS_ROWS))
    assert [clip.audio.name for clip in clips] == ["91140.wav", "58146.wav", "11362.wav"]


def test_audiocaps_partial_download_is_still_found_and_the_rest_reported(tmp_path):
    for yt, start, _ in YTIDS[:2]:  # 2 of 3 downloaded: YouTube removed the third video
        tiny_wav(tmp_path / "train" / f"{yt}_{start}.wav")
    clips, location = load_manifest(audiocaps_csv(tmp_path / "train.csv", AUDIOCAPS_ROWS))
    assert (location.found, location.total) == (2, 3)
    assert [(clip.audio, problem) for clip, problem in check_files(clips)] == [
        (tmp_path / "train" / "-2xiZDEuHd8_0.wav", "audio file not found")]
