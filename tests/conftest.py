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
