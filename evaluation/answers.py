"""Answers, evaluated: one greedy-answer loop for every task whose model answers in words (InstructBLIP's
VQA, the whole Qwen2-Audio's audio questions).

For each batch of held-out examples:
    loss       the language model's cross-entropy on the reference answer tokens (+ the end token),
               weighted by answer tokens over the whole set, as one big batch would give it
    generate   greedy answers from the prompts alone, stopped at the end token(s)
    compare    exact match of the normalised texts (lowercase, single spaces, no trailing
               punctuation); the word error rate (word edits / reference words over the whole set)

A task says how its collated batches feed this loop with an AnswerBatches: which tensors condition the
answer (an image, a clip), which hold the prompt to generate from, where generation stops, and how
generated ids become text.
"""

import math
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from common.precision import Precision


@dataclass(frozen=True)
class AnswerBatches:
    condition: tuple[str, ...]  # batch keys of what the answer is about (pixel values and Q-Former ids, a log-mel)
    prompt: tuple[str, str]  # (ids, mask) keys generation starts from: the prompt without its answer
    stop: int | tuple[int, ...] | None  # the end token id(s) generation stops at (None: the model's own)
    decode: Callable[[list[int]], str]  # generated ids -> the answer's text


def answer_text(tokenizer, ids: list[int], stop: set[int], skip_first: bool = False) -> str:
    """Generated ids -> text: up to the first end token (what follows is padding), special tokens dropped.
    `skip_first`: the ids begin with a decoder start token (T5), which is not part of the answer."""
    answer = []
    for token in ids[1 if skip_first else 0:]:
        if token in stop:
            break
        answer.append(token)
    return tokenizer.decode(answer, skip_special_tokens=True)


def normalize_answer(text: str) -> str:
    """What exact match compares: lowercase, single spaces, no trailing punctuation."""
    return " ".join(text.lower().split()).rstrip(".!?,;: ")


def word_errors(hypothesis: str, reference: str) -> int:
    """Word-level Levenshtein distance (substitutions + insertions + deletions) of two normalized answers."""
    hyp, ref = normalize_answer(hypothesis).split(), normalize_answer(reference).split()
    row = list(range(len(hyp) + 1))  # distances from the empty reference prefix
    for i, word in enumerate(ref, 1):
        previous, row[0] = row[0], i
        for j, guess in enumerate(hyp, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (word != guess))
    return row[-1]


@torch.no_grad()
def evaluate_answers(model, loader, spec: AnswerBatches, *, device="cpu", precision: str = "fp32",
                     max_new_tokens: int = 16, n_samples: int = 5, progress: bool = True, wer: bool = False) -> dict:
    """Answer loss, perplexity, exact match (percent) and, with `wer`, the word error rate (percent) of greedy
    answers over the batches of `loader` (collated examples carrying labels, prompts and answers), with a
    few samples. The model is evaluated in eval mode and handed back in the mode it came in."""
    was_training = model.training
    model.eval()
    loss_sum, n_tokens, correct, edits, words, n_examples, samples = 0.0, 0, 0, 0, 0, 0, []
    with Precision(precision).autocast(device):
        for batch in tqdm(loader, desc="answer", unit="batch", disable=None if progress else True, leave=False):
            condition = {key: batch[key].to(device) for key in spec.condition}
            labels = batch["labels"].to(device)
            real = int((labels != -100).sum())
            out = model(**condition, input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device), labels=labels)
            loss_sum += float(out.loss) * real  # token-weighted, as one big batch
            n_tokens += real
            ids_key, mask_key = spec.prompt
            generated = model.generate(**condition, input_ids=batch[ids_key].to(device),
                                       attention_mask=batch[mask_key].to(device), max_new_tokens=max_new_tokens,
                                       eos_token_id=spec.stop)
            for prompt, answer, ids in zip(batch["prompts"], batch["answers"], generated.tolist()):
                text = spec.decode(ids)
                n_examples += 1
                correct += normalize_answer(text) == normalize_answer(answer)
                edits += word_errors(text, answer)
                words += len(normalize_answer(answer).split())
                if len(samples) < n_samples:
                    samples.append({"prompt": prompt, "answer": answer, "generated": text})
    model.train(was_training)
    loss = loss_sum / max(1, n_tokens)
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
               "exact_match": 100.0 * correct / max(1, n_examples)}
    if wer:
        metrics["wer"] = 100.0 * edits / max(1, words)
    return metrics | {"n_examples": n_examples, "samples": samples}


def format_answers(metrics: dict, title: str = "") -> str:
    """The terminal's view of evaluate_answers: the headline numbers, then the samples."""
    wer = f"WER {metrics['wer']:.2f}%, " if "wer" in metrics else ""
    lines = [f"{title or 'answers'} ({metrics['n_examples']} examples): exact match {metrics['exact_match']:.2f}%, "
             f"{wer}answer loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.2f}"]
    lines += [f"  Q: {s['prompt']}  A: {s['answer']}  generated: {s['generated']!r}" for s in metrics["samples"]]
    return "\n".join(lines)
