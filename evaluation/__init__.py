"""Evaluation below the tasks: retrieval metrics, the greedy-answer loop, zero-shot classification, search."""
