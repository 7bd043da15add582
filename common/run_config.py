"""The typed configuration of a training run: built once from the command line (and a recipe file, and the
task's demo defaults) by train.py, completed once when setup knows the data and the model, never mutated,
saved as run_config.json and read back by eval.py, `load_run`, the exporter and `--resume`.

    RunConfig
      sources     what the run reads: the task, checkpoints (directory or hub id), manifests, audio folders
      model       how the model is built: embedding width, encoding strategy, dtypes, quantization
      lora        where LoRA goes and what shape it has: targets, rank, alpha, variants, --train-also
      optim       what one step does: learning rate, batch sizes, clipping, seed, length of the run
      data        how examples are read: bad-input policy, bucketing, workers, the feature cache
      schedule    when the loop evaluates, saves and logs
      precision   fp32 | bf16 | fp16 (common/precision.py)

Every section is a frozen dataclass; changing a field means building a new config
(`dataclasses.replace`), so whatever holds one can trust it. run_config.json is flat, one key a field
(the sections' field names are distinct), as earlier versions wrote it; keys a reader does not know
are left alone and missing ones take their defaults, so older runs still load.

The fields marked DEFINES_RUN are the run's fingerprint: resuming with any of them changed would
continue a different run, so `--resume` refuses it (engine/training.py TrainState).
"""

import dataclasses
import json
from dataclasses import dataclass, field, fields

DEFINES_RUN = {"defines_run": True}  # field metadata: part of the resume fingerprint
SECTIONS = ("sources", "model", "lora", "optim", "data", "schedule")
PATTERNS = ("rank_pattern", "alpha_pattern")  # (regex, value) pairs in Python, a JSON object in the file


def defines_run(default=None, **kwargs):
    return field(default=default, metadata=DEFINES_RUN, **kwargs)


@dataclass(frozen=True)
class Sources:
    task: str = defines_run("audio-text")
    demo: bool = False  # no model or data given: the task's offline demo (synthetic data, small random models)
    audio_model: str | None = defines_run()  # audio-text: Qwen2-Audio or Whisper checkpoint, directory or hub id
    text_model: str | None = defines_run()  # audio-text: BERT-family checkpoint
    model: str | None = defines_run()  # instructblip: InstructBLIP; audio-qa: a whole Qwen2-Audio
    train_data: str | None = defines_run()
    train_data_sha256: str | None = defines_run()  # the manifest's content: an edited manifest is another run
    eval_data: str | None = None
    train_audio_dir: str | None = None  # where the training manifest's audio was found
    eval_audio_dir: str | None = None


@dataclass(frozen=True)
class ModelSettings:
    embed_dim: int = defines_run(256)  # audio-text: width of the shared embedding space
    encoding_strategy: str = defines_run("audio_tower")  # audio-text: the tower alone, or the whole Qwen2-Audio
    language_model_dtype: str = defines_run("fp32")  # the frozen language model's dtype (fp32 | bf16)
    pad_to_30s: bool = defines_run(False)  # pad every clip to 30 s as the reference does
    quantize: str = defines_run("none")  # none | nf4 (QLoRA: frozen Linear layers in 4 bits)
    quantize_keep: tuple[str, ...] = defines_run(())  # module paths NF4 leaves in their dtype (they train)


@dataclass(frozen=True)
class LoRASettings:
    targets: tuple[str, ...] = defines_run(())  # regexes fullmatched against module paths, as expanded
    rank: int = defines_run(16)
    alpha: float = defines_run(32.0)
    dropout: float = defines_run(0.1)
    rslora: bool = defines_run(False)
    dora: bool = defines_run(False)
    rank_pattern: tuple[tuple[str, int], ...] = defines_run(())  # (regex, rank): the first match wins
    alpha_pattern: tuple[tuple[str, float], ...] = defines_run(())
    init: str = defines_run("default")  # default | gaussian | pissa | pissa_niter_N | olora
    lora_plus_ratio: float | None = defines_run()  # LoRA+: lora_B's learning rate over the rest's
    train_also: tuple[str, ...] = defines_run(())  # modules or parameters trained fully beside LoRA


@dataclass(frozen=True)
class Optimization:
    lr: float = defines_run(1e-3)
    min_lr: float = defines_run(0.0)  # where the cosine decay ends
    weight_decay: float = defines_run(0.01)
    batch_size: int = defines_run(32)  # the GLOBAL batch: examples per optimizer step over every process
    micro_batch_size: int | None = None  # per process per forward; how the batch is split never changes the run
    grad_clip: float = defines_run(1.0)
    seed: int = defines_run(0)
    warmup_steps: int | None = defines_run()
    max_steps: int | None = defines_run()
    epochs: float | None = None  # what max_steps was derived from, when it was
    world_size: int = 1  # processes of the run that wrote this file


