"""data/instructblip.py: the VQA manifest and its errors, the bad-image policies, and the collate:
pixels equal to preprocess_images, token ids equal to each tokenizer's own encoding, labels with
</s> and -100 on padding, and DataLoader workers that carry both tokenizers."""

import functools
import json

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram, WordPiece
from torch.utils.data import DataLoader

from data.audio_text import Skipped
from data.sampling import GlobalBatchSampler, epoch_order
from data.instructblip import (
    BadImageError,
    VQADataset,
    VQAExample,
    check_images,
    collate_vqa,
    read_vqa_manifest,
)
from data.manifest import ManifestError
from models.image import preprocess_images

WORDS = ["what", "colour", "is", "the", "shape", "how", "many", "shapes", "are", "there", "red", "blue",
         "two", "a", "circle", "?"]
SIZE = 16  # the collate's image size


def qformer_tokenizer() -> Tokenizer:
    """A BERT-style WordPiece: lowercased, [CLS] text [SEP], [PAD] = 0 (as the Q-Former's)."""
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS, "##s"])}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


def t5_tokenizer(append_eos: bool = True) -> Tokenizer:
    """A T5-style Unigram: cased, Metaspace, text </s>, <pad> = 0, </s> = 1 (as Flan-T5's)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -2.0) for w in WORDS + ["What", "How", "Is"]]
    pieces += [(c, -8.0) for c in sorted(set("".join(WORDS) + "WhatHowIs▁"))]  # character fallback
    tok = Tokenizer(Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    if append_eos:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.enable_padding(pad_id=0, pad_token="<pad>")
    return tok


def own_encoding(tok: Tokenizer, text: str) -> list[int]:
    """The tokenizer's encoding of one text, without any padding."""
    alone = Tokenizer.from_str(tok.to_str())
    alone.no_padding()
    return alone.encode(text).ids


ROWS = [  # (image file, prompt, answer); b.png is used twice, as a demo image with two questions
    ("a.png", "What colour is the shape?", "red"),
    ("b.png", "How many shapes are there?", "two"),
    ("c.png", "What is the shape?", "a blue circle"),
    ("b.png", "Is there a red circle?", "two shapes"),
]


