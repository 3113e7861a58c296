"""Generation tasks: batched greedy decoding (left padding), normalised exact match (against any reference)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pm_ray.data.tokenize import pad_token_id, prompt_ids
from pm_ray.eval.normalize import exact_match
from pm_ray.eval.prefix import PromptPrefix
from pm_ray.eval.rows import chunks, model_device


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    *,
    batch_size: int,
    max_new_tokens: int,
    max_prompt_length: int,
    share_prefix: bool = True,
) -> list[str]:
    """Greedy answers (special tokens dropped), at most `max_new_tokens` tokens each. With
    ``share_prefix`` the prefix all prompts share runs once and each batch starts from its cache
    (eval/prefix.py)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = model_device(model)
    pad_id = pad_token_id(tokenizer)
    prompts = prompt_ids(tokenizer, rows, max_length=max_prompt_length)
    prefix = PromptPrefix.build(model, prompts, device) if share_prefix and prompts else PromptPrefix([])
    answers: list[str] = []
    for batch in chunks(prompts, batch_size):
        own_ids, mask, _ = prefix.pack(batch, pad_id)  # generate derives positions from the mask
        shared = torch.tensor(prefix.ids, dtype=torch.long).expand(len(batch), -1)
        input_ids = torch.cat([shared, own_ids], dim=1)
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            past_key_values=prefix.cache_for(len(batch)),  # generate runs only the tokens after it
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            # Decode from the KV cache: each step feeds one token per row. HF's default already, but
            # a model or config saved with use_cache=False (as training scripts often set) would
            # otherwise rerun the whole prefix at every step (tests/eval/test_choice_scoring.py).
            use_cache=True,
            # transformers turns this on under ZeRO-3 with its own per-step all-reduce; the worker
            # loop keeps ranks in step itself, for every forward (pm_ray/train/zero3.py Lockstep)
            synced_gpus=False,
        )
        new_tokens = out[:, input_ids.shape[1] :]
        answers.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return answers


def accepted_answers(row: dict[str, Any]) -> list[str]:
    """The answers that count as correct: every reference when the task lists them, else the output."""
    return [str(ref) for ref in row.get("references") or [row["output"]]]


def count_exact_matches(answers: list[str], rows: list[dict[str, Any]]) -> int:
    return sum(any(exact_match(a, ref) for ref in accepted_answers(r)) for a, r in zip(answers, rows, strict=True))
