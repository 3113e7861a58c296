"""Tiny seeded random models with LoRA, built from configs (no model hub), for the core tests.

Every fixture is function scoped: tests fold into and perturb the weights, so each gets a fresh
model. A fixture costs a few milliseconds. LoRA B is random (``init_lora_weights=False``) so the
task vectors are non-zero, and dropout is 0 so a LoRA layer is a deterministic function.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 128


def make_llama_lora(seed: int = 0, targets: tuple[str, ...] = ("k_proj", "v_proj")) -> PeftModel:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(LlamaForCausalLM(config), lora)


def make_bert_lora(seed: int = 0, num_labels: int = 3) -> PeftModel:
    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        num_labels=num_labels,
        attn_implementation="eager",
    )
    lora = LoraConfig(
        task_type="SEQ_CLS",
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        lora_dropout=0.0,
        init_lora_weights=False,
    )
    return get_peft_model(BertForSequenceClassification(config), lora)


def make_gpt2_lora(seed: int = 0) -> PeftModel:
    """GPT-2 stores c_attn as a Conv1D with weight (d_in x d_out): the fan_in_fan_out case."""
    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0, init_lora_weights=False
    )
    return get_peft_model(GPT2LMHeadModel(config), lora)


@pytest.fixture
def tiny_llama_lora() -> PeftModel:
    return make_llama_lora()


@pytest.fixture
def tiny_bert_lora() -> PeftModel:
    return make_bert_lora()


@pytest.fixture
def tiny_gpt2_lora() -> PeftModel:
    return make_gpt2_lora()


def causal_lm_batch(seed: int = 0, n: int = 4, length: int = 10) -> dict[str, torch.Tensor]:
    """Right-padded rows of different lengths; the first tokens of every row are a prompt with
    label -100, padding has label -100 and attention 0 (as a chat-template collator makes them)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (n, length), generator=generator)
    attention_mask = torch.ones(n, length, dtype=torch.long)
    labels = input_ids.clone()
    for row in range(n):
        valid = length - (row % 3) * 2  # rows have 0, 2 or 4 padding tokens
        prompt = 2 + row % 2
        attention_mask[row, valid:] = 0
        input_ids[row, valid:] = 0
        labels[row, valid:] = -100
        labels[row, :prompt] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def classification_batch(seed: int = 0, n: int = 4, length: int = 8, num_labels: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (n, length), generator=generator)
    attention_mask = torch.ones(n, length, dtype=torch.long)
    for row in range(n):
        attention_mask[row, length - row % 3 :] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = torch.randint(0, num_labels, (n,), generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.fixture
def make_llama():
    """The factory, for tests that need several models (e.g. different seeds) in one test."""
    return make_llama_lora


@pytest.fixture
def make_gpt2():
    return make_gpt2_lora


@pytest.fixture
def make_causal_lm_batch():
    return causal_lm_batch


@pytest.fixture
def make_classification_batch():
    return classification_batch
