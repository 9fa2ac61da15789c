"""`mixcon info` and the shared config arguments."""

from __future__ import annotations

import json

import pytest

from mixcon.cli import main
from mixcon.cli.common import parse_value


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
    (["info", "--set", "nope=1"], "unknown config field 'nope'"),
    (["info", "--set", "top_k=99"], "MixConConfig.top_k=99"),
    (["info", "--config", "no-such-preset"], "not a preset"),
])
def test_bad_arguments_exit_with_a_clear_message(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(argv)


def test_parse_value():
    assert [parse_value(v) for v in ("3", "0.5", "true", "None", "swiglu")] == [3, 0.5, True, None, "swiglu"]


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
