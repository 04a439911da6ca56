"""Device marks in one place, as Lightning's ``RunIf`` does: ``@pytest.mark.cuda`` skips without a CUDA GPU.

Mark a test (or a ``pytest.param``) with ``pytest.mark.cuda``; ``pytest -m cuda`` selects
exactly the tests that need a GPU (the GPU check script runs those).
"""

from __future__ import annotations

import pytest
import torch

CUDA_PARAM = pytest.param("cuda", marks=pytest.mark.cuda, id="cuda")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fresh_tuning():
    """Tuning on and an empty cache for the test, and the process left as it was found (for tests of ``auto``)."""
    from condconv_lightning.functional import clear_tuning_cache, is_tuning_enabled, set_tuning

    previous = is_tuning_enabled()
    clear_tuning_cache()
    set_tuning(True)
    yield
    clear_tuning_cache()
    set_tuning(previous)
