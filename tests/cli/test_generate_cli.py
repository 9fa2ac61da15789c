"""`mixcon generate`: bad sampling options are usage errors naming the flag, before any model is loaded."""

from __future__ import annotations

import pytest

from mixcon.cli import main


@pytest.mark.parametrize(("extra", "message"), [
    (["--temperature", "nan"], "argument --temperature: expected a finite number > 0, got 'nan'; --greedy for argmax"),
    (["--temperature", "0"], "argument --temperature: expected a finite number > 0, got '0'"),
    (["--top-p", "1.5"], "argument --top-p: expected a finite number in (0, 1], got '1.5'"),
    (["--top-p", "nan"], "argument --top-p: expected a finite number in (0, 1], got 'nan'"),
    (["--top-k", "0"], "argument --top-k: expected an integer >= 1, got '0'"),
    (["--max-new-tokens", "-1"], "argument --max-new-tokens: expected an integer >= 0, got '-1'"),
])
def test_bad_sampling_options_are_refused_before_loading(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:  # the checkpoint is not even looked for
        main(["generate", "--checkpoint", str(tmp_path / "nothing"), "--prompt", "hi", *extra])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and message in err
