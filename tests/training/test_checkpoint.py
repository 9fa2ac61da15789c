"""Checkpoints: atomic writes, last-k, and refusal of corrupt, incomplete or mismatched checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from mixcon.data import ByteTokenizer, load_tokenizer
from mixcon.data.tokenizer import train_bpe_tokenizer
from mixcon.models.mixcon import MixConForCausalLM
from mixcon.training import checkpoint as ckpt
from mixcon.training.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint


@pytest.fixture
def trained(make_trainer, tmp_path):
    """A run directory with checkpoints at steps 2 and 4 (and its trainer)."""
    trainer = make_trainer(tmp_path, steps=4, save_every=2, keep_last=5, eval_every=100)
    trainer.fit()
    return trainer, tmp_path


def test_checkpoint_holds_everything_and_loads_as_a_model(trained):
    trainer, run = trained
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002", "step-00000004"]
    c = load_checkpoint(run, expected_config=trainer.model.config,
                        expected_tokenizer=ByteTokenizer().fingerprint())
    assert c.step == 4 and c.path == latest_checkpoint(run)
    assert c.trainer_state["step"] == 4
    assert c.trainer_state["loader"] == {"seed": 0, "step": 4, "data": trainer.loader.data}
    assert c.trainer_state["options"]["lr"] == 3e-3 and "torch" in c.trainer_state["rng"][0]
    assert len(c.optimizer_state["state"]) == len(list(trainer.model.parameters()))
    assert "lm_head.weight" not in c.model_state  # tied to embed.weight: stored once
    for name, value in trainer.model.state_dict().items():
        if name != "lm_head.weight":
            assert torch.equal(c.model_state[name], value), name
    model = MixConForCausalLM.from_pretrained(c.path)
    assert torch.equal(model.lm_head.weight, trainer.model.embed.weight)
    assert isinstance(load_tokenizer(c.path / ckpt.TOKENIZER_DIR), ByteTokenizer)


def test_checkpoint_files_get_the_permissions_of_the_umask(make_trainer, tmp_path):
    """safetensors writes through a temporary file (owner-only); a checkpoint is as readable as any file the
    user writes, e.g. by the group on a shared cluster."""
    old = os.umask(0o022)
    try:
        trainer = make_trainer(tmp_path / "run", steps=1)
        trainer.fit()
        modes = {p.name: p.stat().st_mode & 0o777 for p in trainer.last_checkpoint.rglob("*") if p.is_file()}
    finally:
        os.umask(old)
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}


def test_checkpoint_with_the_old_expert_layout_loads_converted(trained):
    """A checkpoint written before the experts were stored (n, out, in): its model and optimizer moments load
    transposed, equal to what this version writes."""
    from safetensors.torch import load_file, save_file

    _, run = trained
    want = load_checkpoint(run)
    path = latest_checkpoint(run)
    experts = [k for k in want.model_state if k.endswith((".w_gate_up", ".w_down"))]
    assert experts

    def old(tensors, names):
        return {k: v.transpose(-1, -2).contiguous() if k in names else v for k, v in tensors.items()}

    save_file(old(load_file(str(path / ckpt.WEIGHTS_NAME)), experts), str(path / ckpt.WEIGHTS_NAME),
              metadata={"format": "pt"})
    optimizer = torch.load(path / ckpt.OPTIMIZER_FILE, weights_only=True)
    optimizer["state"] = {k: old(v, ("exp_avg", "exp_avg_sq")) if k in experts else v
                          for k, v in optimizer["state"].items()}
    torch.save(optimizer, path / ckpt.OPTIMIZER_FILE)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    for name in (ckpt.WEIGHTS_NAME, ckpt.OPTIMIZER_FILE):  # as that version's manifest would have them
        file = path / name
        manifest["files"][name] = {"sha256": ckpt._sha256(file), "size": file.stat().st_size}
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))
    got = load_checkpoint(run)
    assert got.model_state.keys() == want.model_state.keys()
    for name, value in want.model_state.items():
        assert torch.equal(got.model_state[name], value), name
    for name, moments in want.optimizer_state["state"].items():
        for key, value in moments.items():
            assert torch.equal(got.optimizer_state["state"][name][key], value), (name, key)


def test_a_checkpoints_files_and_its_folder_entry_are_flushed_to_disk(tiny_config, tmp_path, monkeypatch):
    """Every file of a checkpoint is synced before it is renamed into place, and the checkpoints folder after (a
    power cut then loses neither the new checkpoint's contents nor its name)."""
    synced = []
    monkeypatch.setattr(ckpt, "fsync_path", lambda path: synced.append(Path(path)))
    final = ckpt.save_checkpoint(tmp_path, 1, config=tiny_config(), model_state={"w": torch.zeros(2)},
                                 optimizer_state={}, trainer_state={}, tokenizer=ByteTokenizer())
    tmp = final.with_name(f".tmp-{final.name}")
    files = {p.relative_to(final) for p in final.rglob("*") if p.is_file()}
    assert {p.relative_to(tmp) for p in synced[:-1]} == files and len(synced) == len(files) + 1
    assert synced[-1] == final.parent


def test_only_the_last_k_are_kept(make_trainer, tmp_path):
    make_trainer(tmp_path, steps=5, save_every=1, keep_last=2, eval_every=100).fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]


