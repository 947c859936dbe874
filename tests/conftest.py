"""Shared test settings: torch on one thread (tiny tensors run fastest there, and a loaded
2-core machine slows multithreaded torch by an order of magnitude)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from strategies import single_thread


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield
