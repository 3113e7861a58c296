"""Answer normalisation for exact match."""

from __future__ import annotations

import re
import unicodedata

_EDGE_PUNCT = " \t\n\r.,;:!?\"'`"
_SPACES = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """NFKC, lower case, whitespace runs -> one space, surrounding spaces/quotes/.,;:!? removed.

    Inner punctuation is kept: "[1, 2]" and "1 2" stay different answers.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    return _SPACES.sub(" ", text).strip(_EDGE_PUNCT)


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)
