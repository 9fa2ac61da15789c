"""`mixcon export hf`: the written directory generates what the checkpoint does; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", minversion="5", reason="needs transformers >= 5")

from mixcon import MixConForCausalLM
from mixcon.cli import main
from mixcon.data import ByteTokenizer, load_tokenizer, train_bpe_tokenizer


@pytest.fixture
def model_dir(tmp_path: Path, tiny_model) -> Path:
    """A saved tiny model with its byte tokenizer in tokenizer/."""
    tok = ByteTokenizer()
    model = tiny_model(dtype=torch.float32, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    model.save_pretrained(tmp_path / "model")
    tok.save(tmp_path / "model" / "tokenizer")
    return tmp_path / "model"


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "hf", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ["--checkpoint", "--out", "--tokenizer", "--dtype", "--max-shard-size", "--overwrite", "AutoTokenizer"]:
        assert flag in text


def test_the_export_generates_what_the_checkpoint_does(model_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", "hf", "--checkpoint", str(model_dir), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    texts = []
    for source in (model_dir, out):
        assert main(["generate", "--checkpoint", str(source), "--prompt", "ROMEO:", "--greedy",
                     "--max-new-tokens", "12"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("ROMEO:") and len(texts[0]) > len("ROMEO:\n")


def test_errors_exit_with_the_reason(model_dir, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("not ours")
    with pytest.raises(SystemExit, match=r"mixcon export hf: .*not an empty directory.*--overwrite"):
        main(["export", "hf", "--checkpoint", str(model_dir), "--out", str(out)])
    assert (out / "keep.txt").read_text() == "not ours"
    bpe = train_bpe_tokenizer(["some text to merge, some text to merge\n"] * 50, vocab_size=300)
    bpe.save(tmp_path / "bpe")
    with pytest.raises(SystemExit, match=r"mixcon export hf: .*has 2\d\d ids, more than the model's vocab_size 259"):
        main(["export", "hf", "--checkpoint", str(model_dir), "--out", str(tmp_path / "x"),
              "--tokenizer", str(tmp_path / "bpe")])
    with pytest.raises(SystemExit, match=r"mixcon export hf: .*nothing"):
        main(["export", "hf", "--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "y")])


def test_an_out_that_is_the_source_or_a_file_is_refused(model_dir, tmp_path):
    weights = (model_dir / "model.safetensors").read_bytes()
    for out in (model_dir, model_dir / "tokenizer"):
        with pytest.raises(SystemExit, match=r"mixcon export hf: out=.* \(--out\) is.* which the export reads"):
            main(["export", "hf", "--checkpoint", str(model_dir), "--out", str(out), "--overwrite"])
    assert (model_dir / "model.safetensors").read_bytes() == weights
    (tmp_path / "somefile.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"mixcon export hf: out=.*somefile.txt' \(--out\) exists and is not a "
                                         "directory; name a directory"):
        main(["export", "hf", "--checkpoint", str(model_dir), "--out", str(tmp_path / "somefile.txt"), "--overwrite"])
    assert (tmp_path / "somefile.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_training_starts_from_an_export(model_dir, tmp_path):
    """A model that went out to transformers comes back as the start of a new run (learning rate 0: unchanged)."""
    out = tmp_path / "hf"
    assert main(["export", "hf", "--checkpoint", str(model_dir), "--out", str(out)]) == 0
    (tmp_path / "c.txt").write_text("To be, or not to be, that is the question.\n" * 40)
    assert main(["train", "--init-from", str(out), "--corpus", str(tmp_path / "c.txt"), "--val-fraction", "0",
                 "--steps", "1", "--lr", "0", "--batch-size", "2", "--seq-len", "16", "--sample-tokens", "0",
                 "--no-progress", "--out", str(tmp_path / "run")]) == 0
    run = MixConForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / "step-00000001")
    source = MixConForCausalLM.from_pretrained(model_dir)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in run.state_dict().items())
    assert load_tokenizer(tmp_path / "run" / "checkpoints" / "step-00000001" / "tokenizer").encode("é") == [0xC3, 0xA9]


def test_dtype_shard_size_and_overwrite_reach_the_export(model_dir, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("replaced")
    assert main(["export", "hf", "--checkpoint", str(model_dir), "--out", str(out), "--dtype", "bf16",
                 "--max-shard-size", "100KB", "--overwrite"]) == 0
    assert not (out / "old.txt").exists() and (out / "model.safetensors.index.json").is_file()
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1
    for shard in shards:
        with safe_open(shard, "pt") as f:
            tensors = [f.get_tensor(name) for name in f.keys()]  # noqa: SIM118 (safe_open is no mapping)
            assert {t.dtype for t in tensors} == {torch.bfloat16}
            assert sum(t.nbytes for t in tensors) <= 100_000 or len(tensors) == 1
