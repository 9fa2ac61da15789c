"""A model directory on disk: saves over earlier saves, whole or not at all."""

from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import torch

from mixcon import MixConForCausalLM
from mixcon.models import files
from mixcon.models.files import INCOMPLETE_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, remove_stale_weights

pytest.importorskip("transformers", minversion="5", reason="needs transformers >= 5")
from mixcon.integrations.transformers import MixConHFForCausalLM  # (only with transformers)


def _logits(model: MixConForCausalLM) -> torch.Tensor:
    return model(torch.arange(6)[None] % model.config.vocab_size).logits


def _weights(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".safetensors" in p.name)


@pytest.mark.parametrize("first_sharded", [True, False])
def test_a_save_in_one_form_over_a_save_in_the_other_loads_the_new_weights(tiny_model, tmp_path, first_sharded):
    old, new = tiny_model(dtype=torch.float32, seed=0), tiny_model(dtype=torch.float32, seed=1)
    sharded = dict(max_shard_size="100KB")  # the tiny model in several shards
    if first_sharded:
        MixConHFForCausalLM.from_mixcon(old).save_pretrained(tmp_path, **sharded)
        assert (tmp_path / WEIGHTS_INDEX_NAME).is_file()
        new.save_pretrained(tmp_path)
        assert _weights(tmp_path) == [WEIGHTS_NAME]  # the index and its shards are gone
    else:
        old.save_pretrained(tmp_path)
        MixConHFForCausalLM.from_mixcon(new).save_pretrained(tmp_path, **sharded)
        assert WEIGHTS_NAME not in _weights(tmp_path) and WEIGHTS_INDEX_NAME in _weights(tmp_path)
    torch.testing.assert_close(_logits(MixConForCausalLM.from_pretrained(tmp_path)), _logits(new), rtol=0, atol=0)
    MixConHFForCausalLM.from_mixcon(old).save_pretrained(tmp_path)  # the wrapper unsharded over whatever is there
    assert _weights(tmp_path) == [WEIGHTS_NAME]
    torch.testing.assert_close(_logits(MixConForCausalLM.from_pretrained(tmp_path)), _logits(old), rtol=0, atol=0)


@pytest.mark.parametrize("failing", ["fsync", "weights"])
def test_a_save_that_fails_leaves_the_earlier_save_whole(tiny_model, tmp_path, monkeypatch, failing):
    old = tiny_model(dtype=torch.float32)
    old.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if failing == "fsync":  # the first file's
        monkeypatch.setattr(os, "fsync", disk_full)
    else:
        monkeypatch.setattr(safetensors.torch, "save_model", disk_full)
    new = tiny_model(dtype=torch.float32, seed=1, attn_rope=True)  # its config.json differs too
    assert new.config.to_json() != old.config.to_json()
    with pytest.raises(OSError, match="No space left"):
        new.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary file either


def test_a_save_killed_between_weights_and_config_is_refused_until_saved_again(tiny_model, tmp_path, monkeypatch):
    """New weights under the old config.json loaded as a model nobody saved (same shapes, other settings): a save
    that dies after replacing the weights leaves a mark, and loading refuses the directory until a save finishes."""
    old, new = tiny_model(dtype=torch.float32), tiny_model(dtype=torch.float32, seed=1, attn_rope=True)
    old.save_pretrained(tmp_path)
    write_text = files.write_text_atomic

    def killed_at_config(path, text):
        if path.name == "config.json":
            raise KeyboardInterrupt  # (as a kill: nothing after it runs)
        write_text(path, text)

    monkeypatch.setattr(files, "write_text_atomic", killed_at_config)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=rf"a save_pretrained there did not finish \({INCOMPLETE_NAME} is left\)"):
        MixConForCausalLM.from_pretrained(tmp_path)
    new.save_pretrained(tmp_path)
    assert not (tmp_path / INCOMPLETE_NAME).exists()
    torch.testing.assert_close(_logits(MixConForCausalLM.from_pretrained(tmp_path)), _logits(new), rtol=0, atol=0)
    (tmp_path / INCOMPLETE_NAME).write_text("")  # a save through the wrapper replaces both files too
    MixConHFForCausalLM.from_mixcon(old).save_pretrained(tmp_path)
    torch.testing.assert_close(_logits(MixConForCausalLM.from_pretrained(tmp_path)), _logits(old), rtol=0, atol=0)


def test_stale_weights_are_only_the_files_an_index_names_in_its_own_directory(tmp_path):
    model_dir, outside = tmp_path / "model", tmp_path / "keep.safetensors"
    model_dir.mkdir()
    outside.write_text("")
    names = ["model-00001-of-00002.safetensors", "../keep.safetensors", "notes.txt"]
    for name in names[:1] + names[2:]:
        (model_dir / name).write_text("")
    (model_dir / WEIGHTS_INDEX_NAME).write_text(json.dumps({"weight_map": dict(zip("abc", names, strict=True))}))
    remove_stale_weights(model_dir, keep=WEIGHTS_NAME)
    assert sorted(p.name for p in model_dir.iterdir()) == ["notes.txt"] and outside.exists()
    (model_dir / WEIGHTS_INDEX_NAME).write_text("not json")  # a broken index goes, naming nothing
    remove_stale_weights(model_dir, keep=WEIGHTS_NAME)
    assert sorted(p.name for p in model_dir.iterdir()) == ["notes.txt"]
    # an index naming model.safetensors itself among its shards: the weights just written stay
    (model_dir / WEIGHTS_NAME).write_text("weights")
    (model_dir / WEIGHTS_INDEX_NAME).write_text(json.dumps({"weight_map": {"a": WEIGHTS_NAME, "b": names[0]}}))
    remove_stale_weights(model_dir, keep=WEIGHTS_NAME)
    assert sorted(p.name for p in model_dir.iterdir()) == [WEIGHTS_NAME, "notes.txt"]


def test_a_tied_models_weights_under_lm_head_weight_alone_load_as_both(tiny_model, tmp_path):
    """A tied model's file may hold the shared tensor under lm_head.weight only (another tool's choice of name):
    it loads as the embedding and the head."""
    model = tiny_model(dtype=torch.float32)
    assert model.config.tie_embeddings
    model.save_pretrained(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    state = safetensors.torch.load_file(path)
    state["lm_head.weight"] = state.pop("embed.weight")
    safetensors.torch.save_file(state, path, metadata=files.WEIGHTS_METADATA)
    loaded = MixConForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.embed.weight, model.embed.weight) and loaded.lm_head.weight is loaded.embed.weight
    assert torch.equal(_logits(loaded), _logits(model))
