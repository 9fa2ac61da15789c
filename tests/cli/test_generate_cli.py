"""`mixcon generate`: bad sampling options are usage errors naming the flag, before any model is loaded; the
streamer that prints the text."""

from __future__ import annotations

import io

import pytest
import torch

from mixcon.cli import main
from mixcon.cli.generate import TextStreamer
from mixcon.data import ByteTokenizer


@pytest.mark.parametrize(("extra", "message"), [
    (["--temperature", "nan"], "argument --temperature: expected a finite number > 0, got 'nan'; --greedy for argmax"),
    (["--temperature", "0"], "argument --temperature: expected a finite number > 0, got '0'"),
    (["--top-p", "1.5"], "argument --top-p: expected a finite number in (0, 1], got '1.5'"),
    (["--top-p", "nan"], "argument --top-p: expected a finite number in (0, 1], got 'nan'"),
    (["--top-k", "-1"], "argument --top-k: expected an integer >= 0, got '-1'"),
    (["--max-new-tokens", "-1"], "argument --max-new-tokens: expected an integer >= 0, got '-1'"),
])
def test_bad_sampling_options_are_refused_before_loading(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:  # the checkpoint is not even looked for
        main(["generate", "--checkpoint", str(tmp_path / "nothing"), "--prompt", "hi", *extra])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and message in err


def test_the_streamer_prints_whole_characters_at_a_constant_cost_per_token():
    """Bytes of one character print together once complete, invalid bytes as the full decode shows them; each
    token decodes only the tokens since the last whole character, however long the text already is."""
    tok = ByteTokenizer()
    decoded: list[int] = []

    class Recording(ByteTokenizer):
        def decode(self, ids: list[int]) -> str:
            decoded.append(len(ids))
            return super().decode(ids)

    text = "héllo 😀 wörld\n" * 200
    ids = [*tok.encode(text), 0xFF, 0x61]  # an invalid byte, then "a"
    out = io.StringIO()
    writes: list[str] = []
    out.write = lambda s: writes.append(s) or len(s)  # type: ignore[method-assign]
    streamer = TextStreamer(Recording(), out)
    for i in ids:
        streamer(torch.tensor([i]))
    assert streamer.end() == tok.decode(ids) == "".join(writes)[:-1]
    assert all("\ufffd" not in w for w in writes[:-3])  # whole characters only, until the invalid byte
    assert max(decoded[:-1]) <= 4  # a character's bytes at most (the last decode is the whole text)
