"""Zero-shot classification with a trained audio-text model (CLIP's recipe, Radford et al. 2021): each class
name becomes a text prompt through the template(s); a clip is assigned the class whose prompt embedding is
closest. With several templates, a class's prompt embeddings are averaged and renormalised (CLIP's prompt
ensembling). Labels come from data/audio_folder.py `read_labelled_audio`: ROOT/<label>/*.wav, or a CSV."""

import sys
from pathlib import Path

import numpy as np

from data.audio_folder import label_text, read_labelled_audio
from data.search_index import unreadable

DEFAULT_TEMPLATE = "the sound of {label}"
TOP_K = 5


def class_embeddings(model, classes: list[str], templates: list[str], batch_size=32) -> np.ndarray:
    """(C, E) unit-length text embeddings of the classes: each template filled with label_text(class),
    embedded, and, with several templates, averaged and renormalised (CLIP's prompt ensembling)."""
    prompts = [template.replace("{label}", label_text(name)) for name in classes for template in templates]
    text = model.embed_text(prompts, batch_size=batch_size).numpy()  # (C * T, E)
    text = text.reshape(len(classes), len(templates), -1).mean(axis=1)  # (C, T, E) -> (C, E)
    return text / np.linalg.norm(text, axis=-1, keepdims=True)


def zero_shot_metrics(similarity: np.ndarray, truth: np.ndarray, classes: list[str]) -> dict:
    """Top-1, top-5 and per-class top-1 accuracy (fractions) from (N, C) clip-class similarities.

    Classes are ranked by similarity, ties by class order (a stable sort); with fewer than 5
    classes, "top5" counts the top C, which is always 1.0.
    """
    order = np.argsort(-similarity, axis=1, kind="stable")  # (N, C) best first
    top1 = order[:, 0] == truth
    top5 = (order[:, :TOP_K] == truth[:, None]).any(axis=1)
    per_class = {name: float(top1[truth == c].mean()) for c, name in enumerate(classes) if (truth == c).any()}
    return {"accuracy": float(top1.mean()), "top5": float(top5.mean()), "per_class": per_class,
            "n": int(len(truth)), "n_classes": len(classes)}


def format_zero_shot(metrics: dict, counts: dict, title: str) -> str:
    width = max(len(name) for name in metrics["per_class"])
    lines = [f"{title} ({metrics['n']} clips, {metrics['n_classes']} classes): "
             f"top-1 {100 * metrics['accuracy']:.2f}%, top-5 {100 * metrics['top5']:.2f}%", "  per class (top-1):"]
    lines += [f"    {name:<{width}}  {counts[name]:>5} clips  {100 * accuracy:6.2f}%"
              for name, accuracy in metrics["per_class"].items()]
    return "\n".join(lines)


def classify_zero_shot(model, source, templates: list[str] | None = None, audio_dir=None, batch_size: int = 32,
                       workers: int = 0, feature_cache=None, with_adapter: bool = True) -> dict:
    """Classify the labelled clips of `source` (class folders or a CSV) by their labels' prompts; print the
    table and return the accuracies, with the templates used. Unreadable clips are listed on stderr."""
    templates = templates or [DEFAULT_TEMPLATE]
    for template in templates:
        if "{label}" not in template:
            raise ValueError(f"--template {template!r} has no {{label}} where the class name goes")
    pairs = read_labelled_audio(source, audio_dir=audio_dir)
    problems = [(path, reason) for path, _ in pairs if (reason := unreadable(path))]
    if problems:
        for path, reason in problems[:10]:
            print(f"{path}: {reason}", file=sys.stderr)
        raise ValueError(f"{len(problems)} clip(s) of {source} cannot be read (listed above); "
                         "evaluation needs every clip")
    classes = sorted({label for _, label in pairs})
    truth = np.array([classes.index(label) for _, label in pairs])  # (N,)
    audio = model.embed_audio([path for path, _ in pairs], batch_size=batch_size, workers=workers,
                              feature_cache=feature_cache).numpy()
    text = class_embeddings(model, classes, templates, batch_size)
    metrics = zero_shot_metrics(audio @ text.T, truth, classes) | {"templates": templates}
    counts = {name: int((truth == c).sum()) for c, name in enumerate(classes)}
    title = (f"zero-shot {Path(source).name}, {'with adapter' if with_adapter else 'no adapter'}, "
             f"prompt{'s' if len(templates) > 1 else ''} {', '.join(map(repr, templates))}")
    print(format_zero_shot(metrics, counts, title))
    return metrics
