"""The InstructBLIP demo set: file format, determinism, the DONE.json cache, and answers that are
true of the drawn image. The image checks find the shapes from the pixels alone (connected regions
of saturated colour, named by hue, placed by centroid, told apart by how much of their bounding
box they fill) and read the questions with a grammar written here, independently of the
generator's tables, so "What shape is on the left?" -> "circle" must be a round region on the left."""

import hashlib
import json
import re
from collections import deque

import numpy as np
import pytest
from PIL import Image

from data import demo_shapes
from data.demo_shapes import ensure_shapes_set, generate_shapes_set
from data.instructblip import read_vqa_manifest

NUMBERS = {"zero": 0, "one": 1, "two": 2, "three": 3}
PLACES = {"on the left": "left", "on the right": "right", "at the top": "top", "at the bottom": "bottom",
          "in the centre": "centre"}
PLACE = "|".join(PLACES)


def tree_hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def colour_name(rgb):
    r, g, b = (int(c) for c in rgb)
    if b > max(r, g) + 60:
        return "blue"
    if r > 150 and g > 150 and b < 100:
        return "yellow"
    if r > g + 60 and r > b + 60:
        return "red"
    if g > r + 60 and g > b + 60:
        return "green"
    raise AssertionError(f"a saturated pixel of no known colour: {rgb}")


def find_shapes(image):
    """[(colour, shape, position)] for each 4-connected region of saturated (non-grey) pixels."""
    pixels = np.asarray(image.convert("RGB")).astype(int)  # (H, W, 3)
    height, width, _ = pixels.shape
    coloured = pixels.max(axis=2) - pixels.min(axis=2) > 80  # the background is grey: max - min ~ 0
    seen = np.zeros_like(coloured)
    shapes = []
    for y0, x0 in zip(*np.nonzero(coloured)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        region, queue = [], deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < height and 0 <= nx < width and coloured[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        ys, xs = np.array(region).T
        names = {colour_name(pixels[y, x]) for y, x in region}
        assert len(names) == 1, f"one region holds several colours {names}: two shapes touch"
        fill = len(region) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))  # square ~1, circle ~pi/4, triangle ~1/2
        shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
        cy, cx = ys.mean() / height, xs.mean() / width
        position = ("left" if cx < 0.35 else "right" if cx > 0.65 else
                    "top" if cy < 0.35 else "bottom" if cy > 0.65 else "centre")
        shapes.append((names.pop(), shape, position))
    return shapes


def true_answer(question, shapes):
    """The answer the image gives to a question of the demo's grammar; asserts it is unambiguous."""
    def only(matches):
        assert len(matches) == 1, (question, shapes)
        return matches[0]

    if question == "What colour is the shape?":
        return only([c for c, _, _ in shapes])
    if m := re.fullmatch(rf"What colour is the shape ({PLACE})\?", question):
        return only([c for c, _, p in shapes if p == PLACES[m[1]]])
    if m := re.fullmatch(r"What colour is the (circle|square|triangle)\?", question):
        return only([c for c, s, _ in shapes if s == m[1]])
    if question == "How many shapes are there?":
        return list(NUMBERS)[len(shapes)]
    if m := re.fullmatch(r"How many (red|green|blue|yellow) shapes are there\?", question):
        return list(NUMBERS)[sum(c == m[1] for c, _, _ in shapes)]
    if m := re.fullmatch(rf"What shape is ({PLACE})\?", question):
        return only([s for _, s, p in shapes if p == PLACES[m[1]]])
    if m := re.fullmatch(r"Is there a (red|green|blue|yellow) (circle|square|triangle)\?", question):
        return "yes" if (m[1], m[2]) in [(c, s) for c, s, _ in shapes] else "no"
    if m := re.fullmatch(r"Where is the (red|green|blue|yellow) (circle|square|triangle)\?", question):
        return only([p for c, s, p in shapes if (c, s) == (m[1], m[2])])
    raise AssertionError(f"a question outside the grammar: {question!r}")


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes_set(root, n_train=30, n_eval=10, seed=0, verbose=False)
    return root


