"""The prompt-once scorer (`choice_scores`, the evaluation's default) against the one-forward-per-
(row, choice) reference (`pairwise_choice_scores`), and the KV cache of batched generation."""

from __future__ import annotations

import random

import pytest

from pm_ray.data.prompts import format_prompt
from pm_ray.data.tokenize import answer_ids
from pm_ray.eval.choices import (
    choice_scores,
    count_choice_correct,
    packed_mask_supported,
    pairwise_choice_scores,
)
from pm_ray.eval.generation import generate_answers
from pm_ray.models.tiny_tokenizer import TINY_CHAT_TEMPLATE, tiny_llama_tokenizer

CHOICES = ["x", "no", "yes", "blue", "a long answer", "it is not possible to tell from the text", "", "Ünïcode ☃"]


def varied_rows(n: int, seed: int = 0) -> list[dict]:
    """Prompts from a few to ~300 tokens, 2-5 choices each of 1 to ~40 tokens (empty text included)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        choices = rng.sample(CHOICES, rng.randint(2, 5))
        rows.append(
            {
                "instruction": f"Q{i} " + "word " * rng.choice([0, 1, 5, 20, 60]),
                "input": rng.choice(["", "some context"]),
                "output": rng.choice(choices),
                "choices": choices,
            }
        )
    return rows


def assert_same_scores(got, want, rows, tol=1e-4):
    assert [len(s) for s in got] == [len(r["choices"]) for r in rows]
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=tol)
    best = [max(range(len(s)), key=lambda k: (s[k], -k)) for s in got]
    assert best == [max(range(len(s)), key=lambda k: (s[k], -k)) for s in want]
    assert count_choice_correct(got, rows) == count_choice_correct(want, rows)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_cached_scores_equal_one_forward_per_choice_with_lora(lora_model, batch_size):
    model, tok = lora_model
    rows = varied_rows(14)
    lengths = {len(tok(format_prompt(tok, r), add_special_tokens=False)["input_ids"]) for r in rows}
    choice_lengths = {len(answer_ids(tok, c)) for r in rows for c in r["choices"]}
    assert len(lengths) > 5 and min(choice_lengths) == 1 and max(choice_lengths) > 30  # really varied
    got = choice_scores(model, tok, rows, batch_size=batch_size, max_length=1024)
    want = pairwise_choice_scores(model, tok, rows, batch_size=4, max_length=1024)
    assert_same_scores(got, want, rows)


def test_cached_scores_equal_reference_with_eager_attention_and_chat_template(lora_tiny):
    model, _ = lora_tiny("eager")  # the 4D additive mask is read the same way by eager attention
    tok = tiny_llama_tokenizer(chat_template=TINY_CHAT_TEMPLATE)
    rows = varied_rows(9, seed=3)
    got = choice_scores(model, tok, rows, batch_size=4, max_length=1024)
    assert_same_scores(got, pairwise_choice_scores(model, tok, rows, batch_size=5, max_length=1024), rows)


def test_ties_go_to_the_first_choice(lora_model):
    model, tok = lora_model
    rows = [{"instruction": "same", "output": "b", "choices": ["b", "b", "c"]}]
    (scores,) = choice_scores(model, tok, rows, batch_size=2, max_length=1024)
    assert scores[0] == scores[1]
    assert count_choice_correct([scores], rows) == (scores[0] >= scores[2])


def test_packed_scoring_only_for_attention_that_reads_a_4d_mask(lora_model):
    model, _ = lora_model
    assert packed_mask_supported(model)  # sdpa, through the PEFT wrapper
    for attn, ok in [("eager", True), ("flash_attention_2", False), ("flex_attention", False)]:
        model.config._attn_implementation = attn
        try:
            assert packed_mask_supported(model) is ok
        finally:
            model.config._attn_implementation = "sdpa"


def count_forwards(model):
    calls: list[tuple[tuple[int, ...], bool]] = []

    def hook(_module, _args, kwargs):
        calls.append((tuple(kwargs["input_ids"].shape), kwargs.get("past_key_values") is not None))

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("share_prefix", [False, True])
def test_cached_scorer_runs_two_forwards_per_batch_of_rows(lora_model, share_prefix):
    """One forward of the prompts, one of all their choices packed over the prompts' cache, against
    one sequence per (row, choice) in the reference. With the shared prefix (the chat template's
    opening here) one more forward, of one sequence, comes first, and every prompt forward starts
    from its cache."""
    model, tok = lora_model
    rows = varied_rows(10, seed=5)
    calls, handle = count_forwards(model)
    try:
        choice_scores(model, tok, rows, batch_size=4, max_length=1024, share_prefix=share_prefix)
    finally:
        handle.remove()
    if share_prefix:
        assert calls[0] == ((1, calls[0][0][1]), False) and calls[0][0][1] >= 8
        calls = calls[1:]
    assert [cached for _, cached in calls] == [share_prefix, True] * 3
    assert [shape[0] for shape, _ in calls] == [4, 4, 4, 4, 2, 2]


def test_batched_generation_decodes_from_a_kv_cache(lora_tiny):
    """`generate_answers` (HF generate with use_cache=True): after the prompt, each step feeds one
    new token per row and the model gets the cache, even when the model's configs say otherwise.
    With the shared prefix, it runs once first (one sequence) and each batch's prefill feeds only
    the tokens after it, with the same answers."""
    model, tok = lora_tiny()
    model.generation_config.use_cache = model.config.use_cache = False  # as saved after training
    rows = [{"instruction": "Repeat " + "w " * i, "output": "x"} for i in range(5)]
    runs = {}
    for share_prefix in (False, True):
        calls, handle = count_forwards(model.get_base_model())
        try:
            answers = generate_answers(
                model, tok, rows, batch_size=3, max_new_tokens=6, max_prompt_length=512, share_prefix=share_prefix
            )
        finally:
            handle.remove()
        runs[share_prefix] = (calls, answers)
    (prefix_batch, prefix_len), prefix_cached = runs[True][0][0]
    assert prefix_batch == 1 and prefix_len >= 8 and not prefix_cached
    assert runs[True][1] == runs[False][1]
    prefills = {k: [c[0][1] for c in (calls[1:] if k else calls) if c[0][1] > 1] for k, (calls, _) in runs.items()}
    assert len(prefills[False]) == 2  # one prefill per batch of rows (3 + 2)
    assert prefills[True] == [width - prefix_len for width in prefills[False]]
    calls = runs[False][0]
    steps = [c for c in calls if c[0][1] == 1]
    assert steps and all(cached for _, cached in steps)
    assert len(calls) > 2
