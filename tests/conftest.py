"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def have_c_compiler() -> bool:
    """Whether torch.compile's CPU backend (inductor's C++ kernels) can build here."""
    return shutil.which("cc") is not None or shutil.which("gcc") is not None
