from __future__ import annotations

import pytest

from pm_ray.models.backbone import load_backbone


@pytest.fixture(scope="module")
def tiny_llama():
    return load_backbone("tiny:llama")
