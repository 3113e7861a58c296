"""`bbni`: a real instruction stream from BIG-bench and its Natural Instructions subtasks.

Each task is read from the BIG-bench 1.0.0 archive (`pm_ray.data.bigbench`), split and subsampled
deterministically (`pm_ray.data.subsample`: test rows first, label-balanced, seed 0). Multiple-choice
tasks are scored by choice log-likelihood, generation tasks by exact match against any reference.
Natural Instructions prefixes keep only their short `Prompt:` line (the full definitions run to
600+ tokens, which a 2-core CPU cannot train on within the demo's budget).
How the tasks were chosen, and their measured difficulty: docs/bbni.md.
"""

from __future__ import annotations

from typing import Any

NI = "natural_instructions"
# Every candidate measured for the suite (docs/bbni.md); BBNI_TASKS below is the chosen stream.
CANDIDATES: dict[str, dict[str, Any]] = {
    "intent": {"path": "bigbench:intent_recognition"},
    "sports": {"path": "bigbench:sports_understanding"},
    "fever": {"path": "bigbench:fact_checker/fever"},
    "strategyqa": {"path": "bigbench:strategyqa"},
    "epistemic": {"path": "bigbench:epistemic_reasoning"},
    "vitaminc": {"path": "bigbench:vitaminc_fact_verification"},
    "social_iqa": {"path": "bigbench:social_iqa"},
    "hyperbaton": {"path": "bigbench:hyperbaton"},
    "color_rgb": {"path": "bigbench:color/rgb"},
    "object_counting": {"path": "bigbench:object_counting"},
    "past_tense": {"path": "bigbench:linguistic_mappings/past_tense_json"},
    "question_type": {"path": f"bigbench:{NI}/subtask046_miscellaenous_question_typing", "instruction_part": "prompt"},
    "qasc_answer": {"path": f"bigbench:{NI}/subtask041_qasc_answer_generation", "instruction_part": "prompt"},
    "winogrande_answer": {
        "path": f"bigbench:{NI}/subtask033_winogrande_answer_generation",
        "instruction_part": "prompt",
    },
}
# The stream: multiple choice and generation, six domains (social commonsense, science QA, assistant
# intents, question typing, English verb morphology, commonsense fill-in). fever was measured and
# replaced: trained alone it stays at the majority label (docs/bbni.md).
BBNI_TASKS: tuple[str, ...] = (
    "social_iqa",
    "qasc_answer",
    "intent",
    "question_type",
    "past_tense",
    "winogrande_answer",
)
SIZES: dict[str, tuple[int, int]] = {"quick": (160, 100), "full": (400, 250)}  # (train, test) rows a task


def bbni_specs(variant: str, seed: int, tasks: tuple[str, ...] = BBNI_TASKS) -> list[dict[str, Any]]:
    """`tasks.files` entries of the suite (any of them can be copied into a job YAML)."""
    if variant not in SIZES:
        raise ValueError(f"unknown bbni variant {variant!r}: expected one of {list(SIZES)}")
    train, test = SIZES[variant]
    return [{"name": name, **CANDIDATES[name], "max_train": train, "max_test": test, "seed": seed} for name in tasks]