def write_images(folder):
    Image.new("RGB", (20, 30), (200, 30, 30)).save(folder / "a.png")
    Image.new("L", (16, 16), 90).save(folder / "b.png")
    Image.new("RGBA", (24, 24), (0, 0, 255, 128)).save(folder / "c.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "garbage.png").write_bytes(b"this is not an image" * 10)


def write_manifest(folder, rows, name="m.jsonl"):
    path = folder / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def good_manifest(tmp_path):
    write_images(tmp_path)
    return write_manifest(tmp_path, [{"image": i, "prompt": p, "answer": a} for i, p, a in ROWS])


def collate(items, **kwargs):
    return collate_vqa(items, SIZE, qformer_tokenizer(), t5_tokenizer(), **kwargs)


def test_manifest_lines_become_examples_with_absolute_paths(tmp_path):
    folder = tmp_path / "sets"
    folder.mkdir()
    manifest = write_manifest(folder, [
        "  ",
        {"image": "imgs/a.png", "prompt": "What?", "answer": "red", "split": "train"},  # extra key ignored
        {"image": "../b.png", "prompt": "How many?", "answer": "two"},
        {"image": "imgs/a.png", "prompt": "Where?", "answer": "left"},  # same image: its own example
    ])
    examples = read_vqa_manifest(manifest)
    assert examples == [
        VQAExample(folder / "imgs" / "a.png", "What?", "red", str(manifest), 2),
        VQAExample(tmp_path / "b.png", "How many?", "two", str(manifest), 3),
        VQAExample(folder / "imgs" / "a.png", "Where?", "left", str(manifest), 4),
    ]
    assert examples[1].where == f"{manifest}:3"
    [moved, *_] = read_vqa_manifest(manifest, image_dir=tmp_path / "elsewhere")
    assert moved.image == tmp_path / "elsewhere" / "imgs" / "a.png"


GOOD = {"image": "a.png", "prompt": "What colour?", "answer": "red"}


@pytest.mark.parametrize("bad_line, message", [
    ('{"image": "a.png", "prompt": ', "invalid JSON"),
    ('["a.png", "What?", "red"]', "expected a JSON object"),
    ({"image": "a.png", "prompt": "What?"}, 'missing "answer"; every line needs the keys "image", "prompt", "answer"'),
    ({"image": "a.png", "question": "What?", "answer": "red"}, 'missing "prompt" (rename "question" to "prompt")'),
    ({"image": "a.png", "prompt": "  ", "answer": "red"}, '"prompt" is empty'),
    ({"image": "a.png", "prompt": "What?", "answer": 3}, '"answer" must be a string, got int'),
    ({"image": "", "prompt": "What?", "answer": "red"}, '"image" is empty'),
    ({"image": ["a.png"], "prompt": "What?", "answer": "red"}, '"image" must be a string, got list'),
])
def test_manifest_errors_name_the_file_and_line(tmp_path, bad_line, message):
    manifest = write_manifest(tmp_path, [GOOD, "", bad_line, GOOD])
    with pytest.raises(ManifestError) as info:
        read_vqa_manifest(manifest)
    assert str(info.value).startswith(f"{manifest}:3: ") and message in str(info.value)


def test_manifest_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        read_vqa_manifest(tmp_path / "absent.jsonl")
    with pytest.raises(ManifestError, match="holds no examples"):
        read_vqa_manifest(write_manifest(tmp_path, ["", "   "]))
    with pytest.raises(ManifestError, match=r"unknown manifest suffix '\.csv'.*\.jsonl"):
        read_vqa_manifest(write_manifest(tmp_path, [GOOD], name="m.csv"))
    (tmp_path / "bad.jsonl").write_bytes(json.dumps(GOOD).encode() + b"\n\xff\n")
    with pytest.raises(ManifestError, match=r"bad\.jsonl:2: not UTF-8"):
        read_vqa_manifest(tmp_path / "bad.jsonl")


def test_check_images_reports_missing_empty_and_headerless_files(tmp_path):
    write_images(tmp_path)
    (tmp_path / "folder.png").mkdir()
    names = ["a.png", "missing.png", "empty.png", "folder.png", "garbage.png"]
    examples = read_vqa_manifest(write_manifest(tmp_path, [{**GOOD, "image": n} for n in names]))
    assert [(e.line, problem.split(" (")[0]) for e, problem in check_images(examples)] == [
        (2, "image file not found"), (3, "image file is empty"), (4, "image path is not a regular file"),
        (5, "image file cannot be read")]  # a header PIL cannot identify


def test_items_hold_the_decoded_rgb_image_and_where_it_came_from(tmp_path):
    examples = read_vqa_manifest(good_manifest(tmp_path))
    dataset = VQADataset(examples)
    assert len(dataset) == 4
    item = dataset[2]
    assert (item["index"], item["prompt"], item["answer"], item["line"]) == (2, ROWS[2][1], ROWS[2][2], 3)
    assert item["path"] == str(tmp_path / "c.png") and item["where"] == f"{tmp_path / 'm.jsonl'}:3"
    assert item["image"].mode == "RGB" and item["image"].size == (24, 24)  # RGBA composited onto white
    assert dataset[1]["image"].mode == "RGB" and dataset[1]["image"].getpixel((3, 3)) == (90, 90, 90)
    with pytest.raises(ValueError, match="on_bad_image"):
        VQADataset(examples, on_bad_image="ignore")


BAD = ["missing.png", "empty.png", "garbage.png"]
BAD_REASONS = ["no image file", "cannot decode", "cannot decode"]


@pytest.mark.parametrize("name, reason", zip(BAD, BAD_REASONS))
def test_fail_policy_names_the_manifest_line_and_the_way_to_skip(tmp_path, name, reason):
    write_images(tmp_path)
    manifest = write_manifest(tmp_path, [GOOD, {**GOOD, "image": name}])
    dataset = VQADataset(read_vqa_manifest(manifest))
    assert dataset[0]["answer"] == "red"
    with pytest.raises(BadImageError) as info:
        dataset[1]
    message = str(info.value)
    assert message.startswith(f"{manifest}:2: ") and name in message and reason in message
    assert "--on-bad-image skip" in message and "on_bad_image" not in message  # the command line's spelling


def test_skip_policy_reports_every_bad_image_in_the_batch(tmp_path):
    write_images(tmp_path)
    manifest = write_manifest(tmp_path, [GOOD, *[{**GOOD, "image": n} for n in BAD], {**GOOD, "answer": "blue"}])
    dataset = VQADataset(read_vqa_manifest(manifest), on_bad_image="skip")
    batch = collate([dataset[i] for i in range(5)])
    assert batch["index"].tolist() == [0, 4] and batch["lines"] == [1, 5] and batch["answers"] == ["red", "blue"]
    assert batch["pixel_values"].shape == (2, 3, SIZE, SIZE) and batch["labels"].shape[0] == 2
    assert [(s.path, s.line) for s in batch["skipped"]] == [(str(tmp_path / n), k + 2) for k, n in enumerate(BAD)]
    assert all(reason in s.reason for s, reason in zip(batch["skipped"], BAD_REASONS))


def test_a_batch_of_only_skipped_images_has_no_tensors(tmp_path):
    write_images(tmp_path)
    dataset = VQADataset(read_vqa_manifest(write_manifest(tmp_path, [{**GOOD, "image": n} for n in BAD])),
                         on_bad_image="skip")
    batch = collate([dataset[i] for i in range(3)])
    tensors = ("pixel_values", "qformer_input_ids", "qformer_attention_mask", "input_ids", "attention_mask", "labels")
    assert all(batch[key] is None for key in tensors)
    assert batch["answers"] == [] and batch["index"].shape == (0,) and len(batch["skipped"]) == 3
    with pytest.raises(TypeError, match="Skipped"):
        collate([None])  # a bare None would lose the report


def test_collate_tokenizes_each_text_as_its_own_tokenizer_does(tmp_path):
    dataset = VQADataset(read_vqa_manifest(good_manifest(tmp_path)))
    items = [dataset[i] for i in range(4)]
    batch = collate(items)
    # bits: the collate is preprocess_images of the same files, and its float ops are elementwise and
    # correctly rounded (no reduction), the same on any CPU
    torch.testing.assert_close(batch["pixel_values"], preprocess_images([tmp_path / r[0] for r in ROWS], SIZE),
                               rtol=0, atol=0)
    assert batch["prompts"] == [r[1] for r in ROWS] and batch["answers"] == [r[2] for r in ROWS]
    assert batch["index"].tolist() == [0, 1, 2, 3] and batch["lines"] == [1, 2, 3, 4] and batch["skipped"] == []

    for ids_key, mask_key, tok, texts in [
        ("qformer_input_ids", "qformer_attention_mask", qformer_tokenizer(), batch["prompts"]),
        ("input_ids", "attention_mask", t5_tokenizer(), batch["prompts"]),
    ]:
        ids, mask = batch[ids_key], batch[mask_key]
        expected = [own_encoding(tok, text) for text in texts]
        assert ids.dtype == mask.dtype == torch.long
        assert ids.shape == mask.shape == (4, max(map(len, expected)))  # padded to the batch's longest
        for row, ids_row, mask_row in zip(expected, ids.tolist(), mask.tolist()):
            assert ids_row == row + [0] * (ids.shape[1] - len(row))
            assert mask_row == [1] * len(row) + [0] * (ids.shape[1] - len(row))

    qformer = own_encoding(qformer_tokenizer(), "What colour is the shape?")
    assert qformer == [2] + [4 + WORDS.index(w) for w in ["what", "colour", "is", "the", "shape", "?"]] + [3]
    answers = [own_encoding(t5_tokenizer(), text) for text in batch["answers"]]
    assert all(row[-1] == 1 for row in answers)  # </s>
    assert batch["labels"].tolist() == [row + [-100] * (max(map(len, answers)) - len(row)) for row in answers]


def test_collate_refuses_a_t5_tokenizer_that_does_not_append_eos(tmp_path):
    dataset = VQADataset(read_vqa_manifest(good_manifest(tmp_path)))
    items = [dataset[i] for i in range(2)]
    collate_vqa(items, SIZE, qformer_tokenizer(), t5_tokenizer(append_eos=True))
    with pytest.raises(ValueError, match=r"does not end the answers with </s>.*'\$A </s>'"):
        collate_vqa(items, SIZE, qformer_tokenizer(), t5_tokenizer(append_eos=False))


def test_collate_refuses_texts_longer_than_the_limits_naming_the_line(tmp_path):
    dataset = VQADataset(read_vqa_manifest(good_manifest(tmp_path)))
    items = [dataset[i] for i in range(4)]
    lengths = [len(own_encoding(qformer_tokenizer(), r[1])) for r in ROWS]  # checked before T5's
    longest, first_line = max(lengths), lengths.index(max(lengths)) + 1
    collate(items, max_prompt_tokens=max(longest, *(len(own_encoding(t5_tokenizer(), r[1])) for r in ROWS)))
    with pytest.raises(ValueError, match=rf"m\.jsonl:{first_line}: the prompt in Q-Former tokens is {longest} "
                                         rf"tokens long, more than max_prompt_tokens={longest - 1}"):
        collate(items, max_prompt_tokens=longest - 1)
    with pytest.raises(ValueError, match=r"m\.jsonl:3: the answer in T5 tokens is 4 tokens long.*max_answer_tokens=3"):
        collate(items, max_answer_tokens=3)


def test_dataloader_with_two_workers_carries_both_tokenizers(tmp_path):
    write_images(tmp_path)
    rows = [{"image": i, "prompt": p, "answer": a} for i, p, a in ROWS] + [{**GOOD, "image": n} for n in BAD]
    dataset = VQADataset(read_vqa_manifest(write_manifest(tmp_path, rows)), on_bad_image="skip")
    sampler = GlobalBatchSampler(len(dataset), global_batch=7, micro_batch=1, seed=5)  # 7 micro-batches of 1
    collate_fn = functools.partial(collate_vqa, image_size=SIZE, qformer_tokenizer=qformer_tokenizer(),
                                   lm_tokenizer=t5_tokenizer(), max_answer_tokens=16)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2, collate_fn=collate_fn)
    sampler.set_state(epoch=1)
    batches = list(loader)

    order = epoch_order(len(dataset), seed=5, epoch=1)
    assert len(dataset) == 7 and len(batches) == 7
    for j, batch in enumerate(batches):
        expected = order[j: j + 1]
        in_process = collate_fn([dataset[i] for i in expected])  # the same batch, built here
        assert batch["index"].tolist() == [i for i in expected if i < len(ROWS)]
        assert [s.line - 1 for s in batch["skipped"]] == [i for i in expected if i >= len(ROWS)]
        for key, value in in_process.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(batch[key], value), key
            else:
                assert batch[key] == value, key
    assert (sum(len(b["skipped"]) for b in batches) == 3
            and all(isinstance(s, Skipped) for b in batches for s in b["skipped"]))
