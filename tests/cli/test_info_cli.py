"""`mixcon info` (of a config or a checkpoint), the shared config arguments, and the command line's exits."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch

from mixcon import MixConConfig, cache_nbytes
from mixcon.cli import main
from mixcon.cli.common import parse_value
from mixcon.data import ByteTokenizer
from mixcon.ops.dtypes import DTYPES
from mixcon.training.checkpoint import STATE_FILE, save_checkpoint


def test_info_prints_layout_params_and_cache(capsys):
    assert main(["info", "--config", "small", "--set", "attn_per_block=1", "--context", "1024"]) == 0
    out = capsys.readouterr().out
    assert "CCCCACCC/DMDMDMDM" in out and "active per token" in out and "1024 tokens" in out


def test_info_reads_a_json_config_with_a_preset(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"preset": "tiny", "attn_per_block": 0}))
    assert main(["info", "--config", str(path), "--context", "8"]) == 0
    assert "CCCC/DMDM" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["info", "--set", "nope=1"], r"^mixcon info: --set 'nope=1': unknown config field 'nope'"),
    (["info", "--set", "top_k=99"], "MixConConfig.top_k=99"),
    (["info", "--config", "no-such-preset"], r"^mixcon info: --config 'no-such-preset': not a preset"),
    (["info", "--config", ""], r"--config '': not a preset"),  # (it was the default preset)
    (["info", "--memory-gib", "1"], r"--memory-gib: only for the --compare table; add --compare"),
    (["info", "--weight-bits", "8", "--memory-gib", "1"], r"--weight-bits, --memory-gib: only for the --compare table"),
])
def test_bad_arguments_exit_with_a_clear_message(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(argv)


def test_parse_value():
    assert [parse_value(v) for v in ("3", "0.5", "true", "None", "null", "FALSE", "1e-3", "swiglu")] == [
        3, 0.5, True, None, None, False, 1e-3, "swiglu"]


@pytest.mark.parametrize("data", [{"preset": "tiny", "d_model": 48}, {**MixConConfig.preset("tiny").to_dict(),
                                                                      "d_model": 48}])
def test_set_overrides_the_fields_of_a_config_file(tmp_path, data):
    from mixcon.cli.common import config_from_args

    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    args = argparse.Namespace(command="info", config=str(path), overrides=["d_model=64"])
    assert config_from_args(args).d_model == 64
    assert config_from_args(argparse.Namespace(command="info", config=str(path), overrides=[])).d_model == 48


def test_every_command_has_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    commands = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("    ")]
    assert "info" in commands
    for command in commands:
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0


def test_info_of_a_checkpoint_shows_where_training_stands(tmp_path, tiny_model, capsys):
    model = tiny_model(dtype=torch.float32, attn_per_block=0, vocab_size=259)
    state = {"step": 7, "tokens": 1234, "last_val": {"step": 6, "val_loss": 1.5, "val_bpb": 2.25}}
    weights = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    save_checkpoint(tmp_path / "run", 7, config=model.config, model_state=weights, optimizer_state={},
                    trainer_state=state, tokenizer=ByteTokenizer())
    assert main(["info", "--checkpoint", str(tmp_path / "run"), "--context", "8"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint: {tmp_path / 'run' / 'checkpoints' / 'step-00000007'}" in out
    assert "trained: 7 steps, 1,234 tokens; validation at step 6: loss 1.5000, 2.2500 bits per byte" in out
    assert "CCCC/DMDM" in out and model.summary().splitlines()[-1] in out

    model.save_pretrained(tmp_path / "model")  # no training state: the model alone
    assert main(["info", "--checkpoint", str(tmp_path / "model"), "--context", "8"]) == 0
    out = capsys.readouterr().out
    assert "trained:" not in out and "CCCC/DMDM" in out
    with pytest.raises(SystemExit, match="--checkpoint names the model; drop --config / --set"):
        main(["info", "--checkpoint", str(tmp_path / "model"), "--set", "d_model=64"])
    with pytest.raises(SystemExit, match=r"mixcon info: .*nothing"):
        main(["info", "--checkpoint", str(tmp_path / "nothing")])


@pytest.mark.parametrize("last_val, line", [
    ({}, "trained: 3 steps, 10 tokens\n"),  # not validated yet (the trainer's state before its first validation)
    ({"step": 2, "val_loss": 1.5}, "trained: 3 steps, 10 tokens; validation at step 2: loss 1.5000\n"),
])
def test_info_of_a_checkpoint_shows_the_validation_it_has(tmp_path, tiny_model, capsys, last_val, line):
    """No validation yet, or one without bits per byte (validation text of unknown byte count): what there is."""
    model = tiny_model(dtype=torch.float32)
    weights = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    save_checkpoint(tmp_path / "run", 3, config=model.config, model_state=weights, optimizer_state={},
                    trainer_state={"step": 3, "tokens": 10, "last_val": last_val})
    assert main(["info", "--checkpoint", str(tmp_path / "run"), "--context", "8"]) == 0
    assert line in capsys.readouterr().out


def test_info_of_a_checkpoint_with_a_truncated_trainer_state_exits_with_a_message(tmp_path, tiny_model, capsys):
    model = tiny_model(dtype=torch.float32)
    weights = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    save_checkpoint(tmp_path / "run", 3, config=model.config, model_state=weights, optimizer_state={},
                    trainer_state={"step": 3, "tokens": 10})
    (state_file,) = (tmp_path / "run").rglob(STATE_FILE)
    state_file.write_bytes(state_file.read_bytes()[:100])
    with pytest.raises(SystemExit, match=rf"^mixcon info: .*{STATE_FILE}: corrupt \(size or sha256 differs"):
        main(["info", "--checkpoint", str(tmp_path / "run"), "--context", "8"])
    assert "trained:" not in capsys.readouterr().out


def test_info_takes_the_dtype_names_of_the_other_commands(capsys):
    assert main(["info", "--config", "tiny", "--context", "8", "--dtype", "fp32"]) == 0
    expected = cache_nbytes(MixConConfig.preset("tiny"), 1, 8, torch.float32) / 2**30
    assert f"batch 1, fp32:\n         8 tokens: {expected:10.3f} GiB" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["info", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert f"--dtype {{{','.join(sorted(DTYPES))}}}" in shown and "Conba states are fp32; default: bf16)" in shown


@pytest.mark.parametrize(("extra", "batch_size", "dtype", "weight_bytes"), [
    ([], 1, torch.bfloat16, 2.0),
    (["--batch-size", "3", "--dtype", "fp32", "--weight-bits", "4"], 3, torch.float32, 0.5),
])
def test_batch_size_dtype_and_weight_bits_reach_the_cache_and_the_comparison(capsys, monkeypatch, extra, batch_size,
                                                                             dtype, weight_bytes):
    from mixcon.generation import footprint

    calls = []

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return footprint.footprint(*args, **kwargs)

    monkeypatch.setattr("mixcon.cli.info.footprint", recording)
    assert main(["info", "--config", "small", "--context", "65536", "--compare", *extra]) == 0
    expected = cache_nbytes(MixConConfig.preset("small"), batch_size, 65536, dtype) / 2**30
    assert f"     65536 tokens: {expected:10.3f} GiB" in capsys.readouterr().out
    assert len(calls) == 5 and all((c["batch_size"], c["dtype"], c["weight_bytes"]) == (batch_size, dtype,
                                                                                          weight_bytes) for c in calls)


def test_parameter_counts_read_in_billions_from_a_tenth_of_one():
    from mixcon.cli.info import _count

    assert (_count(99_990_000), _count(100_000_000), _count(52_000_000_000)) == ("99.99M", "0.10B", "52.00B")


def test_a_closed_pipe_ends_a_command_quietly(tmp_path):
    """`mixcon info | head -1`: the reader leaves early; no traceback."""
    contexts = ",".join(map(str, range(1, 6001)))  # ~200 KB of output, more than a pipe holds
    done = subprocess.run(f"{sys.executable} -m mixcon info --context {contexts} | head -1", shell=True,
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.stdout.startswith("MixCon:") and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr
