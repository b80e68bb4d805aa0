"""Fixtures for tests/chart (helpers live in chartlib.py)."""

from __future__ import annotations

import pytest

from chartlib import render


@pytest.fixture(scope="session")
def default_objs() -> list[dict]:
    return render()
