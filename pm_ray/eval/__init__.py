"""Evaluation harness: one entry point, `evaluate_task`, sharded with an exact global reduction."""

from __future__ import annotations

from pm_ray.eval.evaluate import evaluate_stream, evaluate_task

__all__ = ["evaluate_task", "evaluate_stream"]
