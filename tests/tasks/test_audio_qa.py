"""--task audio-qa: manifests, the collate against transformers' Qwen2AudioProcessor, bad audio, word error
rate, the demo learning, eval.py reproducing it, and one run however the global batch is split."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import eval as evaluation
import train
from tests.conftest import build_task, train_flags
from evaluation.answers import word_errors
from data.audio_qa import AudioQADataset, check_texts, collate_audio_qa, read_audio_qa_manifest
from data.audio_text import BadAudioError, Skipped
from data.demo_audio_qa import ensure_demo_audio_qa
from data.manifest import ManifestError
from lora import lora_layers
from models.audio import clip_features
from models.qwen2_audio import audio_token_count, chat_prompt, load_qwen2_audio, load_qwen2_audio_tokenizer
from tests.qwen2_audio_fixtures import tokenizer_for
from tests.models.test_audio_features import LOG_MEL_ATOL
from tests.e2e.test_distributed import assert_same_run, torchrun


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's own generator at a test's size: 48 clips (96 questions) to train on, 8 (16) to evaluate."""
    return ensure_demo_audio_qa(tmp_path_factory.mktemp("audio-qa"), n_train=48, n_eval=8, seed=0, verbose=False)


def flags(demo, out, *extra):
    return train_flags(demo, out, *extra, task="audio-qa", eval_data=demo["eval_data"])

def item(wave, prompt="what do you hear", answer="loud noise", index=0):
    return {"index": index, "features": clip_features(torch.as_tensor(wave), 128), "prompt": prompt, "answer": answer,
            "path": f"clip{index}.wav", "line": index + 1, "where": f"m.jsonl:{index + 1}", "cache": None}


def test_collate_writes_what_transformers_processor_writes():
    """The chat prompt, one <|AUDIO|> per audio-tower output, and the 30 s features: Qwen2AudioProcessor's."""
    from transformers import PreTrainedTokenizerFast, Qwen2AudioProcessor, WhisperFeatureExtractor

    tokenizer = tokenizer_for()
    processor = Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128),
                                     tokenizer=PreTrainedTokenizerFast(tokenizer_object=tokenizer))
    rng = np.random.default_rng(0)
    waves = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in (16000 + 123, 9000)]
    for wave in waves:
        expected = processor(text=[chat_prompt("what do you hear")], audio=[wave], return_tensors="pt",
                             sampling_rate=16000)
        batch = collate_audio_qa([item(wave)], tokenizer, pad_to_30s=True)
        assert batch["prompt_input_ids"].tolist() == expected["input_ids"].tolist()
        # the processor's STFT of the 30 s waveform, ours of the clip alone: the mel matmul runs at another
        # width, so a value may move by an ulp or two (LOG_MEL_ATOL says how far at most)
        torch.testing.assert_close(batch["input_features"], expected["input_features"], rtol=0, atol=LOG_MEL_ATOL)
        assert torch.equal(batch["feature_attention_mask"], expected["feature_attention_mask"].long())


def test_collate_scores_the_answer_only_and_pads_prompts_on_the_left():
    tokenizer = tokenizer_for()
    rng = np.random.default_rng(1)
    items = [item((rng.standard_normal(n) * 0.1).astype(np.float32), answer=a, index=i)
             for i, (n, a) in enumerate([(16000, "loud noise"), (5000, "two short high tones")])]
    batch = collate_audio_qa(items, tokenizer)
    audio_id, im_end = tokenizer.token_to_id("<|AUDIO|>"), tokenizer.token_to_id("<|im_end|>")
    for row, it in enumerate(items):
        answer = tokenizer.encode(it["answer"], add_special_tokens=False).ids + [im_end]
        scored = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert scored == answer  # the answer and <|im_end|>; never the prompt, the audio or the padding
        n_audio = audio_token_count(it["features"].valid_frames)
        assert (int((batch["input_ids"][row] == audio_id).sum()) == n_audio
                == int((batch["prompt_input_ids"][row] == audio_id).sum()))
        prompt = batch["prompt_input_ids"][row][batch["prompt_attention_mask"][row].bool()].tolist()
        assert batch["input_ids"][row][: len(prompt)].tolist() == prompt  # input_ids = prompt + answer, right-padded
    assert batch["prompt_attention_mask"][:, -1].tolist() == [1, 1]  # left padding: every prompt ends the row
    assert batch["attention_mask"][:, 0].tolist() == [1, 1]
    assert batch["input_features"].shape[-1] == items[0]["features"].valid_frames + 2  # the longest clip + 2 frames


