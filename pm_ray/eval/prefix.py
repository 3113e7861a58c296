"""The prompt prefix that every row of a task shares, run once: its keys/values start each batch.

A task's prompts share the chat template's system turn and the task's instruction: 45-85% of the
prompt tokens on the bbni stream with SmolLM2's template. The evaluation runs that prefix once
(per task and rank) and every batch continues from a copy of its cache, each row's own tokens
left-padded after it:

    [shared prefix: L tokens] [pad ... pad] [the row's own tokens]

Positions count real tokens only (0..L-1 for the prefix, then L, L+1, ... after the padding) and
the attention mask hides the padding, so each row's logits are those of its whole prompt run
alone, as with plain left padding (tests/eval/test_prefix.py checks scores and answers against
the unshared path). The prefix is cut one token short of the shortest prompt, so that every row
has a token of its own whose logits predict the answer's first token.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pm_ray.data.tokenize import left_pad

MIN_SHARED_TOKENS = 8  # below this, one more forward per task costs more than it saves


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens at the start of every prompt, at most min(len) - 1."""
    if not prompts:
        return 0
    first = prompts[0]
    limit = min(len(p) for p in prompts) - 1
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


@dataclass
class PromptPrefix:
    """The shared prefix's ids and, when it is used, its cache (batch of one)."""

    ids: list[int]
    cache: Any = None

    @classmethod
    @torch.no_grad()
    def build(cls, model: nn.Module, prompts: Sequence[Sequence[int]], device: torch.device) -> PromptPrefix:
        n = shared_prefix_length(prompts)
        if n < MIN_SHARED_TOKENS:
            return cls([])
        ids = list(prompts[0][:n])
        out = model(
            input_ids=torch.tensor([ids], dtype=torch.long, device=device),
            attention_mask=torch.ones((1, n), dtype=torch.long, device=device),
            use_cache=True,
            logits_to_keep=1,
        )
        return cls(ids, out.past_key_values)

    def __len__(self) -> int:
        return len(self.ids)

    def cache_for(self, batch: int) -> Any:
        """A fresh cache for a batch of rows (forwards append to a cache in place)."""
        if self.cache is None:
            return None
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(batch)
        return cache

    def pack(self, prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
        """(input_ids [B, W] of the rows' own tokens, left-padded; attention_mask [B, L + W] over
        the prefix and them; position_ids [B, W])."""
        n = len(self.ids)
        input_ids, mask = left_pad([p[n:] for p in prompts], pad_id)
        positions = n + (mask.cumsum(-1) - 1).clamp(min=0)
        full_mask = torch.cat([torch.ones((len(prompts), n), dtype=torch.long), mask], dim=1)
        return input_ids, full_mask, positions
