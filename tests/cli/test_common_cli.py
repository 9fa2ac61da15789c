"""Arguments shared by the commands: --device is checked against the machine before anything runs."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

from mixcon.benchmarks.common import plot_file
from mixcon.cli import build_parser, main
from mixcon.cli.common import (
    check_cuda_graphs,
    config_from_args,
    device_type,
    existing_folder,
    output_file,
    output_folder,
)
from mixcon.config import MixConConfig


def test_device_type_takes_the_devices_this_machine_has(monkeypatch):
    assert device_type("cpu") == "cpu"
    with pytest.raises(argparse.ArgumentTypeError, match=r"'meta' holds no data; use cpu"):  # (was taken, then
        device_type("meta")  # reported as an unreadable weights file)
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


def test_device_type_counts_mps_and_passes_a_backend_it_cannot_count(monkeypatch):
    """mps: there or not (one device at most); a device torch parses but has no counting module for (xla, hpu:
    plugins): left to torch."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(argparse.ArgumentTypeError, match=r"'mps': this machine has no mps device .*; use cpu"):
        device_type("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert device_type("mps") == "mps" and device_type("mps:0") == "mps:0"
    with pytest.raises(argparse.ArgumentTypeError, match=r"'mps:1': this machine has 1 mps device\(s\), mps:0 to "
                                                         "mps:0"):
        device_type("mps:1")
    assert getattr(torch, "xla", None) is None and device_type("xla") == "xla"


def test_an_output_file_in_a_folder_that_cannot_be_written_is_refused_first(tmp_path, monkeypatch):
    from mixcon.cli import common

    assert output_file(str(tmp_path / "new" / "r.json")) == tmp_path / "new" / "r.json"
    monkeypatch.setattr(common.os, "access", lambda path, mode: path != tmp_path)  # as a read-only folder
    target = tmp_path / "new" / "r.json"
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(f"'{target}': cannot write in {tmp_path}") + "$"):
        output_file(str(target))


def test_a_yaml_config_without_pyyaml_says_what_to_install(tmp_path, monkeypatch):
    import sys

    path = tmp_path / "c.yaml"
    path.write_text("preset: tiny\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` raises ImportError
    with pytest.raises(SystemExit, match=rf"--config '{path}': reading YAML needs PyYAML \(pip install pyyaml\)"):
        config_from_args(argparse.Namespace(config=str(path), overrides=[]))


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


@pytest.mark.parametrize("argv", [
    ["generate", "--checkpoint", "x"],
    ["eval", "perplexity", "--checkpoint", "x"],
    ["eval", "tasks", "--checkpoint", "x", "--tasks", "t"],
    ["bench", "decode"],
    ["bench", "recall"],
])
def test_commands_that_run_a_model_default_to_cuda_where_the_machine_has_it(argv, monkeypatch, capsys):
    """As `mixcon train` and the benchmarks: a GPU machine's `generate` or `eval` does not run on its CPU."""
    for available, device in ((True, "cuda"), (False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda available=available: available)
        monkeypatch.setattr(torch.cuda, "device_count", lambda available=available: int(available))
        assert build_parser().parse_args(argv).device == device
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    assert "(default: cuda when available, else cpu)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(("name", "text", "problem"), [
    ("c.json", "[1, 2]", r"holds \[1, 2\]"),
    ("c.json", "5", "holds 5"),
    ("c.json", "", "holds nothing"),
    ("c.json", "{bad", r"not valid JSON \(Expecting property name enclosed in double quotes: line 1 column 2 "
                       r"\(char 1\)\)"),
    ("c.yaml", "", "holds nothing"),
    ("c.yaml", "# only a comment\n", "holds nothing"),
    ("c.yml", "- 1\n- 2\n", r"holds \[1, 2\]"),
    ("c.yaml", "a: [1\nb: 2\n", r"not valid YAML \(expected ',' or '\]', but got ':', line 2 column 2\)"),
])
def test_a_config_file_must_hold_a_mapping(tmp_path, name, text, problem):
    pytest.importorskip("yaml")
    path = tmp_path / name
    path.write_text(text)
    expected = rf"^mixcon: --config '{path}': {problem}; it must hold a mapping of config fields, "
    with pytest.raises(SystemExit, match=expected):
        config_from_args(argparse.Namespace(config=str(path), overrides=[]))