def test_crash_while_saving_leaves_the_previous_checkpoint_loadable(trained, monkeypatch):
    """A save that fails (a full disk: an OSError, or torch's own RuntimeError) names the checkpoint it could not
    write and the one that is intact, and leaves nothing half-written; the next save succeeds."""
    trainer, run = trained
    real_save = torch.save
    errors = iter([OSError("disk full (simulated crash mid-write)"),
                   RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 996544 vs 996436")])

    def crash_after_partial_write(obj, f, *args, **kwargs):
        if str(f).endswith(ckpt.STATE_FILE):
            f.write_bytes(b"partial")
            raise next(errors)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", crash_after_partial_write)
    trainer.step = 6
    for message in (r"disk full \(simulated crash mid-write\)", r"\[enforce fail.*"):
        with pytest.raises(CheckpointError, match=rf"step-00000006 not written \({message}\); "
                                                  rf"{re.escape(str(latest_checkpoint(run)))} is intact"):
            trainer.save()
        assert sorted(p.name for p in (run / ckpt.CHECKPOINTS).iterdir()) == ["step-00000002", "step-00000004"]
    monkeypatch.undo()
    assert load_checkpoint(run).step == 4
    trainer.save()  # the next save succeeds
    assert latest_checkpoint(run).name == "step-00000006"


def test_a_checkpoints_folder_that_cannot_be_written_or_pruned_is_named(trained, monkeypatch):
    """A checkpoints/ folder where the new checkpoint cannot be made: the CheckpointError of any failed save (it
    was a bare errno message); an old checkpoint that cannot be deleted (keep_last): a warning naming it, and the
    new one stays written."""
    trainer, run = trained
    real_mkdir, real_rmtree = ckpt.Path.mkdir, ckpt.shutil.rmtree

    def read_only(self, *args, **kwargs):
        if self.name.startswith(".tmp-"):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(ckpt.Path, "mkdir", read_only)
    trainer.step = 6
    with pytest.raises(CheckpointError, match=r"step-00000006 not written \(\[Errno 13\] Permission denied: .*"
                                              r"\.tmp-step-00000006'\); .*step-00000004 is intact"):
        trainer.save()
    monkeypatch.undo()

    def undeletable(path, *args, **kwargs):
        if ckpt.CHECKPOINTS in str(path) and not kwargs.get("ignore_errors"):
            raise PermissionError(13, "Permission denied", str(path / "trainer_state.pt"))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", undeletable)
    trainer.options = dataclasses.replace(trainer.options, keep_last=2)
    with pytest.warns(UserWarning, match=r"step-00000006 written, but the old checkpoint .*step-00000002 could not "
                                         r"be deleted \(keep_last=2\): \[Errno 13\] Permission denied: .*; left as "
                                         r"\.tmp-pruned-step-00000002, deleted at the next save"):
        trainer.save()
    assert [p.name for p in list_checkpoints(run)] == ["step-00000004", "step-00000006"]
    monkeypatch.undo()
    trainer.step = 8
    trainer.save()
    assert sorted(p.name for p in (run / ckpt.CHECKPOINTS).iterdir()) == ["step-00000006", "step-00000008"]


def test_a_crash_while_an_old_checkpoint_is_deleted_leaves_no_part_of_it(trained, kill_mid_delete, monkeypatch):
    """keep_last deletes an old checkpoint under another name: a kill mid-delete leaves no partial checkpoint (under
    its own name, without its manifest, nothing would ever delete it), and the next save removes what is left."""
    trainer, run = trained
    kill_mid_delete(ckpt.MANIFEST)
    trainer.options = dataclasses.replace(trainer.options, keep_last=2)
    trainer.step = 6
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(run)] == ["step-00000004", "step-00000006"]
    trainer.step = 8
    trainer.save()
    assert sorted(p.name for p in (run / ckpt.CHECKPOINTS).iterdir()) == ["step-00000006", "step-00000008"]


def test_crash_between_the_renames_of_a_replacement_loses_nothing(trained, monkeypatch):
    """Saving a step again swaps the old copy out, then renames the new one in: a crash in between leaves the
    old copy under its swapped-out name, which comes back as the checkpoint (not deleted as debris)."""
    trainer, run = trained
    before = load_checkpoint(run).model_state
    real_rename = type(run).rename

    def crash_on_the_second_rename(self, target):
        if self.name == ".tmp-step-00000004":
            raise OSError("power cut (simulated) after the old copy was swapped out")
        return real_rename(self, target)

    monkeypatch.setattr(type(run), "rename", crash_on_the_second_rename)
    with pytest.raises(OSError, match="simulated"):
        trainer.save()  # step 4 again
    monkeypatch.undo()
    root = run / ckpt.CHECKPOINTS
    assert not (root / "step-00000004").exists() and (root / ".tmp-old-step-00000004").is_dir()
    assert latest_checkpoint(run).name == "step-00000004"  # put back when listed: a resume finds it
    assert all(torch.equal(t, before[k]) for k, t in load_checkpoint(run).model_state.items())
    trainer.save()
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002", "step-00000004"]
    assert not list(root.glob(".tmp-*"))


def test_a_swapped_out_copy_is_put_back_by_the_next_save_without_a_listing_first(trained):
    """A crash between the renames of a replacement, then a save of a later step straight away (no resume listed the
    checkpoints before): the swapped-out copy comes back, not pruned as debris; and one left beside its replacement
    (a crash after the new copy was in place) does not fail the listing."""
    trainer, run = trained
    root = run / ckpt.CHECKPOINTS
    shutil.copytree(root / "step-00000004", root / ".tmp-old-step-00000004")  # crash after the new copy went in
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002", "step-00000004"]
    shutil.rmtree(root / ".tmp-old-step-00000004")
    (root / "step-00000004").rename(root / ".tmp-old-step-00000004")  # crash between the two renames
    trainer.step = 6
    trainer.save()
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002", "step-00000004", "step-00000006"]


@pytest.mark.parametrize("name", [ckpt.WEIGHTS_NAME, ckpt.OPTIMIZER_FILE, ckpt.STATE_FILE, "tokenizer/tokenizer.json"])
def test_corrupt_file_is_refused(trained, name):
    _, run = trained
    path = latest_checkpoint(run) / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)}: corrupt"):
        load_checkpoint(run)
    if name == ckpt.OPTIMIZER_FILE:  # readers of the trainer state or the model verify only what they read
        assert ckpt.read_trainer_state(run)["step"] == 4
        assert ckpt.model_directory(run) == latest_checkpoint(run)


