"""`mixcon data prepare` (and the checks it shares with `mixcon tokenizer train`): help, summaries, reuse, errors."""

from __future__ import annotations

import pytest

from mixcon.cli import main
from mixcon.data import BPETokenizer, ShardDataset, load_tokenizer


@pytest.mark.parametrize("command", [["tokenizer", "train"], ["data", "prepare"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: mixcon {' '.join(command)}" in out and "--corpus" in out and "corpus specs:" in out


@pytest.fixture
def corpus_dir(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(20):
        (folder / f"{i:02d}.txt").write_text(f"Document {i}: the year {2000 + i}, 東京 and naïve text.\n" * 40)
    (folder / "bad.txt").write_bytes(b"caf\xe9")
    return folder


def test_train_a_tokenizer_then_prepare_shards_and_reuse_them(corpus_dir, tmp_path, capsys):
    assert main(["tokenizer", "train", "--corpus", str(corpus_dir), "--vocab-size", "300",
                 "--out", str(tmp_path / "tok")]) == 0
    out = capsys.readouterr().out
    for line in ("documents    20 (1 files or records skipped)", "bytes/token", "(asked for 300)", "MB/s",
                 f"saved        {tmp_path / 'tok' / 'tokenizer.json'}"):
        assert line in out
    assert isinstance(load_tokenizer(tmp_path / "tok"), BPETokenizer)

    argv = ["data", "prepare", "--corpus", str(corpus_dir), "--tokenizer", str(tmp_path / "tok"),
            "--out", str(tmp_path / "shards"), "--val-fraction", "0.1", "--workers", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    ds = ShardDataset(tmp_path / "shards")
    assert f"train      18 documents, {ds.index['splits']['train']['bytes']:,} bytes, {len(ds.train):,} tokens" in out
    assert "val        2 documents" in out and "skipped    1 files" in out and "built in" in out
    assert main(argv) == 0
    assert ", reused" in capsys.readouterr().out


def test_data_prepare_defaults_to_bytes(corpus_dir, tmp_path, capsys):
    assert main(["data", "prepare", "--corpus", str(corpus_dir), "--out", str(tmp_path / "s")]) == 0
    assert "tokenizer  bytes, vocab 259" in capsys.readouterr().out


def test_data_prepare_hands_its_options_to_prepare_shards(corpus_dir, tmp_path, monkeypatch):
    from mixcon.cli import data as data_cli

    given = {}

    def record(corpus, tok, out, **kwargs):
        given.update(kwargs)
        raise ValueError("stop")

    monkeypatch.setattr(data_cli, "prepare_shards", record)
    with pytest.raises(SystemExit, match="stop"):
        main(["data", "prepare", "--corpus", str(corpus_dir), "--out", str(tmp_path / "s"), "--workers", "2",
              "--val-fraction", "0.25", "--seed", "5", "--max-bytes", "1000"])
    assert given == dict(val_fraction=0.25, seed=5, workers=2, max_bytes=1000)


@pytest.mark.parametrize("argv,message", [
    (["data", "prepare", "--corpus", "/no/such/corpus", "--out", "x"], "mixcon data prepare: corpus '/no/such/corpus'"),
    (["data", "prepare", "--tokenizer", "/no/such/tok", "--out", "x"], "expected 'bytes', a tokenizer.json file"),
])  # a --vocab-size below 259: argparse (below)
def test_errors_exit_with_the_message(argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert message in str(exit_info.value)


@pytest.mark.parametrize("argv,flag,value", [
    (["data", "prepare", "--out", "x"], "--workers", "-2"), (["data", "prepare", "--out", "x"], "--workers", "0"),
    (["data", "prepare", "--out", "x"], "--workers", "two"),
    (["eval", "perplexity", "--checkpoint", "x"], "--context", "0"),
    (["eval", "perplexity", "--checkpoint", "x"], "--stride", "-1"),
    (["eval", "tasks", "--checkpoint", "x", "--tasks", "t"], "--max-length", "0"),
    (["eval", "tasks", "--checkpoint", "x", "--tasks", "t"], "--batch-size", "0"),
])
def test_counts_must_be_positive_integers(argv, flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}: expected an integer >= 1, got '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["data", "prepare", "--out", "x"], ["tokenizer", "train", "--out", "x"],
                                     ["eval", "perplexity", "--checkpoint", "x"], ["bench", "filler"],
                                     ["bench", "ablate"]])
def test_max_bytes_is_a_count_with_0_for_all(command, capsys):
    """As `mixcon train --max-bytes 0`: 0 reads the whole corpus; a negative count is a usage error."""
    from mixcon.cli import build_parser

    assert build_parser().parse_args([*command, "--max-bytes", "0"]).max_bytes is None
    assert build_parser().parse_args([*command, "--max-bytes", "5_000"]).max_bytes == 5000
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--max-bytes", "-1"])
    assert exit_info.value.code == 2
    assert "argument --max-bytes: expected an integer >= 0, got '-1'" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["generate", "--checkpoint", "x", "--seed", "99999999999999999999"],
     "argument --seed: expected an integer in [0, 18446744073709551615], got '99999999999999999999'"),
    (["data", "prepare", "--out", "x", "--seed", "-1"], "argument --seed: expected an integer in [0, "),
    (["tokenizer", "train", "--out", "x", "--vocab-size", "100"],
     "argument --vocab-size: expected an integer in [259, 16777216], got '100'"),
    (["tokenizer", "train", "--out", "x", "--vocab-size", str(2**31)],  # (the trainer aborts allocating it)
     "argument --vocab-size: expected an integer in [259, 16777216]"),
])
def test_seeds_and_vocabulary_sizes_are_checked_by_argparse(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_an_out_that_is_a_file_is_refused_before_the_corpus_is_read(tmp_path, monkeypatch):
    from mixcon.cli import data, tokenizer

    monkeypatch.setattr(tokenizer, "train_bpe_tokenizer", lambda *a, **k: pytest.fail("trained first"))
    monkeypatch.setattr(data.Corpus, "from_spec", lambda *a, **k: pytest.fail("read first"))
    (tmp_path / "file").write_text("x")
    for command in (["tokenizer", "train"], ["data", "prepare"]):
        with pytest.raises(SystemExit, match=rf"mixcon {' '.join(command)}: --out .*file is a file; give a folder"):
            main([*command, "--corpus", str(tmp_path / "file"), "--out", str(tmp_path / "file")])
        with pytest.raises(SystemExit, match=rf"^mixcon {' '.join(command)}: --out .*file/below: a file lies on its "
                                             r"path; give a folder$"):  # (found only when written, after the work)
            main([*command, "--corpus", str(tmp_path / "file"), "--out", str(tmp_path / "file" / "below")])


@pytest.mark.parametrize("command", [["tokenizer", "train", "--vocab-size", "300"],
                                     ["train", "--config", "tiny", "--steps", "1"]])
def test_a_corpus_of_non_utf8_text_names_what_was_skipped(tmp_path, command):
    """A Latin-1 file trains no BPE: the error names the file and why it was skipped (it said "the texts are
    empty")."""
    (tmp_path / "latin1.txt").write_bytes("café crème\n".encode("latin-1") * 100)
    with pytest.raises(SystemExit, match=r"empty corpus: no documents in text .*latin1.txt \(1 file\); skipped 1 "
                                         r"\(.*latin1.txt: not UTF-8\)"):
        main([*command, "--corpus", str(tmp_path / "latin1.txt"), "--out", str(tmp_path / "out")])


def test_data_prepare_options_reach_the_shards(corpus_dir, tmp_path):
    """--seed, --val-fraction (default 0.01), --max-bytes as the index records them; an --out inside the corpus
    is not read as corpus (the second build reuses the first)."""
    base = ["data", "prepare", "--corpus", str(corpus_dir), "--workers", "1"]
    assert main([*base, "--out", str(tmp_path / "default")]) == 0
    index = ShardDataset(tmp_path / "default").index
    assert (index["val_fraction"], index["seed"], index["max_bytes"]) == (0.01, 0, None)
    val = {}
    for seed in (1, 2):
        assert main([*base, "--out", str(tmp_path / f"s{seed}"), "--seed", str(seed), "--val-fraction", "0.2",
                     "--max-bytes", "20000"]) == 0
        ds = ShardDataset(tmp_path / f"s{seed}")
        assert (ds.index["seed"], ds.index["val_fraction"], ds.index["max_bytes"]) == (seed, 0.2, 20000)
        assert ds.index["truncated"] and sum(s["bytes"] for s in ds.index["splits"].values()) <= 20000
        val[seed] = ds.tokens("val").tolist()
    assert val[1] != val[2]  # other documents held out
    inside = corpus_dir / "shards"
    for _ in range(2):  # a glob that names every file below the corpus folder, the shards' too
        assert main(["data", "prepare", "--corpus", str(corpus_dir / "**"), "--workers", "1",
                     "--out", str(inside)]) == 0
    for field in ("key", "splits"):
        assert ShardDataset(inside).index[field] == ShardDataset(tmp_path / "default").index[field]
