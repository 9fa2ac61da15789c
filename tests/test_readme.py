"""The README's Python examples run as written."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
from packaging.version import Version

README = Path(__file__).resolve().parents[1] / "README.md"
# Optional packages the examples import (extras of pyproject.toml), with the least version they need.
OPTIONAL = {"lm_eval": ("lm-eval", "0.4.4"), "transformers": ("transformers", "5"), "peft": ("peft", "0.17")}


def missing(block: str) -> list[str]:
    """The optional packages (with their versions) that `block` imports and this environment lacks."""
    imported = set(re.findall(r"^\s*(?:from|import) (\w+)", block, re.M))
    lacking = []
    for module in sorted(imported & set(OPTIONAL)):
        dist, least = OPTIONAL[module]
        try:
            ok = Version(importlib.metadata.version(dist)) >= Version(least)
        except importlib.metadata.PackageNotFoundError:
            ok = False
        if not ok:
            lacking.append(f"{dist}>={least}")
    return lacking


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 7
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    skipped = []
    for i, block in enumerate(blocks, 1):
        if lacking := missing(block):  # an integration's example: the others do not depend on it
            skipped.append(f"example {i} needs {', '.join(lacking)}")
            continue
        exec(compile(block.replace("/tmp/", f"{tmp_path}/"), str(README), "exec"), namespace)
    assert namespace["tokens"].shape[0] == 2
    if skipped:
        pytest.skip("ran the other examples; " + "; ".join(skipped))


def test_examples_needing_an_optional_package_are_found(monkeypatch):
    installed = {"transformers": "4.44.0", "peft": "0.17.1"}

    def version(dist: str) -> str:
        if dist not in installed:
            raise importlib.metadata.PackageNotFoundError(dist)
        return installed[dist]

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert missing("import torch\nfrom mixcon import MixConConfig\nfrom no_such_module import x") == []
    block = "from transformers import pipeline\nfrom peft import LoraConfig\n    import lm_eval\n"
    assert missing(block) == ["lm-eval>=0.4.4", "transformers>=5"]  # peft 0.17.1 is recent enough


def test_the_readmes_links_lead_to_files_of_the_checkout():
    """Relative links of README.md and docs/*.md name files inside the repository (a clone has nothing beside it)."""
    root, checked = README.parent, 0
    for page in [README, *sorted((root / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = (page.parent / target).resolve()
            assert path.is_relative_to(root) and path.exists(), f"{page.name}: link to {target}"
            checked += 1
    assert checked > 100  # the pattern finds the links (README and docs/ hold over 200)


def test_the_design_document_is_the_shared_one():
    """docs/DESIGN.md is the project's fixed design, ../shared/DESIGN.md (where that lies beside the checkout)."""
    shared = README.parents[1] / "shared" / "DESIGN.md"
    if not shared.is_file():
        pytest.skip(f"no {shared} beside the checkout to compare with")
    assert (README.parent / "docs" / "DESIGN.md").read_text() == shared.read_text()
