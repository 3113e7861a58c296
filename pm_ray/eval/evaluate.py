"""`evaluate_task`: the score of a model on one task's test split.

instruction without choices -> greedy generation, normalised exact match;
instruction with choices    -> length-normalised log-likelihood of each choice;
classification              -> per-task heads: task-agnostic accuracy (score) and task-aware accuracy.
Ranks evaluate disjoint round-robin shards of the (first `max_rows`) test rows; integer counts are
summed through `all_reduce`, so the global score equals the single-process score exactly.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pm_ray.data.schema import Task
from pm_ray.eval.choices import choice_scores, count_choice_correct
from pm_ray.eval.classification import classification_counts
from pm_ray.eval.generation import count_exact_matches, generate_answers
from pm_ray.eval.reduce import AllReduce, sum_counts
from pm_ray.eval.rows import eval_rows


def evaluate_task(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    max_rows: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    all_reduce: AllReduce | None = None,
    max_length: int = 1024,
) -> dict[str, Any]:
    """Evaluate `model` on `task`.test. Returns {"score", "correct", "total", "metric", ...}.

    Classification adds "task_aware_score" / "task_aware_correct". `max_length` bounds prompt (and
    prompt + choice) length in tokens; longer prompts keep their end.
    """
    rows = eval_rows(task, max_rows=max_rows, rank=rank, world_size=world_size)
    was_training = model.training
    model.eval()
    try:
        if task.kind == "classification":
            agnostic, aware = (
                classification_counts(model, tokenizer, task, rows, batch_size=batch_size, max_length=max_length)
                if rows
                else (0, 0)
            )
            correct, aware, total = sum_counts([agnostic, aware, len(rows)], all_reduce)
            return {
                "score": correct / total,
                "correct": correct,
                "total": total,
                "task_aware_score": aware / total,
                "task_aware_correct": aware,
                "metric": "task_agnostic_accuracy",
            }
        if task.has_choices:
            local = (
                count_choice_correct(
                    choice_scores(model, tokenizer, rows, batch_size=batch_size, max_length=max_length), rows
                )
                if rows
                else 0
            )
            metric = "choice_accuracy"
        else:
            local = (
                count_exact_matches(
                    generate_answers(
                        model,
                        tokenizer,
                        rows,
                        batch_size=batch_size,
                        max_new_tokens=max_new_tokens,
                        max_prompt_length=max_length,
                    ),
                    rows,
                )
                if rows
                else 0
            )
            metric = "exact_match"
        correct, total = sum_counts([local, len(rows)], all_reduce)
        return {"score": correct / total, "correct": correct, "total": total, "metric": metric}
    finally:
        model.train(was_training)


def evaluate_stream(model: nn.Module, tokenizer: Any, tasks: list[Task], **kwargs: Any) -> dict[str, dict[str, Any]]:
    """`evaluate_task` on every task (e.g. all seen tasks after learning one), keyed by task name."""
    return {task.name: evaluate_task(model, tokenizer, task, **kwargs) for task in tasks}