def test_manifest_errors_and_token_budgets(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"audio": "a.wav", "question": "how many?", "answer": "two"}\n')
    with pytest.raises(ManifestError, match=r'm.jsonl:1: missing "prompt" \(rename "question" to "prompt"\)'):
        read_audio_qa_manifest(path)
    path.write_text('\n{"audio": "a.wav", "prompt": "how many?", "answer": 2}\n')
    with pytest.raises(ManifestError, match='m.jsonl:2: "answer" must be a string, got int 2'):
        read_audio_qa_manifest(path)
    # under --on-bad-audio skip the bad lines are collected, named and left out, the good ones kept
    path.write_text('{"audio": "a.wav", "prompt": "how many?", "answer": "two"}\nnot json\n'
                    '{"audio": "b.wav", "prompt": " "}\n')
    bad_lines = []
    assert [e.line for e in read_audio_qa_manifest(path, bad_lines=bad_lines)] == [1]
    assert [(b.line, b.reason.split(" (")[0].split(";")[0]) for b in bad_lines] == [(2, "invalid JSON"),
                                                                                    (3, 'missing "answer"')]
    path.write_text('{"audio": "a.wav", "prompt": "what do you hear", "answer": "loud noise"}\n'
                    '{"audio": "a.wav", "prompt": "what <|AUDIO|> do you hear", "answer": "loud"}\n'
                    '{"audio": "a.wav", "prompt": "what do you hear", "answer": "loud noise loud noise"}\n')
    examples = read_audio_qa_manifest(path)
    assert examples[0].audio == tmp_path / "a.wav" and examples[1].line == 2
    problems = check_texts(examples, tokenizer_for(), max_answer_tokens=3)
    assert [(e.line, reason.split(";")[0]) for e, reason in problems] == [
        (2, "the prompt itself holds <|AUDIO|>"), (3, "the answer is 5 tokens long, more than max_answer_tokens=3")]


def test_bad_audio_fails_naming_the_line_or_is_skipped(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"not audio at all")
    sf.write(tmp_path / "good.wav", np.zeros(4000, dtype=np.float32) + 0.01, 16000)
    path = tmp_path / "m.jsonl"
    path.write_text('{"audio": "good.wav", "prompt": "what do you hear", "answer": "loud noise"}\n'
                    '{"audio": "bad.wav", "prompt": "what do you hear", "answer": "loud noise"}\n')
    examples = read_audio_qa_manifest(path)
    with pytest.raises(BadAudioError, match=r"m.jsonl:2: .*--on-bad-audio skip"):
        AudioQADataset(examples, n_mels=128)[1]
    skipping = AudioQADataset(examples, on_bad_audio="skip", n_mels=128)
    assert isinstance(skipping[1], Skipped) and skipping[1].line == 2
    batch = collate_audio_qa([skipping[0], skipping[1]], tokenizer_for())
    assert batch["input_ids"].shape[0] == 1 and batch["skipped"][0].path.endswith("bad.wav")
    empty = collate_audio_qa([skipping[1]], tokenizer_for())
    assert empty["input_ids"] is None and empty["index"].numel() == 0


def test_word_errors_counts_edits_between_normalized_answers():
    assert word_errors("two short high tones", "Two short high tones.") == 0
    assert word_errors("two high tones", "two short high tones") == 1  # a deletion
    assert word_errors("a rising rising chirp", "a rising chirp") == 1  # an insertion
    assert word_errors("one long low hum", "two short high tones") == 4
    assert word_errors("", "loud noise") == 2


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    model, history = train.train(train.parse_args(flags(demo, out, "--max-steps", "60", "--batch-size", "16",
                                                        "--lr", "5e-3", "--warmup-steps", "5",
                                                        "--train-also", "multi_modal_projector")))
    return out, model, history


def test_demo_learns_answer_loss_falls_and_exact_match_beats_the_untrained_model(trained):
    out, model, history = trained
    before, after = history["before"], history["after"]
    assert after["loss"] < 0.5 * before["loss"]
    assert after["exact_match"] > before["exact_match"]
    assert after["wer"] < before["wer"]
    assert {path.split(".", 1)[0] for path in lora_layers(model)} == {"language_model"}  # the task's default targets
    run = json.loads((out / "run_config.json").read_text())
    assert run["task"] == "audio-qa" and run["train_also"] == ["multi_modal_projector"]
    assert len(after["samples"]) == 5 and {"prompt", "answer", "generated"} <= set(after["samples"][0])