def test_a_corrupt_checkpoint_names_the_newest_intact_one_before_it(trained):
    _, run = trained
    first, latest = list_checkpoints(run)
    (latest / ckpt.WEIGHTS_NAME).write_bytes(b"x")
    with pytest.raises(CheckpointError, match=rf"corrupt .*; the newest intact checkpoint before it is "
                                              rf"{re.escape(str(first))} \(name it to load it; `mixcon train --resume "
                                              rf"{re.escape(str(first))} --overwrite` continues the run from there\)"):
        load_checkpoint(run)
    assert load_checkpoint(first).step == 2
    (first / ckpt.STATE_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt .*; no earlier checkpoint of the run "
                                              r"is intact"):
        load_checkpoint(run)


def test_the_intact_checkpoint_named_is_the_newest_of_several(trained):
    """With two intact checkpoints before a corrupt one, the error names the later of them (the least lost)."""
    _, run = trained
    _, second = list_checkpoints(run)
    third = run / ckpt.CHECKPOINTS / "step-00000006"
    shutil.copytree(second, third)
    (third / ckpt.WEIGHTS_NAME).write_bytes(b"x")
    with pytest.raises(CheckpointError, match=rf"the newest intact checkpoint before it is {re.escape(str(second))} "):
        load_checkpoint(third)


