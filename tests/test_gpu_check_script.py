"""scripts/gpu_check.sh stays runnable: a GPU is lent rarely and briefly, so the commands it runs are
checked here, where there is none — the mixcon ones parse and the pytest selection finds tests."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixcon.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def steps() -> list[list[str]]:
    """The argv of every `step SECONDS COMMAND...` line of the script (continuation lines joined)."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    return [shlex.split(line)[2:] for line in text.splitlines() if re.match(r"step \d+ ", line)]


def test_script_is_valid_bash():
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_its_mixcon_commands_parse(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # --device cuda is checked: as on the GPU machine
    commands = [argv[3:] for argv in steps() if argv[:3] == ["python3", "-m", "mixcon"]]
    names = ("scan", "speed", "speed", "speed", "decode", "decode")
    assert [c[:2] for c in commands] == [["bench", name] for name in names]
    parser = build_parser()
    for argv in commands:
        argv = [a.replace("$out", str(tmp_path)) for a in argv]
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # argparse has printed which flag or value it rejects
            pytest.fail(f"scripts/gpu_check.sh: `mixcon {' '.join(argv)}` does not parse (exit {e.code})")
        assert args.device == "cuda" and args.dtype == "bf16" and callable(args.func)


def test_its_pytest_selection_collects_cuda_and_triton_tests():
    (argv,) = [argv for argv in steps() if argv[:3] == ["python3", "-m", "pytest"]]
    files = [a for a in argv if a.startswith("tests/")]
    assert files and all((ROOT / f).is_file() for f in files), files
    selection = argv[argv.index("-k") + 1]
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                *files, "-k", selection], cwd=ROOT, capture_output=True, text=True)
    assert collected.returncode == 0, collected.stdout + collected.stderr
    ids = [line for line in collected.stdout.splitlines() if "::" in line]
    assert any("cuda" in i for i in ids) and any("triton" in i for i in ids), ids
    assert {i.split("::")[0] for i in ids} == set(files)