def test_a_config_file_gives_the_fields_and_set_overrides_them(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"preset": "tiny", "d_model": 64, "extra": {"note": "x"}}')
    config = config_from_args(argparse.Namespace(config=str(path), overrides=["n_heads=8", "d_model=96"]))
    assert (config.d_model, config.n_heads, config.extra) == (96, 8, {"note": "x"})  # --set over the file
    plain = tmp_path / "plain.json"  # a whole config, no preset
    plain.write_text(MixConConfig.preset("tiny", d_model=64).to_json())
    assert config_from_args(argparse.Namespace(config=str(plain), overrides=["d_model=96"])).d_model == 96
    with pytest.raises(SystemExit, match=r"--set 'extra=5': extra must be a mapping"):
        config_from_args(argparse.Namespace(config="tiny", overrides=["extra=5"]))


def test_ctrl_c_ends_a_command_quietly_with_the_shells_code(monkeypatch, capsys):
    """No traceback: a line saying so, and 130 (128 + SIGINT), as shells report an interrupted program."""
    from mixcon.cli import info

    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(info, "run", interrupted)
    assert main(["info", "--config", "tiny"]) == 130
    assert capsys.readouterr().err == "mixcon info: interrupted\n"


def test_config_errors_name_the_command_and_the_flags(tmp_path):
    """A bad --config (unknown preset, file with an unknown field) or --set value: the command, then the flags
    that gave it (the message was the bare MixConConfig error, without the file or the command)."""
    (tmp_path / "bad.json").write_text('{"d_modle": 64}')
    cases = [(["info", "--config", "tinyy"], r"^mixcon info: --config 'tinyy': not a preset \(mixcon-paper, small, "
                                             r"tiny\) nor a file$"),
             (["info", "--config", str(tmp_path / "bad.json")],
              r"^mixcon info: --config '.*bad.json': MixConConfig: unknown fields \['d_modle'\]"),
             (["info", "--config", "tiny", "--set", "d_model=7"],
              r"^mixcon info: --config 'tiny' with --set d_model=7: MixConConfig.n_heads=4 is invalid")]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            main(argv)


def test_version_names_mixcon_and_torch(capsys):
    import mixcon

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"mixcon {mixcon.__version__} (torch {torch.__version__})\n"