def test_checkpoints_are_ordered_by_step_past_eight_digits(trained):
    """Step 100000000 is newer than step 99999999, though its name sorts first."""
    _, run = trained
    latest = latest_checkpoint(run)
    for step in (99_999_999, 100_000_000):
        shutil.copytree(latest, ckpt.checkpoint_path(run, step))
    assert latest_checkpoint(run) == ckpt.checkpoint_path(run, 100_000_000)
    assert [ckpt.checkpoint_step(p) for p in list_checkpoints(run)] == [2, 4, 99_999_999, 100_000_000]


def test_a_checkpoint_or_run_given_as_the_working_directory_loads(trained, monkeypatch):
    _, run = trained
    monkeypatch.chdir(run)
    assert load_checkpoint(".").step == 4 and ckpt.read_trainer_state(".")["step"] == 4
    monkeypatch.chdir(latest_checkpoint(run))
    assert ckpt.model_directory(".").resolve() == latest_checkpoint(run).resolve()
    assert load_checkpoint(".").step == 4


def test_a_checkpoint_its_run_deletes_while_it_is_read_is_read_again_from_the_newest(trained, monkeypatch):
    """A reader of a run still training (generate, eval, export) takes the newest checkpoint, which the trainer may
    prune meanwhile: it reads the new newest; a checkpoint named itself, or one deleted at every try, is an error."""
    _, run = trained
    read = MixConForCausalLM.from_pretrained.__func__
    prunes = {"left": 1}  # how many reads the trainer's pruning overtakes
    deleted = []

    def pruned_while_read(cls, path, **kw):  # the trainer saves two steps on and deletes what is being read
        if prunes["left"]:
            prunes["left"] -= 1
            shutil.copytree(path, run / "checkpoints" / f"step-{ckpt.checkpoint_step(path) + 2:08d}")
            shutil.rmtree(path)
            deleted.append(path.name)
        return read(cls, path, **kw)

    monkeypatch.setattr(MixConForCausalLM, "from_pretrained", classmethod(pruned_while_read))
    _, tok = ckpt.load_model_and_tokenizer(run)
    assert deleted == ["step-00000004"] and isinstance(tok, ByteTokenizer)
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002", "step-00000006"]
    prunes["left"] = 1
    with pytest.raises(Exception, match="step-00000002"):  # a checkpoint named itself: not another one
        ckpt.load_model_and_tokenizer(run / "checkpoints" / "step-00000002")
    prunes["left"] = 5
    with pytest.raises(CheckpointError, match=r"newest checkpoint was replaced while being read, 5 times"):
        ckpt.load_model_and_tokenizer(run)
    # Caught mid-deletion (rmtree removes the files first): its tokenizer is gone, its folder still there.
    newest = latest_checkpoint(run)
    shutil.copytree(newest, run / "checkpoints" / "step-00000099")
    shutil.rmtree(newest / ckpt.TOKENIZER_DIR)
    real_resolve = ckpt.resolve_checkpoint
    first, served = [newest], []  # the first read began before the trainer saved step 99 and began pruning `newest`

    def slow_reader(path):
        served.append((first.pop() if first else real_resolve(path)).name)
        return Path(run / "checkpoints" / served[-1])

    monkeypatch.setattr(ckpt, "resolve_checkpoint", slow_reader)
    prunes["left"] = 0
    assert isinstance(ckpt.load_model_and_tokenizer(run)[1], ByteTokenizer)
    assert served[0] == newest.name and served[-1] == "step-00000099"  # read again, from the new newest
    served.clear()
    shutil.rmtree(run / "checkpoints" / "step-00000099" / ckpt.TOKENIZER_DIR)
    with pytest.raises(CheckpointError, match=r"step-00000099/tokenizer/tokenizer.json: missing from the checkpoint"):
        ckpt.load_model_and_tokenizer(run)  # the newest itself is damaged: said so, not read again
    assert set(served) == {"step-00000099"}


