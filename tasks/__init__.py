"""The tasks train.py trains and eval.py evaluates: one file each, so the loop in train.py is the same for all.

A task builds its model and data from the run configuration, and knows how to turn one optimizer step's
micro-batches into gradients (`forward_backward`), how to evaluate, and how to report:

    AudioTextTask    (tasks/audio_text.py)  the dual encoder; InfoNCE over the *global* batch: embeddings
                     gathered from every rank, GradCache across micro-batches (tasks/contrastive.py);
                     retrieval recall (evaluation/retrieval.py)
    InstructBlipTask (tasks/instructblip.py)  InstructBLIP; answer-token cross-entropy, each micro-batch
                     weighted by its share of the global batch's answer tokens (tasks/answer.py); exact
                     match of greedy answers (evaluation/answers.py)
    AudioQATask      (tasks/audio_qa.py)  the whole Qwen2-Audio answering questions about clips; the same
                     loss, plus the word error rate of its answers

Each reaches the result a single process would get by taking the whole global batch at once
(tests/e2e/test_distributed.py), so a run is defined by its global batch, never by how it is split.

What train.py and eval.py call, for every task:
    demo_defaults, demo_sources(config)        the offline demo's settings and its data and models
    Task(config, say)                          model (no LoRA yet), dataset, collate; .config as completed
    heads, default_targets, forward_strategy   what trains beside LoRA, where LoRA goes, what runs
    prepare, inputs, forward_backward,         one optimizer step's work (engine/training.py train_step)
      micro_batch_loss
    evaluate(model, ...)                       during training, on the run's eval manifest
    load_trained(run_dir, ...), evaluate_file  a finished run, for eval.py
    format, headline, curves                   the terminal's table, the summary line, the plot
"""

from tasks.audio_qa import AudioQATask
from tasks.audio_text import AudioTextTask
from tasks.instructblip import InstructBlipTask

TASKS = {task.name: task for task in (AudioTextTask, InstructBlipTask, AudioQATask)}
