"""A deterministic, offline byte-level tokenizer for the tiny random test models.

Every UTF-8 byte is one token (GPT-2 byte-to-unicode alphabet, no merges), plus special tokens, so
any text round-trips and nothing has to be downloaded or trained.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

LLAMA_SPECIALS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>")
BERT_SPECIALS: tuple[str, ...] = ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]")

# A minimal chat template (used by tests of the chat path; tiny:llama ships without one so the
# plain prompt template is its default).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '</s>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _byte_level_tokenizer(specials: tuple[str, ...], unk: str) -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    return tok


def tiny_llama_tokenizer(*, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    tok = _byte_level_tokenizer(LLAMA_SPECIALS, "<unk>")
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    out.padding_side = "right"
    if chat_template:
        out.chat_template = chat_template
    return out


def tiny_bert_tokenizer() -> PreTrainedTokenizerFast:
    tok = _byte_level_tokenizer(BERT_SPECIALS, "[UNK]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", BERT_SPECIALS.index("[CLS]")), ("[SEP]", BERT_SPECIALS.index("[SEP]"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        mask_token="[MASK]",
    )
