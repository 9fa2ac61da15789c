"""Arguments shared by the commands: --device is checked against the machine before anything runs."""

from __future__ import annotations

import argparse

import pytest
import torch

from mixcon.cli import main
from mixcon.cli.common import device_type


def test_device_type_takes_the_devices_this_machine_has(monkeypatch):
    assert device_type("cpu") == "cpu" and device_type("meta") == "meta"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_type("cuda") == "cuda" and device_type("cuda:1") == "cuda:1"
    with pytest.raises(argparse.ArgumentTypeError, match=r"'cuda:2': this machine has 2 cuda device\(s\), cuda:0 to "
                                                         "cuda:1"):
        device_type("cuda:2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(argparse.ArgumentTypeError, match=r"'cuda': this machine has no cuda device .*; use cpu"):
        device_type("cuda")
    with pytest.raises(argparse.ArgumentTypeError, match="'gpu' is not a torch device"):
        device_type("gpu")


@pytest.mark.parametrize("argv", [
    ["train", "--steps", "1"],
    ["generate", "--checkpoint", "runs/none"],
    ["eval", "perplexity", "--checkpoint", "runs/none"],
    ["bench", "ablate"],
    ["bench", "speed"],
])
def test_every_device_flag_rejects_a_device_the_machine_lacks(argv, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--device", "cuda"])
    assert exit_info.value.code == 2  # a usage error, before any work
    assert "argument --device: 'cuda': this machine has no cuda device" in capsys.readouterr().err
