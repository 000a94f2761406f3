"""The docstring examples of modules whose examples no other test runs."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "controller.wire",
    "controller.api.storage_servicer",
    "controller.agent.chunks",
    "controller.federation.storage.crypto",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0