def test_folder_arguments_are_checked_before_any_work(tmp_path, capsys):
    """A benchmark's --out that is a file failed after the whole run; eval's --include-path went on to the Hub."""
    (tmp_path / "afile").write_text("x")
    for argv in (["bench", "decode", "--config", "tiny", "--out", str(tmp_path / "afile")],
                 ["bench", "speed", "--out", str(tmp_path / "afile" / "below")],
                 ["bench", "scan", "--out", ""],
                 ["eval", "tasks", "--checkpoint", str(tmp_path), "--tasks", "x", "--include-path",
                  str(tmp_path / "nowhere")]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "is not a folder" in err or "a file lies on its path" in err or "no such folder" in err, err


@pytest.mark.parametrize("argv, command, unknown", [
    (["data", "prepare", "d1", "--out", "x"], "mixcon data prepare", "d1"),
    (["bench", "speed", "--bogus"], "mixcon bench speed", "--bogus"),
    (["info", "extra"], "mixcon info", "extra"),
    (["--bogus"], "mixcon", "--bogus"),
])
def test_unknown_arguments_are_named_by_the_command_that_got_them(argv, command, unknown, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: {command} ")
    assert err.endswith(f"{command}: error: unrecognized arguments: {unknown}\n")


def test_a_path_option_starting_with_a_tilde_is_in_the_home_folder(tmp_path, monkeypatch):
    """--out=~/x or a quoted '~/x' reaches the program unexpanded (the shell expands neither): it made a folder
    named '~' in the working directory."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "c.txt").write_text("some text for the shards " * 40)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert main(["data", "prepare", "--corpus=~/c.txt", "--tokenizer", "bytes", "--out=~/shards"]) == 0
    assert (home / "shards" / "index.json").is_file() and list(work.iterdir()) == []
    # the options argparse checks as it parses them (--json, bench --out and --plot, lm-eval's --include-path)
    assert output_file("~/r.json") == home / "r.json" and output_folder("~/bench") == home / "bench"
    assert existing_folder("~/shards") == home / "shards" and plot_file("~/p.png") == home / "p.png"


def test_numbers_lists_and_seeds_are_checked_element_by_element_and_to_their_ends():
    from mixcon.cli.common import SEED, number_type

    assert number_type(int, 1, many=True)("1,2") == [1, 2]
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected comma-separated integers >= 1, got '1,0'"):
        number_type(int, 1, many=True)("1,0")
    assert SEED(str(2**64 - 1)) == 2**64 - 1  # what torch.Generator.manual_seed takes
    for text in (str(2**64), "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            SEED(text)


def test_a_fraction_is_in_zero_to_one_without_one():
    from mixcon.cli.common import FRACTION

    assert (FRACTION("0"), FRACTION("0.999")) == (0.0, 0.999)
    for text in ("1", "-0.1", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match=rf"expected a finite number in \[0, 1\), got '{text}'"):
            FRACTION(text)


@pytest.mark.parametrize("argv", [
    ["train", "--init-from=~/missing", "--out", "run"], ["train", "--resume=~/missing"],
    ["generate", "--checkpoint=~/missing"], ["train", "--config=~/missing", "--out", "run"],
    ["data", "prepare", "--corpus=~/missing", "--out", "shards"], ["eval", "perplexity", "--checkpoint=~/missing"],
])
def test_every_path_option_expands_a_tilde(tmp_path, monkeypatch, argv):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=f"{tmp_path / 'home' / 'missing'}"):
        main(argv)


def test_parse_overrides_raises_value_error_that_commands_name_themselves_in():
    """parse_overrides refuses bad items with a ValueError (ablate and --set callers add their own prefix); a
    command's --set extra=5 exits naming the command, as the other bad items do."""
    from mixcon.cli.common import parse_overrides

    for item, problem in (("d_model", "expected KEY=VALUE"), ("nope=1", "unknown config field 'nope'"),
                          ("extra=5", "extra must be a mapping")):
        with pytest.raises(ValueError, match=rf"^--set '{item}': {problem}"):
            parse_overrides([item])
    with pytest.raises(SystemExit, match=r"^mixcon info: --set 'extra=5': extra must be a mapping"):
        main(["info", "--set", "extra=5"])


def test_numbers_refuse_infinities_and_text_and_set_values_are_parsed():
    """A finite float is finite (inf is refused, not taken as no limit); text that is no number is refused, not
    read as 0; --set values 'true'/'false' are the booleans they say; no --config is the default preset."""
    from mixcon.cli.common import DEFAULT_CONFIG, number_type, parse_value

    for text in ("inf", "-inf"):
        with pytest.raises(argparse.ArgumentTypeError, match=rf"expected a finite number >= 0, got '{text}'"):
            number_type(float, 0)(text)
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected an integer >= 0, got 'two'"):
        number_type(int, 0)("two")
    assert (parse_value("True"), parse_value("false"), parse_value("none")) == (True, False, None)
    config = config_from_args(argparse.Namespace(config=None, overrides=[]))
    assert config == MixConConfig.preset(DEFAULT_CONFIG)


@pytest.mark.parametrize("device", ["cpu", "cpu:0"])
def test_cuda_graphs_are_refused_on_a_device_of_any_other_type_than_cuda(device: str) -> None:
    with pytest.raises(SystemExit, match=rf"^mixcon generate: --cuda-graphs needs a CUDA --device, got {device}$"):
        check_cuda_graphs("mixcon generate", argparse.Namespace(cuda_graphs=True, device=device))
    check_cuda_graphs("mixcon generate", argparse.Namespace(cuda_graphs=False, device=device))  # without: fine
