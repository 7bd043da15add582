"""The InstructBLIP demo's data: images of coloured shapes with short questions about them, made with Pillow.

With no model or data flags, `train.py --task instructblip` calls `ensure_shapes_set(cache_dir)`
and trains on what it returns. An image holds one to three shapes (circle, square, triangle), each
red, green, blue or yellow, each at its own position (left, right, top, bottom, centre), drawn
flat-coloured without antialiasing on a light grey background that is plain or lightly noisy.
Each image gets QUESTIONS_PER_IMAGE questions of different types, one example a manifest line.
Every answer is one word from ANSWERS, so exact-match accuracy means something, and every
question has exactly one true answer (one that could be ambiguous is never asked).

Question grammar (POS := "on the left" | "on the right" | "at the top" | "at the bottom" | "in the centre"):
    colour       "What colour is the shape?"  (one shape)            -> red | green | blue | yellow
                 "What colour is the SHAPE?"  (the only SHAPE)
                 "What colour is the shape POS?"
    count        "How many shapes are there?"                         -> one | two | three
    count_colour "How many COLOUR shapes are there?"                  -> zero | one | two | three
    shape_at     "What shape is POS?"                                 -> circle | square | triangle
    exists       "Is there a COLOUR SHAPE?"  (yes half the time)      -> yes | no
    where        "Where is the COLOUR SHAPE?"  (the only one)         -> left | right | top | bottom | centre
"""

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from common.atomic import build_directory_once

VERSION = 1  # bump when anything below changes what is generated, so cached sets are rebuilt
N_TRAIN = 600  # examples (manifest lines): 200 images x 3 questions, enough for a tiny model to fit a bit
N_EVAL = 120  # 40 images; one eval example is 0.8% of the accuracy
IMAGE_SIZE = 64
MIN_IMAGE_SIZE = 32  # below this a triangle is a few pixels and hard to tell from a square
QUESTIONS_PER_IMAGE = 3
DEMO_SEED = 0  # the demo is one fixed data set: a run's --seed is the training's randomness only

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 205, 30)}
SHAPES = ("circle", "square", "triangle")
# centres as fractions of the image side, 0.3 apart: with radius <= 0.11 (a triangle's corners at
# 1.2x that) and 0.015 of jitter, neighbouring shapes stay at least 0.04 of the side apart
POSITIONS = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8), "centre": (0.5, 0.5)}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "centre": "in the centre"}
NUMBER_WORDS = ("zero", "one", "two", "three")
ANSWERS = (*COLOURS, *NUMBER_WORDS, *SHAPES, "yes", "no", *POSITIONS)
QUESTION_TYPES = ("colour", "count", "count_colour", "shape_at", "exists", "where")


def pick(rng, options):
    options = list(options)
    return options[rng.integers(len(options))]  # a plain Python value, unlike rng.choice


def sample_scene(rng):
    """1-3 shapes, each {"shape", "colour", "position"}, at distinct positions (listed in POSITIONS order)."""
    n_shapes = int(rng.integers(1, 4))
    positions = sorted(rng.permutation(len(POSITIONS))[:n_shapes].tolist())
    return [{"shape": pick(rng, SHAPES), "colour": pick(rng, COLOURS), "position": list(POSITIONS)[p]}
            for p in positions]


def draw_scene(scene, image_size, rng):
    """The scene as an RGB image: background grey 200-245, with noise (std 4) on half the images;
    shapes in their exact palette colour (no antialiasing), with jittered size and centre."""
    grey = rng.uniform(200, 245)
    noise_std = 4.0 if rng.random() < 0.5 else 0.0
    background = grey + noise_std * rng.standard_normal((image_size, image_size, 1))  # (S, S, 1)
    pixels = np.clip(np.round(np.repeat(background, 3, axis=2)), 0, 255).astype(np.uint8)  # (S, S, 3)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for item in scene:
        fx, fy = POSITIONS[item["position"]]
        x = (fx + rng.uniform(-0.015, 0.015)) * image_size
        y = (fy + rng.uniform(-0.015, 0.015)) * image_size
        r = rng.uniform(0.08, 0.11) * image_size
        colour = COLOURS[item["colour"]]
        if item["shape"] == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        elif item["shape"] == "square":  # half-side 0.9 r: about a circle's area
            draw.rectangle([x - 0.9 * r, y - 0.9 * r, x + 0.9 * r, y + 0.9 * r], fill=colour)
        else:  # equilateral, pointing up, circumradius 1.2 r
            R = 1.2 * r
            draw.polygon([(x, y - R), (x - R * math.sqrt(3) / 2, y + R / 2), (x + R * math.sqrt(3) / 2, y + R / 2)],
                         fill=colour)
    return image


def candidate_questions(scene, question_type):
    """Every (question, answer) of one type that has exactly one true answer for this scene."""
    shapes = [item["shape"] for item in scene]
    pairs = [(item["colour"], item["shape"]) for item in scene]
    if question_type == "colour":
        out = [("What colour is the shape?", scene[0]["colour"])] if len(scene) == 1 else []
        out += [(f"What colour is the {item['shape']}?", item["colour"]) for item in scene
                if len(scene) > 1 and shapes.count(item["shape"]) == 1]
        return out + [(f"What colour is the shape {POSITION_PHRASES[item['position']]}?", item["colour"])
                      for item in scene]
    if question_type == "count":
        return [("How many shapes are there?", NUMBER_WORDS[len(scene)])]
    if question_type == "count_colour":
        return [(f"How many {colour} shapes are there?",
                 NUMBER_WORDS[sum(item["colour"] == colour for item in scene)]) for colour in COLOURS]
    if question_type == "shape_at":
        return [(f"What shape is {POSITION_PHRASES[item['position']]}?", item["shape"]) for item in scene]
    if question_type == "exists":
        return [(f"Is there a {colour} {shape}?", "yes" if (colour, shape) in pairs else "no")
                for colour in COLOURS for shape in SHAPES]
    if question_type == "where":
        return [(f"Where is the {item['colour']} {item['shape']}?", item["position"]) for item in scene
                if pairs.count((item["colour"], item["shape"])) == 1]
    raise ValueError(f"unknown question type {question_type!r}; expected one of {QUESTION_TYPES}")