def test_files_manifests_and_texts(small_set):
    texts = []
    for split, n_examples, n_images in [("train", 30, 10), ("eval", 10, 4)]:
        lines = rows(small_set / f"{split}.jsonl")
        assert len(lines) == n_examples and all(set(row) == {"image", "prompt", "answer"} for row in lines)
        assert [row["image"] for row in lines] == [f"images/{split}_{k // 3:04d}.png" for k in range(n_examples)]
        assert all(row["answer"] in demo_shapes.ANSWERS and " " not in row["answer"] for row in lines)
        for k in range(n_images):  # the questions about one image are all different
            prompts = [row["prompt"] for row in lines if row["image"] == f"images/{split}_{k:04d}.png"]
            assert len(set(prompts)) == len(prompts) >= 1
        examples = read_vqa_manifest(small_set / f"{split}.jsonl")  # the dataset's own reader
        assert all(e.image.is_file() for e in examples) and examples[0].image.parent == small_set / "images"
        texts += [t for row in lines for t in (row["prompt"], row["answer"])]
    assert (small_set / "texts.txt").read_text(encoding="utf-8").splitlines() == texts
    assert len(list((small_set / "images").glob("*.png"))) == 14
    with Image.open(small_set / "images" / "train_0000.png") as image:
        assert (image.mode, image.size) == ("RGB", (64, 64))
    assert not (small_set / "DONE.json").exists()  # ensure_shapes_set's to write, once every file is there


def test_ensure_marks_the_set_done_last_with_every_file_and_its_size(small_set, tmp_path):
    result = ensure_shapes_set(tmp_path / "set", n_train=30, n_eval=10, seed=0, verbose=False)
    done = json.loads((tmp_path / "set" / "DONE.json").read_text())
    assert done.pop("files") == {name: (small_set / name).stat().st_size for name in tree_hashes(small_set)}
    assert done == {"version": demo_shapes.VERSION, "seed": 0, "n_train": 30, "n_eval": 10,
                    "image_size": 64, "n_images": 14}
    hashes = tree_hashes(tmp_path / "set")
    assert hashes.pop("DONE.json") and hashes == tree_hashes(small_set)
    assert result["n_images"] == 14 and "files" not in result


def test_generate_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        generate_shapes_set(tmp_path, n_train=3, n_eval=3, verbose=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_same_seed_gives_identical_bytes_and_another_seed_differs(small_set, tmp_path):
    generate_shapes_set(tmp_path / "again", n_train=30, n_eval=10, seed=0, verbose=False)
    generate_shapes_set(tmp_path / "other", n_train=30, n_eval=10, seed=1, verbose=False)
    generate_shapes_set(tmp_path / "more", n_train=45, n_eval=10, seed=0, verbose=False)
    reference = tree_hashes(small_set)
    assert tree_hashes(tmp_path / "again") == reference
    other = tree_hashes(tmp_path / "other")
    assert other.keys() == reference.keys()
    assert "train.jsonl" in other and sum(other[n] != reference[n] for n in reference if n.endswith(".png")) >= 12
    more = tree_hashes(tmp_path / "more")  # eval does not depend on n_train
    assert (more["eval.jsonl"] == reference["eval.jsonl"]
            and more["images/eval_0003.png"] == reference["images/eval_0003.png"])


def test_ensure_reuses_a_finished_set_without_writing(tmp_path, monkeypatch):
    ensure_shapes_set(tmp_path, n_train=30, n_eval=10, seed=0, verbose=False)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}

    def must_not_run(*args, **kwargs):
        raise AssertionError("ensure_shapes_set regenerated a finished set")

    monkeypatch.setattr(demo_shapes, "generate_shapes_set", must_not_run)
    result = ensure_shapes_set(tmp_path, n_train=30, n_eval=10, seed=0, verbose=False)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    assert result["eval"] == str(tmp_path / "eval.jsonl") and result["n_images"] == 14