def test_a_corrupt_manifest_or_trainer_state_names_the_intact_checkpoint_too(trained):
    _, run = trained
    first, latest = list_checkpoints(run)
    (latest / ckpt.STATE_FILE).write_bytes(b"x")
    hint = rf"; the newest intact checkpoint before it is {re.escape(str(first))}"
    with pytest.raises(CheckpointError, match=rf"trainer_state\.pt: corrupt .*{hint}"):
        ckpt.read_trainer_state(run)  # what `train --resume` reads first
    (latest / ckpt.MANIFEST).write_text("{")
    with pytest.raises(CheckpointError, match=rf"manifest\.json: corrupt .*{hint}"):
        load_checkpoint(run)


def test_a_replacement_survives_a_reader_putting_the_old_directory_back_in_between(tmp_path, monkeypatch):
    """publish_directory swaps the old directory out, then renames the new one in; a reader in between
    (restore_swapped) puts the old one back: the writer swaps it out again instead of failing."""
    final, tmp = tmp_path / "export", tmp_path / ".tmp-export"
    final.mkdir()
    (final / "old.txt").write_text("old")
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    rename = type(final).rename
    raced = []

    def rename_then_a_reader_looks(self, target):
        out = rename(self, target)
        if self == final and not raced:  # just swapped out
            raced.append(1)
            ckpt.restore_swapped(final)
        return out

    monkeypatch.setattr(type(final), "rename", rename_then_a_reader_looks)
    ckpt.publish_directory(tmp, final)
    assert raced and sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert [p.name for p in final.iterdir()] == ["new.txt"]


