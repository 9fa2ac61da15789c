"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

# Without a GPU, Triton kernels can only run in Triton's interpreter; it is chosen when triton is
# imported, so the switch is set here, before any test imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def have_c_compiler() -> bool:
    """Whether torch.compile's CPU backend (inductor's C++ kernels) can build here."""
    return shutil.which("cc") is not None or shutil.which("gcc") is not None