def test_eval_reproduces_the_final_answers_and_no_adapter_differs(trained, tmp_path):
    out, _, history = trained
    result = subprocess.run([sys.executable, "eval.py", "--checkpoint", str(out), "--json", str(tmp_path / "m.json")],
                            cwd=Path(evaluation.__file__).parent, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert (metrics["exact_match"] == history["after"]["exact_match"]
            and metrics["wer"] == pytest.approx(history["after"]["wer"]))
    assert metrics["loss"] == pytest.approx(history["after"]["loss"], abs=1e-5)
    assert f"exact match {metrics['exact_match']:.2f}%, WER" in result.stdout
    assert evaluation.main(["--checkpoint", str(out), "--no-adapter"])["loss"] != pytest.approx(metrics["loss"],
                                                                                                abs=1e-3)


def test_export_of_an_audio_qa_run_loads_in_transformers_and_equals_ours_with_the_adapter(trained, demo, tmp_path):
    """The whole Qwen2-Audio, LoRA merged into its language model (and the trained projector written
    in): transformers' Qwen2AudioForConditionalGeneration computes what our run with its adapter does."""
    from transformers import Qwen2AudioForConditionalGeneration

    from models.export import export_run

    out, _, _ = trained
    export_run(out, tmp_path / "export")
    reference = Qwen2AudioForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
    ours, tokenizer, _ = evaluation.load_checkpoint(out)
    dataset = AudioQADataset(read_audio_qa_manifest(demo["eval_data"])[:3], n_mels=ours.audio_tower.config.num_mel_bins)
    batch = collate_audio_qa([dataset[i] for i in range(3)], tokenizer, pad_to_30s=True)  # the reference wants 30 s
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "input_features", "feature_attention_mask")}
    with torch.no_grad():
        theirs = reference(**inputs).logits
        mine = ours(**inputs).logits
        base = load_qwen2_audio(demo["model"])(**inputs).logits  # the base alone: the export must differ from it
    real = inputs["attention_mask"].bool()  # right padding: the logits at pad positions mean nothing
    torch.testing.assert_close(mine[real], theirs[real], atol=1e-4, rtol=1e-4)
    assert (base[real] - theirs[real]).abs().max() > 1e-2


def run_of(demo, out, *extra):
    train.train(train.parse_args(flags(demo, out, "--batch-size", "8", "--max-steps", "3", "--dropout", "0",
                                       "--lr", "3e-3", "--warmup-steps", "1", "--eval-data", "", *extra)))
    return out


def test_micro_batches_and_two_processes_train_the_same_run_as_the_whole_batch(demo, tmp_path):
    """Token-weighted accumulation: each micro-batch's loss weighted by its share of the global batch's
    answer tokens, so 4 x 2 (and 2 ranks x 2 x 2 under torchrun) equal 8 at once."""
    whole = run_of(demo, tmp_path / "whole")
    assert_same_run(run_of(demo, tmp_path / "micro2", "--micro-batch-size", "2"), whole)
    result = torchrun(flags(demo, tmp_path / "ddp", "--batch-size", "8", "--max-steps", "3", "--dropout", "0",
                            "--lr", "3e-3", "--warmup-steps", "1", "--eval-data", "", "--micro-batch-size", "2"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((tmp_path / "ddp" / "run_config.json").read_text())["world_size"] == 2
    assert_same_run(tmp_path / "ddp", whole)


def test_the_demo_is_deterministic_and_its_tokenizer_fits_its_model(demo, tmp_path):
    again = ensure_demo_audio_qa(tmp_path, n_train=48, n_eval=8, seed=0, verbose=False)
    for name in ("model/model.safetensors", "model/tokenizer.json", "sounds/train.jsonl",
                 "sounds/audio/train_0003.wav"):
        first, second = Path(demo["model"]).parent / name, Path(again["model"]).parent / name
        assert first.read_bytes() == second.read_bytes(), name
    tokenizer = load_qwen2_audio_tokenizer(demo["model"])
    config = json.loads(open(f"{demo['model']}/config.json").read())
    assert tokenizer.token_to_id("<|AUDIO|>") == config["audio_token_index"]
    assert tokenizer.token_to_id("<|im_end|>") == config["text_config"]["eos_token_id"]
    answers = [json.loads(line)["answer"] for line in open(demo["eval_data"])]
    assert all(tokenizer.decode(tokenizer.encode(a).ids) == a for a in answers)  # nothing becomes [UNK]


def test_a_micro_batch_whose_clips_were_all_skipped_adds_nothing(demo, tmp_path):
    """Zero rows keep a rank in DDP's collectives: the forward runs on them, and the global batch's loss and
    gradients are those of the readable examples alone."""
    import contextlib

    from engine.training import StepEnv
    from lora import LoRAConfig, inject_lora, mark_only_lora_trainable

    task, targets = build_task(train.parse_args(flags(demo, tmp_path, "--dropout", "0")))
    inject_lora(task.model, LoRAConfig(targets, r=4, alpha=8))
    mark_only_lora_trainable(task.model, also=["multi_modal_projector"])
    env = StepEnv(torch.device("cpu"), contextlib.nullcontext, lambda loss: loss.backward())
    readable = task.collate([task.dataset[i] for i in range(4)])
    skipped = task.collate([Skipped("bad.wav", 3, "undecodable")])
    results = []
    for micro_batches in ([readable], [skipped, readable]):
        loss = task.forward_backward(task.model, micro_batches, env)
        results.append((loss, {n: p.grad.clone() for n, p in task.model.named_parameters() if p.requires_grad}))
        task.model.zero_grad(set_to_none=True)
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, msg=name)
    assert results[0][1]["multi_modal_projector.linear.weight"].abs().sum() > 0