def test_truncated_or_missing_files_are_refused(trained):
    _, run = trained
    path = latest_checkpoint(run)
    (path / ckpt.WEIGHTS_NAME).write_bytes((path / ckpt.WEIGHTS_NAME).read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt"):
        load_checkpoint(path)
    (path / ckpt.OPTIMIZER_FILE).unlink()
    (path / ckpt.MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"manifest\.json: corrupt"):
        load_checkpoint(path)
    (path / ckpt.MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(path)
    assert latest_checkpoint(run).name == "step-00000002"  # without a manifest it is not a checkpoint



def test_a_manifest_of_the_wrong_shape_or_an_empty_state_is_named(trained):
    _, run = trained
    path = latest_checkpoint(run)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    (path / ckpt.STATE_FILE).write_bytes(b"")  # the manifest still lists it: read_trainer_state checks it first
    with pytest.raises(CheckpointError, match=r"trainer_state\.pt: corrupt"):
        ckpt.read_trainer_state(run)
    for broken in ([1, 2], {k: v for k, v in manifest.items() if k != "files"},
                   {k: v for k, v in manifest.items() if k != "step"}):
        (path / ckpt.MANIFEST).write_text(json.dumps(broken))
        with pytest.raises(CheckpointError, match=r"manifest\.json: corrupt \(not a manifest"):
            load_checkpoint(path)

def test_mismatched_config_or_tokenizer_is_refused(trained, make_trainer, tmp_path):
    trainer, run = trained
    other = trainer.model.config.replace(d_model=48, conba_delay=1)
    with pytest.raises(CheckpointError, match=r"config differs.*conba_delay: 2 != 1.*d_model: 32 != 48"):
        load_checkpoint(run, expected_config=other)
    with pytest.raises(CheckpointError, match="trained with tokenizer"):
        load_checkpoint(run, expected_tokenizer="another-fingerprint")
    wider = make_trainer(tmp_path / "wider", config=other)
    with pytest.raises(CheckpointError, match="d_model"):
        wider.fit(resume_from=run)


def test_a_tokenizer_that_means_the_same_ids_matches_another_fingerprint(trained):
    """A fingerprint written by another `tokenizers` version (its to_str changed: 0.20 wrote merges as pairs) with
    the checkpoint's own tokenizer meaning every id alike is the same tokenizer; one with other ids is not."""
    _, run = trained
    path = latest_checkpoint(run)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    (path / ckpt.MANIFEST).write_text(json.dumps({**manifest, "tokenizer_fingerprint": "written-by-another-version"}))
    assert load_checkpoint(run, expected_tokenizer=ByteTokenizer()).step == manifest["step"]
    with pytest.raises(CheckpointError, match=r"trained with tokenizer 'written-by-another-version'"):
        load_checkpoint(run, expected_tokenizer=ByteTokenizer().fingerprint())  # a fingerprint alone: no meaning
    bpe = train_bpe_tokenizer(["the king and the queen " * 50], 300)
    with pytest.raises(CheckpointError, match=r"but this run uses '[0-9a-f]{64}' \(\d+ ids, not 259\)"):
        load_checkpoint(run, expected_tokenizer=bpe)


def test_weights_of_the_wrong_shape_are_refused(trained):
    _, run = trained
    c = load_checkpoint(run)
    expected = {k: v.shape for k, v in c.model_state.items()}
    expected["embed.weight"] = torch.Size([7, 7])
    del expected["norm.weight"]
    with pytest.raises(CheckpointError, match=r"unexpected \['norm.weight'\].*embed.weight"):
        ckpt.check_model_state(c.model_state, expected, c.path)


def test_weights_the_model_does_not_have_are_refused_alone(tmp_path):
    """Names the model lacks are refused even when every name it has fits (they were not silently dropped)."""
    state = {"embed.weight": torch.zeros(4, 2), "extra.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"missing \[\], unexpected \['extra.weight'\], wrong shape \[\]"):
        ckpt.check_model_state(state, {"embed.weight": torch.Size([4, 2])}, tmp_path)


def test_unknown_format_version_is_refused(trained):
    _, run = trained
    manifest_file = latest_checkpoint(run) / ckpt.MANIFEST
    manifest = json.loads(manifest_file.read_text())
    manifest["format_version"] = 99
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(run)
    del manifest["format_version"]
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format_version None, this version of mixcon reads 1"):
        load_checkpoint(run)


def test_not_a_run_directory(tmp_path):
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        load_checkpoint(tmp_path)


def test_a_wrong_path_says_what_is_wrong_with_it(trained):
    """A path that does not exist (a mistyped step names the checkpoints there), or a file of a checkpoint."""
    _, run = trained
    with pytest.raises(CheckpointError, match=r"step-9: no such file or directory; .*checkpoints holds "
                                              r"step-00000002, step-00000004$"):
        load_checkpoint(run / "checkpoints" / "step-9")
    with pytest.raises(CheckpointError, match=r"nonexistent: no such file or directory$"):
        load_checkpoint(run / "nonexistent")
    with pytest.raises(CheckpointError, match=r"model.safetensors is a file; give the directory of a checkpoint "
                                              r"\(.*step-00000004\?\) or of a run"):
        load_checkpoint(run / "checkpoints" / "step-00000004" / "model.safetensors")


def test_the_checkpoints_a_run_replaces(trained, tmp_path, monkeypatch):
    """All of them for a new run or one resumed from elsewhere, those after the step a run goes back to in its own
    (named through a link to its checkpoints/ or a relative path too); a folder named like a checkpoint without a
    step number is none."""
    _, run = trained
    step2, step4 = list_checkpoints(run)
    shutil.copytree(step2, run / ckpt.CHECKPOINTS / "step-best")
    assert list_checkpoints(run) == [step2, step4]
    assert ckpt.replaced_checkpoints(run, None) == [step2, step4]
    assert ckpt.replaced_checkpoints(run, step2) == [step4] and ckpt.replaced_checkpoints(run, step4) == []
    other = tmp_path / "elsewhere"
    shutil.copytree(run / ckpt.CHECKPOINTS, other / ckpt.CHECKPOINTS)
    assert ckpt.replaced_checkpoints(run, other / ckpt.CHECKPOINTS / step2.name) == [step2, step4]
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / ckpt.CHECKPOINTS).symlink_to(run / ckpt.CHECKPOINTS)
    assert ckpt.in_run(step2, linked) and ckpt.replaced_checkpoints(linked, step2) == [linked / "checkpoints" /
                                                                                       step4.name]
    monkeypatch.chdir(run)
    assert ckpt.in_run(Path(ckpt.CHECKPOINTS) / step2.name, run) and not ckpt.in_run(step2, other)


def test_the_model_tokenizer_is_its_folder_first_and_never_larger_than_the_model(trained):
    _, run = trained
    model_dir = latest_checkpoint(run)  # tokenizer/ holds the bytes tokenizer (259 ids)
    train_bpe_tokenizer(["some text to merge\n"] * 20, vocab_size=300).save(model_dir)  # and a tokenizer.json
    assert isinstance(ckpt.model_tokenizer(model_dir, 300), ByteTokenizer)
    assert isinstance(ckpt.model_tokenizer(model_dir, 259, "bytes"), ByteTokenizer)
    with pytest.raises(ValueError, match="has 259 ids, more than the model's vocab_size 258"):
        ckpt.model_tokenizer(model_dir, 258, "bytes")


def written_by_another_version(path: Path, name: str, data: bytes) -> None:
    """Checkpoint file `name` replaced by `data`, listed with its hash in the manifest: intact, as another version of
    mixcon or torch wrote it, but not necessarily readable by this one."""
    (path / name).write_bytes(data)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    manifest["files"][name] = {"sha256": ckpt._sha256(path / name), "size": len(data)}
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(("name", "data", "load", "message"), [
    (ckpt.CONFIG_NAME, b'{"d_model": -5}', load_checkpoint, r"config\.json: invalid config \(.*d_model"),
    (ckpt.OPTIMIZER_FILE, b"not a torch file", load_checkpoint, r"step-00000004: unreadable checkpoint file \("),
    (ckpt.STATE_FILE, b"not a torch file", ckpt.read_trainer_state, r"trainer_state\.pt: unreadable \("),
])
def test_intact_files_this_version_cannot_read_are_named(trained, name, data, load, message):
    _, run = trained
    written_by_another_version(latest_checkpoint(run), name, data)
    with pytest.raises(CheckpointError, match=message):
        load(run)


def test_a_checkpoint_whose_own_tokenizer_does_not_load(trained):
    """Its fingerprint differs and its tokenizer/ does not load: refused, saying why; a tokenizer named instead of
    the model's own replaces it."""
    _, run = trained
    path = latest_checkpoint(run)
    written_by_another_version(path, f"{ckpt.TOKENIZER_DIR}/tokenizer.json", b'{"version": "9.0"}')
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    (path / ckpt.MANIFEST).write_text(json.dumps({**manifest, "tokenizer_fingerprint": "another"}))
    with pytest.raises(CheckpointError, match=r"trained with tokenizer 'another', but this run uses '[0-9a-f]{64}' "
                                              r"\(its own tokenizer does not load \(.*tokenizer\.json: not a Hugging "
                                              r"Face tokenizer\.json"):
        load_checkpoint(run, expected_tokenizer=ByteTokenizer())
    assert isinstance(ckpt.model_tokenizer(path, 259, "bytes"), ByteTokenizer)
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a Hugging Face tokenizer\.json"):
        ckpt.model_tokenizer(path, 259)


def test_a_corrupt_checkpoint_outside_a_run_names_no_earlier_one(trained, tmp_path):
    _, run = trained
    copy = tmp_path / "copy"
    shutil.copytree(latest_checkpoint(run), copy)
    (copy / ckpt.WEIGHTS_NAME).write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt \(size or sha256 differs from "
                                              r"manifest\.json\); refusing to load it$"):
        load_checkpoint(copy)


def test_the_root_directory_is_no_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=r"^/: neither a checkpoint"):
        load_checkpoint("/")
