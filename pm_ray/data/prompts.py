"""Turn an instruction row into the prompt text a causal LM sees (chat template or plain template)."""

from __future__ import annotations

from typing import Any, Mapping

PLAIN_TEMPLATE_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PLAIN_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"


def user_message(row: Mapping[str, Any]) -> str:
    """Instruction and (optional) input as one user turn."""
    instruction = str(row["instruction"]).strip()
    extra = (row.get("input") or "").strip()
    return f"{instruction}\n\n{extra}" if extra else instruction


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer: Any, row: Mapping[str, Any]) -> str:
    """The prompt text, ending where the answer starts.

    With a chat template: one user turn + the generation prompt. Otherwise the Alpaca-style plain
    template, preceded by the BOS token text when the tokenizer has one (encoding then uses
    add_special_tokens=False in both paths, so train and eval see identical prompt ids).
    """
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message(row)}], add_generation_prompt=True, tokenize=False
        )
    extra = (row.get("input") or "").strip()
    text = (
        PLAIN_TEMPLATE_WITH_INPUT.format(instruction=str(row["instruction"]).strip(), input=extra)
        if extra
        else PLAIN_TEMPLATE.format(instruction=str(row["instruction"]).strip())
    )
    bos = getattr(tokenizer, "bos_token", None)
    return f"{bos}{text}" if bos else text