@dataclass(frozen=True)
class DataSettings:
    on_bad_input: str = "fail"  # fail | skip: a bad training example stops the run, or is counted and listed
    bucket_by_length: bool = True
    bucket_across_batches: bool = defines_run(False)  # changes which clips share a batch: another run
    workers: int = 2  # DataLoader workers per process
    feature_cache: bool = True  # log-mel computed once per clip and kept under cache_dir
    cache_dir: str | None = None  # demo sets, demo models, the feature cache, shard indexes
    # answer tasks: examples end to end in rows of at most this many language-model tokens (None: padded batches);
    # the same loss within float rounding, so a resume must not switch it
    pack: int | None = defines_run()
    # a Hugging Face dataset's columns or a shard's json keys (None: found from the schema): which data it is
    audio_column: str | None = defines_run()
    text_column: str | None = defines_run()
    image_column: str | None = defines_run()
    prompt_column: str | None = defines_run()
    answer_column: str | None = defines_run()


@dataclass(frozen=True)
class Schedule:
    eval_every: int | None = None  # 0: only before and after training
    save_every: int | None = None  # 0: only at the end
    log_every: int = 10  # steps between the host's looks at the device
    max_bad_steps: int = 5  # non-finite steps in a row before the run aborts


@dataclass(frozen=True)
class RunConfig:
    sources: Sources = field(default_factory=Sources)
    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoRASettings = field(default_factory=LoRASettings)
    optim: Optimization = field(default_factory=Optimization)
    data: DataSettings = field(default_factory=DataSettings)
    schedule: Schedule = field(default_factory=Schedule)
    precision: str = defines_run("fp32")

    @property
    def task(self) -> str:
        return self.sources.task

    def sections(self) -> dict:
        return {name: getattr(self, name) for name in SECTIONS}

    def replace(self, **changes) -> "RunConfig":
        """A new config with fields changed, named by their flat names: replace(max_steps=600, targets=(...))."""
        by_section: dict[str, dict] = {}
        top = {}
        for name, value in changes.items():
            owner = next((s for s, obj in self.sections().items() if name in {f.name for f in fields(obj)}), None)
            if owner is not None:
                by_section.setdefault(owner, {})[name] = _frozen(value)
            elif name == "precision":
                top[name] = value
            else:
                raise KeyError(f"RunConfig has no field {name!r}")
        new = {s: dataclasses.replace(getattr(self, s), **values) for s, values in by_section.items()}
        return dataclasses.replace(self, **new, **top)

    def to_json(self) -> dict:
        """The flat JSON object of run_config.json: one key a field, tuples as lists, patterns as objects."""
        flat = {}
        for section in self.sections().values():
            flat.update({f.name: _plain(f.name, getattr(section, f.name)) for f in fields(section)})
        flat["precision"] = self.precision
        return flat

    @classmethod
    def from_json(cls, flat: dict) -> "RunConfig":
        """The inverse of to_json; keys it does not know are ignored, missing ones take their defaults."""
        sections = {}
        for name in SECTIONS:
            section_type = type(getattr(cls(), name))
            # a null where the field has a default means that default (earlier versions wrote null for unused fields)
            given = {f.name: _frozen(flat[f.name]) for f in fields(section_type)
                     if f.name in flat and (flat[f.name] is not None or _default(f) is None)}
            sections[name] = section_type(**given)
        return cls(**sections, precision=flat.get("precision", "fp32"))

    def fingerprint(self) -> dict:
        """The fields that define the run (DEFINES_RUN), as JSON values: what a resume must match."""
        flat = self.to_json()
        marked = [f.name for section in self.sections().values() for f in fields(section)
                  if f.metadata.get("defines_run")]
        return {name: flat[name] for name in marked + ["precision"]}

    @classmethod
    def normalized_fingerprint(cls, saved: dict) -> dict:
        """A fingerprint saved by any version, read with today's defaults for what it lacks or left null."""
        return cls.from_json(saved).fingerprint()

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"


def _plain(name: str, value):
    """A field's JSON value: patterns become objects, other tuples lists."""
    if name in PATTERNS:
        return dict(value)
    return list(value) if isinstance(value, tuple) else value


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _frozen(value):
    """A JSON or Python value as a frozen field value: lists become tuples, objects (key, value) pairs."""
    if isinstance(value, dict):
        return tuple(value.items())
    return tuple(value) if isinstance(value, list) else value