def ask(scene, rng, n_questions):
    """`n_questions` (question, answer) pairs of different types. "exists" is answered yes half
    the time (12 colour-shape pairs against at most 3 present, so drawing uniformly would almost
    always say no); a count_colour question asks about a present colour half the time, likewise."""
    usable = [t for t in QUESTION_TYPES if candidate_questions(scene, t)]
    types = [usable[i] for i in sorted(rng.permutation(len(usable))[:n_questions].tolist())]
    questions = []
    for question_type in types:
        candidates = candidate_questions(scene, question_type)
        if question_type in ("exists", "count_colour"):
            present = rng.random() < 0.5
            candidates = [qa for qa in candidates if (qa[1] not in ("no", "zero")) == present]
        questions.append(pick(rng, candidates))
    return questions


def output_paths(out_dir):
    out_dir = Path(out_dir)
    return {"dir": out_dir, "images": out_dir / "images", "train": out_dir / "train.jsonl",
            "eval": out_dir / "eval.jsonl", "texts": out_dir / "texts.txt", "done": out_dir / "DONE.json"}


def generate_shapes_set(out_dir, n_train=N_TRAIN, n_eval=N_EVAL, image_size=IMAGE_SIZE, seed=DEMO_SEED, verbose=True):
    """Write images/*.png, train.jsonl, eval.jsonl (lines {"image", "prompt", "answer"}, image paths
    relative to out_dir) and texts.txt (every prompt and answer, a line each, for training demo
    tokenizers) into the new or empty folder `out_dir`; return the paths and the set's description
    (DONE.json's fields, which ensure_shapes_set writes once every file is there).
    The same arguments give byte-identical files."""
    if n_train < 1 or n_eval < 1:
        raise ValueError(f"n_train and n_eval must be at least 1, got {n_train} and {n_eval}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE} pixels, got {image_size}")
    paths = output_paths(out_dir)
    paths["dir"].mkdir(parents=True, exist_ok=True)
    if any(paths["dir"].iterdir()):  # never mixed with an older set's files
        raise ValueError(f"{paths['dir']} is not empty: generate_shapes_set writes a new set, "
                         "ensure_shapes_set replaces one")
    paths["images"].mkdir()

    texts, n_images = [], 0
    for split_id, (split, n_examples) in enumerate([("train", n_train), ("eval", n_eval)]):
        rng = np.random.default_rng([seed, split_id])  # eval does not change when n_train does
        lines = []
        for index in range(math.ceil(n_examples / QUESTIONS_PER_IMAGE)):
            scene = sample_scene(rng)
            relative = f"images/{split}_{index:04d}.png"
            draw_scene(scene, image_size, rng).save(paths["dir"] / relative)
            n_questions = min(QUESTIONS_PER_IMAGE, n_examples - len(lines))
            for prompt, answer in ask(scene, rng, n_questions):
                lines.append(json.dumps({"image": relative, "prompt": prompt, "answer": answer}) + "\n")
                texts += [prompt, answer]
            n_images += 1
        paths[split].write_text("".join(lines), encoding="utf-8")
    # eval texts too: the vocabulary is closed, and a demo tokenizer must not map them to [UNK]
    paths["texts"].write_text("".join(text + "\n" for text in texts), encoding="utf-8")

    record = {"version": VERSION, "seed": seed, "n_train": n_train, "n_eval": n_eval,
              "image_size": image_size, "n_images": n_images}
    if verbose:
        print(f"demo shapes: wrote {n_train} train + {n_eval} eval questions about {n_images} "
              f"{image_size}x{image_size} images to {paths['dir']}")
    return {**{k: str(v) for k, v in paths.items()}, **record}


def ensure_shapes_set(cache_dir, n_train=N_TRAIN, n_eval=N_EVAL, image_size=IMAGE_SIZE, seed=DEMO_SEED, verbose=True):
    """The shapes set in the folder `cache_dir`, built once however many processes ask at once
    (common/atomic.py build_directory_once): reused when its DONE.json records these parameters and
    this VERSION and every file it lists is whole, otherwise (missing, partial, damaged or different)
    built again from scratch. The set is fixed data: `seed` is not a run's --seed."""
    paths = output_paths(cache_dir)
    wanted = {"version": VERSION, "seed": seed, "n_train": n_train, "n_eval": n_eval, "image_size": image_size}
    built = False

    def build(scratch):
        nonlocal built
        built = True
        made = generate_shapes_set(scratch, n_train=n_train, n_eval=n_eval, image_size=image_size, seed=seed,
                                   verbose=False)
        if verbose:
            print(f"demo shapes: wrote {n_train} train + {n_eval} eval questions about {made['n_images']} "
                  f"{image_size}x{image_size} images to {paths['dir']}")
        return {"n_images": made["n_images"]}

    record = build_directory_once(paths["dir"], wanted, build)
    if verbose and not built:
        print(f"demo shapes: reusing {n_train} train + {n_eval} eval questions in {paths['dir']}")
    return {**{k: str(v) for k, v in paths.items()}, **record}
