"""Fixtures. The helpers they use, and that test modules import, live in ``tests/helpers.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

# before the import, so that the helpers' assertions report like a test's own
pytest.register_assert_rewrite("tests.helpers")

from tests.helpers import write_ranks_file  # noqa: E402


@pytest.fixture
def ranks_file(tmp_path: Path):
    return lambda n: write_ranks_file(tmp_path / f"ranks_{n}.model", n)


def pytest_collection_modifyitems(config, items) -> None:
    """``network`` tests (they download from the package registry, which not every machine
    reaches) run only when asked for: ``-m network``, or any ``-m`` that names them."""
    if "network" in (config.getoption("markexpr") or ""):
        return
    kept = [item for item in items if item.get_closest_marker("network") is None]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept
