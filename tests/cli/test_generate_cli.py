"""`mixcon generate`: bad sampling options are usage errors naming the flag, before any model is loaded; the
streamer that prints the text."""

from __future__ import annotations

import io

import pytest
import torch

from mixcon.cli import main
from mixcon.cli.generate import Utf8Printer
from mixcon.data import ByteTokenizer, train_bpe_tokenizer


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


def test_cuda_graphs_need_a_cuda_device(tmp_path):
    with pytest.raises(SystemExit, match=r"^mixcon generate: --cuda-graphs needs a CUDA --device, got cpu$"):
        main(["generate", "--checkpoint", str(tmp_path / "nothing"), "--cuda-graphs"])  # not looked for


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_decode_what_eager_steps_do(tmp_path, tiny_model, capsys):
    tiny_model(dtype=torch.float32, vocab_size=300).save_pretrained(tmp_path / "model")
    argv = ["generate", "--checkpoint", str(tmp_path / "model"), "--tokenizer", "bytes", "--prompt", "hi",
            "--greedy", "--max-new-tokens", "12", "--device", "cuda"]
    outputs = []
    for extra in ([], ["--cuda-graphs"]):
        assert main(argv + extra) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and len(outputs[0]) > len("hi\n")


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_the_streamer_prints_whole_characters_as_they_arrive(tokenizer):
    """Bytes of one character print together once complete; bytes that can form none print at once, as the
    whole text's decode shows them (a run of them held everything back until the end); each token decodes
    only its own bytes, however long the text already is."""
    text = "héllo 😀 wörld\n" * 20
    tok = ByteTokenizer() if tokenizer == "bytes" else train_bpe_tokenizer([text] * 5, vocab_size=300)
    invalid = [0xFF] * 50 if tokenizer == "bytes" else []  # byte ids that are no UTF-8
    ids = [*tok.encode(text), *invalid, *tok.encode("a")]
    before_last, whole = tok.decode(ids[:-1]), tok.decode(ids)
    decoded: list[int] = []
    original = tok.decode_bytes

    def recording(ids: list[int]) -> bytes:
        decoded.append(len(ids))
        return original(ids)

    tok.decode_bytes = recording  # type: ignore[method-assign]
    out = io.StringIO()
    writes: list[str] = []
    out.write = lambda s: writes.append(s) or len(s)  # type: ignore[method-assign]
    streamer = Utf8Printer(tok, out)
    for step, i in enumerate(ids):
        streamer(torch.tensor([i]))
        if step == len(ids) - 2:
            assert "".join(writes) == before_last  # nothing held back but an unfinished character
    assert max(decoded) == 1
    assert streamer.end() == whole == "".join(writes)[:-1]
    assert all(not w or "\ufffd" not in w or w == "\ufffd" for w in writes)  # whole characters, or one U+FFFD


def test_the_streamer_ends_an_unfinished_character_as_the_whole_texts_decode_does():
    """Generation that stops inside a character (its first bytes only): end() prints the U+FFFD the whole text
    decodes to, then the newline."""
    tok = ByteTokenizer()
    out = io.StringIO()
    streamer = Utf8Printer(tok, out)
    ids = tok.encode("ok é")[:-1]  # "ok " and the first byte of "é"
    for i in ids:
        streamer(torch.tensor([i]))
    assert out.getvalue() == "ok "  # the unfinished character held back
    assert streamer.end() == tok.decode(ids) == "ok \ufffd"
    assert out.getvalue() == "ok \ufffd\n"


def test_a_tokenizer_other_than_the_models_own_is_refused(tmp_path, tiny_model, capsys):
    """--tokenizer naming a tokenizer whose ids mean other text than the model's own is refused by name (the
    text would come out as garbage); a copy of the model's own, in another file, is taken."""
    text = "the cat sat on the mat, the end. " * 50
    own = train_bpe_tokenizer([text], vocab_size=265)
    model = tiny_model(vocab_size=own.vocab_size)
    model.save_pretrained(tmp_path / "model")
    own.save(tmp_path / "model" / "tokenizer")
    command = ["generate", "--checkpoint", str(tmp_path / "model"), "--prompt", "the", "--max-new-tokens", "3"]
    with pytest.raises(SystemExit, match=r"mixcon generate: tokenizer 'bytes' is not the one this model was trained "
                                         r"with \(.*tokenizer\): 259 ids, not 265; leave the tokenizer out"):
        main([*command, "--tokenizer", "bytes"])
    other = train_bpe_tokenizer(["zzz yyy xxx www vvv uuu " * 50], vocab_size=265)
    other.save(tmp_path / "other")
    with pytest.raises(SystemExit, match=r"is not the one this model was trained with .*: id "):
        main([*command, "--tokenizer", str(tmp_path / "other")])
    own.save(tmp_path / "copy")
    assert main([*command, "--tokenizer", str(tmp_path / "copy")]) == 0
    assert capsys.readouterr().out.startswith("the")


def test_a_prompt_that_is_not_utf8_is_refused_by_name(tmp_path):
    """Bytes on the command line that are no UTF-8 reach Python as surrogates: named, before any loading."""
    with pytest.raises(SystemExit, match=r"^mixcon generate: --prompt is not UTF-8 text \(from character 2 on\)"):
        main(["generate", "--checkpoint", str(tmp_path / "nothing"), "--prompt", "ab\udcff\udcfe"])


@pytest.mark.parametrize(("extra", "expected"), [
    ([], dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.95, min_p=0.0, repetition_penalty=1.0, seed=0,
              max_new_tokens=200, compiled=False, dtype=torch.float32)),
    (["--greedy", "--temperature", "1.5", "--top-k", "7", "--top-p", "0.5", "--min-p", "0.25", "--repetition-penalty",
      "1.3", "--seed", "11", "--max-new-tokens", "3", "--dtype", "bf16", "--compile"],
     dict(do_sample=False, temperature=1.5, top_k=7, top_p=0.5, min_p=0.25, repetition_penalty=1.3, seed=11,
          max_new_tokens=3, compiled=True, dtype=torch.bfloat16)),
])
def test_every_option_reaches_generate(tmp_path, tiny_model, monkeypatch, capsys, extra, expected):
    """What `generate` is called with: each flag's value (or its default), the prompt after an EOS (how every
    document starts in training), and sampling kept to the ids the tokenizer decodes when the model has more."""
    from mixcon import MixConForCausalLM

    tok = ByteTokenizer()
    tiny_model(dtype=torch.float32, vocab_size=300).save_pretrained(tmp_path / "model")
    calls: dict = {"compiled": []}

    def record(self, ids, max_new_tokens, **kwargs):
        calls.update(kwargs, ids=ids.tolist(), max_new_tokens=max_new_tokens, dtype=self.embed.weight.dtype)
        return ids

    monkeypatch.setattr(MixConForCausalLM, "generate", record)
    monkeypatch.setattr(MixConForCausalLM, "compile_decode", lambda self: calls["compiled"].append("decode"))
    monkeypatch.setattr(MixConForCausalLM, "compile_prefill", lambda self: calls["compiled"].append("prefill"))
    assert main(["generate", "--checkpoint", str(tmp_path / "model"), "--tokenizer", "bytes", "--prompt", "hi",
                 *extra]) == 0
    assert capsys.readouterr().out == "hi\n"
    assert calls["ids"] == [[tok.eos_id, *tok.encode("hi")]] and tok.eos_id != tok.bos_id
    assert calls["vocab_limit"] == tok.vocab_size < 300 and calls["eos_token_id"] == tok.eos_id
    compiled = expected.pop("compiled")
    assert calls.pop("compiled") == (["decode", "prefill"] if compiled else [])
    assert {key: calls[key] for key in expected} == expected
