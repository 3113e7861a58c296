"""The shared prompt prefix run once (eval/prefix.py): the same scores and answers as running every
prompt whole, for prompts that share a long instruction and prompts that share nothing."""

from __future__ import annotations

import pytest
import torch

from pm_ray.data.prompts import format_prompt
from pm_ray.eval.choices import choice_scores, pairwise_choice_scores
from pm_ray.eval.generation import generate_answers
from pm_ray.eval.prefix import MIN_SHARED_TOKENS, PromptPrefix, shared_prefix_length

INSTRUCTION = "Read the question and pick the answer that fits the context best, " * 3


def task_rows(n: int) -> list[dict]:
    """One task: the same long instruction, inputs of 1 to ~40 words, 2-4 choices."""
    words = "river stone light morning water under never always reason found".split()
    return [
        {
            "instruction": INSTRUCTION,
            "input": " ".join(words[: 1 + (7 * i) % 10]) * (1 + i % 4),
            "output": "yes",
            "choices": ["yes", "no", "it is not possible to tell", "blue"][: 2 + i % 3],
        }
        for i in range(n)
    ]


def test_shared_prefix_length_keeps_a_token_for_every_row():
    assert shared_prefix_length([]) == 0
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5, 6]]) == 3
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter prompt keeps its last token
    assert shared_prefix_length([[7, 1], [8, 1]]) == 0
    assert shared_prefix_length([[1, 2, 3, 4]]) == 3


def test_a_short_common_start_is_not_cached(lora_model):
    model, _ = lora_model
    prefix = PromptPrefix.build(model, [[5] * (MIN_SHARED_TOKENS - 1) + [1, 2], [5] * 20], torch.device("cpu"))
    assert len(prefix) == 0 and prefix.cache is None and prefix.cache_for(3) is None


def test_pack_puts_the_padding_between_prefix_and_own_tokens(lora_model):
    model, _ = lora_model
    shared = list(range(10, 22))
    prefix = PromptPrefix.build(model, [shared + [1, 2, 3], shared + [4]], torch.device("cpu"))
    assert prefix.ids == shared
    ids, mask, positions = prefix.pack([shared + [1, 2, 3], shared + [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1] * 12 + [1, 1, 1], [1] * 12 + [0, 0, 1]]
    assert positions.tolist() == [[12, 13, 14], [12, 12, 12]]
    cache = prefix.cache_for(2)
    assert cache.get_seq_length() == 12 and prefix.cache.get_seq_length() == 12  # a copy, batch of 2


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_choice_scores_with_the_shared_prefix_equal_whole_prompts(lora_model, batch_size):
    model, tok = lora_model
    rows = task_rows(9)
    prompts = [tok(format_prompt(tok, r), add_special_tokens=False)["input_ids"] for r in rows]
    assert shared_prefix_length(prompts) >= 30  # the instruction is shared: the prefix path runs
    shared = choice_scores(model, tok, rows, batch_size=batch_size, max_length=1024)
    whole = choice_scores(model, tok, rows, batch_size=batch_size, max_length=1024, share_prefix=False)
    reference = pairwise_choice_scores(model, tok, rows, batch_size=4, max_length=1024)
    for s, w, r in zip(shared, whole, reference, strict=True):
        assert s == pytest.approx(w, abs=1e-5)
        assert s == pytest.approx(r, abs=1e-4)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_generation_with_the_shared_prefix_equals_whole_prompts(lora_model, batch_size):
    model, tok = lora_model
    rows = task_rows(7)
    kw = {"batch_size": batch_size, "max_new_tokens": 6, "max_prompt_length": 512}
    assert generate_answers(model, tok, rows, **kw) == generate_answers(model, tok, rows, share_prefix=False, **kw)