@pytest.mark.parametrize("damage", ["a png deleted", "a png truncated", "no DONE.json", "corrupt DONE.json",
                                    "old version", "no texts.txt", "other image_size", "other seed"])
def test_ensure_regenerates_a_partial_or_different_set(small_set, tmp_path, damage):
    ensure_shapes_set(tmp_path, n_train=30, n_eval=10, seed=0, verbose=False)
    (tmp_path / "images" / "stray.png").write_bytes(b"partial")  # gone only if the whole set is rebuilt
    done, png = tmp_path / "DONE.json", tmp_path / "images" / "train_0003.png"
    size, seed = 64, 0
    if damage == "a png deleted":
        png.unlink()
    elif damage == "a png truncated":
        png.write_bytes(png.read_bytes()[:100])
    elif damage == "no DONE.json":
        done.unlink()
    elif damage == "corrupt DONE.json":
        done.write_text('{"version": 1, "se')
    elif damage == "old version":
        done.write_text(json.dumps({**json.loads(done.read_text()), "version": demo_shapes.VERSION - 1}))
    elif damage == "no texts.txt":
        (tmp_path / "texts.txt").unlink()
    elif damage == "other image_size":
        size = 48
    else:
        seed = 3
    ensure_shapes_set(tmp_path, n_train=30, n_eval=10, image_size=size, seed=seed, verbose=False)
    hashes = tree_hashes(tmp_path)
    assert hashes.pop("DONE.json") and "images/stray.png" not in hashes and "images/train_0003.png" in hashes
    assert (json.loads(done.read_text())["image_size"], json.loads(done.read_text())["seed"]) == (size, seed)
    with Image.open(tmp_path / "images" / "train_0003.png") as image:
        assert image.size == (size, size)
    if (size, seed) == (64, 0):
        assert hashes == tree_hashes(small_set)


@pytest.mark.parametrize("image_size", [64, 40])
def test_every_answer_is_what_the_image_shows(tmp_path, image_size):
    generate_shapes_set(tmp_path, n_train=150, n_eval=30, image_size=image_size, seed=0, verbose=False)
    shapes_of, kinds = {}, set()
    for split in ("train", "eval"):
        for row in rows(tmp_path / f"{split}.jsonl"):
            if row["image"] not in shapes_of:
                with Image.open(tmp_path / row["image"]) as image:
                    shapes_of[row["image"]] = find_shapes(image)
            shapes = shapes_of[row["image"]]
            assert 1 <= len(shapes) <= 3 and len({p for _, _, p in shapes}) == len(shapes)
            assert true_answer(row["prompt"], shapes) == row["answer"], (row, shapes)
            kinds.add(row["prompt"].split()[0] + " " + row["prompt"].split()[1])
    every_shape = {s for shapes in shapes_of.values() for _, s, _ in shapes}
    every_colour = {c for shapes in shapes_of.values() for c, _, _ in shapes}
    assert every_shape == {"circle", "square", "triangle"} and every_colour == {"red", "green", "blue", "yellow"}
    assert kinds == {"What colour", "How many", "What shape", "Is there", "Where is"}


def test_answers_are_spread_over_the_closed_set():
    answers = []
    rng = np.random.default_rng(0)
    for _ in range(300):
        answers += [a for _, a in demo_shapes.ask(demo_shapes.sample_scene(rng), rng, 3)]
    counts = {a: answers.count(a) for a in demo_shapes.ANSWERS}
    assert all(counts[a] > 0 for a in demo_shapes.ANSWERS), counts
    assert max(counts.values()) < 0.2 * len(answers)  # no answer a model could always give
    assert 0.35 < counts["yes"] / (counts["yes"] + counts["no"]) < 0.65


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 1"):
        generate_shapes_set(tmp_path, n_train=0, verbose=False)
    with pytest.raises(ValueError, match="image_size must be at least 32"):
        generate_shapes_set(tmp_path, image_size=16, verbose=False)
