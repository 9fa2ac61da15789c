"""The training loop: exact resume, clean stops (signal, time budget), the non-finite-loss guard, and learning."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mixcon import MixConConfig
from mixcon.data import ByteTokenizer
from mixcon.models.mixcon import IGNORE, MixConForCausalLM
from mixcon.training import checkpoint as ckpt
from mixcon.training.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint
from mixcon.training.metrics import read_metrics
from mixcon.training.optim import lr_at
from mixcon.training.trainer import NonFiniteLossError, Trainer, TrainOptions


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run_dir / "metrics.jsonl") if key in r}


def interrupt_at(trainer: Trainer, step: int, signum: int = signal.SIGINT) -> None:
    """Deliver `signum` to this process right after optimizer step `step`, as Ctrl-C or `kill` would."""
    train_step = trainer.train_step

    def wrapped() -> dict:
        record = train_step()
        if trainer.step == step:
            os.kill(os.getpid(), signum)
        return record

    trainer.train_step = wrapped


@pytest.mark.parametrize("noise", [False, True])
def test_resume_after_interrupt_equals_uninterrupted_run(make_trainer, tiny_config, tmp_path, noise):
    """With training noise (Conba's process noise draws from torch's RNG), the RNG state is restored too."""
    config = tiny_config(conba_process_noise=0.1) if noise else None
    full = make_trainer(tmp_path / "full", config=config, steps=8, save_every=100)
    full.fit()

    first = make_trainer(tmp_path / "split", config=config, steps=8, save_every=100)
    interrupt_at(first, 3, signal.SIGTERM)
    summary = first.fit()
    assert summary.stopped_by == "SIGTERM" and summary.steps == 3
    assert [p.name for p in list_checkpoints(tmp_path / "split")] == ["step-00000003"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    second = make_trainer(tmp_path / "split", config=config, steps=8, save_every=100)
    assert second.fit(resume_from=tmp_path / "split").steps == 8

    expected, got = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert sorted(got) == list(range(1, 9))
    assert got == expected  # bitwise: weights, AdamW moments, schedule and data position all restored
    assert losses(tmp_path / "split", "val_loss") == losses(tmp_path / "full", "val_loss")
    a = MixConForCausalLM.from_pretrained(latest_checkpoint(tmp_path / "full"))
    b = MixConForCausalLM.from_pretrained(latest_checkpoint(tmp_path / "split"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))



def test_a_run_resumed_from_step_0_equals_an_uninterrupted_one(make_trainer, tmp_path):
    """A checkpoint before the first step (Ctrl-C during the first validation, a budget spent before a step)
    holds no optimizer state: AdamW's first step is step 1 after the resume too (torch had filled the state
    with a step on zero gradients, so the resumed run's bias corrections were a step ahead)."""
    make_trainer(tmp_path / "full", steps=4, save_every=100).fit()
    make_trainer(tmp_path / "split", steps=4, save_every=100).save()
    assert torch.load(latest_checkpoint(tmp_path / "split") / "optimizer.pt")["state"] == {}
    make_trainer(tmp_path / "split", steps=4, save_every=100).fit(resume_from=tmp_path / "split")
    assert losses(tmp_path / "split") == losses(tmp_path / "full")


def test_resuming_an_earlier_checkpoint_discards_the_later_ones_only_when_told(make_trainer, tmp_path):
    """Checkpoints after the starting step belong to the run being replaced: left in place they stayed the
    run's latest, and keep_last pruned the new run's checkpoints before them."""
    make_trainer(tmp_path, steps=6, save_every=2, keep_last=0).fit()
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-00000002", "step-00000004", "step-00000006"]
    earlier = tmp_path / "checkpoints" / "step-00000002"
    with pytest.raises(ValueError, match=r"after step 2 \(step-00000004, step-00000006\) of the run this one"):
        make_trainer(tmp_path, steps=5, save_every=2, keep_last=2).fit(resume_from=earlier)
    with pytest.raises(ValueError, match=r"holds checkpoints \(step-00000002, step-00000004, step-00000006\) of"):
        make_trainer(tmp_path, steps=5).fit()  # a new run over an old one
    assert [p.name for p in list_checkpoints(tmp_path)] == names  # nothing lost by the refusals
    summary = make_trainer(tmp_path, steps=5, save_every=2, keep_last=2).fit(resume_from=earlier, discard_later=True)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]
    assert summary.checkpoint == latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-00000005"
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4, 5]


def test_a_kill_while_later_checkpoints_are_discarded_leaves_no_part_of_one_as_a_checkpoint(make_trainer, tmp_path,
                                                                                          kill_mid_delete, monkeypatch):
    """Discarded checkpoints are deleted under another name: a kill mid-delete leaves no partial checkpoint (with its
    manifest, it would be listed: a corrupt one among the run's) — those not reached stay whole."""
    make_trainer(tmp_path, steps=6, save_every=2, keep_last=0).fit()
    kill_mid_delete(ckpt.WEIGHTS_NAME)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path, steps=5).fit(resume_from=tmp_path / "checkpoints" / "step-00000002", discard_later=True)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000006"]
    assert load_checkpoint(tmp_path).step == 6  # whole


def test_a_new_run_discards_every_checkpoint_of_the_old_one_step_0_included(make_trainer, tiny_config, tmp_path):
    make_trainer(tmp_path, config=tiny_config(d_model=48), keep_last=0).save()  # a run stopped before step 1
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000000"]
    make_trainer(tmp_path, steps=4, save_every=2, keep_last=0).fit(discard_later=True)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000004"]


def test_a_save_before_the_first_step_leaves_the_optimizer_as_it_was(make_trainer, tmp_path):
    """Saving at step 0 must not leave the live optimizer with the state of torch's step on zero gradients (AdamW
    would then train one step ahead): training on in the same process equals training without that save."""
    saved = make_trainer(tmp_path / "saved", steps=3)
    saved.save()
    assert saved.optimizer.state == {}
    saved.fit(discard_later=True)
    make_trainer(tmp_path / "plain", steps=3).fit()
    assert losses(tmp_path / "saved") == losses(tmp_path / "plain")


def test_a_resumed_run_trains_with_its_own_optimizer_settings(make_trainer, tmp_path):
    """The checkpoint gives the optimizer's state (moments, step counts); weight decay, betas and eps are the
    resumed run's options, as their changes are reported (loading a state alone would put back the old ones)."""
    make_trainer(tmp_path, steps=2, weight_decay=0.1).fit()
    resumed = make_trainer(tmp_path, steps=4, weight_decay=0.0, beta2=0.99)
    resumed.fit(resume_from=tmp_path)
    assert [(g["weight_decay"], g["betas"]) for g in resumed.optimizer.param_groups] == [(0.0, (0.9, 0.99))] * 2
    assert all(s["step"] == 4 for s in resumed.optimizer.state.values())  # the moments continued


def test_a_config_change_that_keeps_the_weights_resumes_only_when_allowed(make_trainer, tiny_config, tmp_path):
    make_trainer(tmp_path, steps=2).fit()
    changed = tiny_config(router_aux_loss_coef=0.05)
    with pytest.raises(CheckpointError, match=r"model config differs .*router_aux_loss_coef: 0.01 != 0.05"):
        make_trainer(tmp_path, config=changed, steps=4).fit(resume_from=tmp_path)
    trainer = make_trainer(tmp_path, config=changed, steps=4)
    assert trainer.fit(resume_from=tmp_path, config_changes=True).steps == 4
    with pytest.raises(CheckpointError, match="weights do not match the model"):
        make_trainer(tmp_path, config=tiny_config(d_model=48), steps=6).fit(resume_from=tmp_path, config_changes=True)


def test_resuming_at_or_past_the_steps_asked_is_refused(make_trainer, tmp_path):
    make_trainer(tmp_path, steps=4).fit()
    with pytest.raises(ValueError, match=r"steps=4: the run resumed from .*step-00000004 is at step 4 already"):
        make_trainer(tmp_path, steps=4).fit(resume_from=tmp_path)


class Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs, but the `finally` blocks (which write nothing a resume reads)."""


@pytest.mark.parametrize("killed_in", ["evaluate", "save"])
def test_a_run_killed_before_its_final_validation_is_saved_resumes_to_it(make_trainer, tmp_path, monkeypatch,
                                                                          killed_in):
    """Step 6 is a checkpoint step but not a validation step: a run killed after the loop's checkpoint of step 6,
    in the final validation or in the checkpoint that records it, is resumed at step 6 to validate and save (it
    was refused as being at step 6 already), its validation logged once, as in an uninterrupted run."""
    make_trainer(tmp_path / "plain", steps=6, eval_every=4, save_every=3).fit()
    original = getattr(Trainer, killed_in)

    def killed(self: Trainer, *args: Any) -> Any:
        if self.step == 6 and self.saved_step == 6 and not getattr(self, "_resumed", False):
            raise Killed
        return original(self, *args)

    monkeypatch.setattr(Trainer, killed_in, killed)
    run = tmp_path / "run"
    with pytest.raises(Killed):
        make_trainer(run, steps=6, eval_every=4, save_every=3).fit()
    assert load_checkpoint(run).trainer_state["last_val"]["step"] == 4
    resumed = make_trainer(run, steps=6, eval_every=4, save_every=3)
    resumed._resumed = True
    summary = resumed.fit(resume_from=run)
    assert summary.val_step == 6 and summary.new_steps == 0
    got, want = load_checkpoint(run), load_checkpoint(tmp_path / "plain")
    assert got.trainer_state["last_val"] == want.trainer_state["last_val"]
    assert got.optimizer_state["param_groups"] == want.optimizer_state["param_groups"]  # lr: the schedule's, too
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r] == [0, 4, 6]
    assert losses(run, "val_loss") == losses(tmp_path / "plain", "val_loss")


def test_the_final_checkpoint_records_the_final_validation(make_trainer, tmp_path):
    """Step 6 is a checkpoint step but not a validation step: the validation after the loop is in its state."""
    summary = make_trainer(tmp_path, steps=6, eval_every=4, save_every=3).fit()
    assert summary.val_step == 6
    assert load_checkpoint(tmp_path).trainer_state["last_val"] == {
        "step": 6, "val_loss": summary.val_loss, "val_ppl": summary.val_ppl, "val_bpb": summary.val_bpb}


def test_validation_runs_in_micro_batches_with_the_same_result(make_trainer, tmp_path):
    whole = make_trainer(tmp_path / "whole")
    parts = make_trainer(tmp_path / "parts", micro_batch_size=1)
    rows: list[int] = []
    parts.model.norm.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[0]))
    a, b = whole.evaluate(), parts.evaluate()
    assert rows and set(rows) == {1}  # as many rows per forward as in a training micro-batch
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)


def test_a_resumed_time_budget_run_fits_its_schedule_to_the_new_deadline(make_trainer, tmp_path):
    """The schedule the checkpoint holds ended (3 steps); the second command's budget is its own (refitted after
    two timed steps, then at each validation: a slow first step after the resume does not end it early)."""
    make_trainer(tmp_path, steps=3).fit()
    second = make_trainer(tmp_path, steps=None, eval_every=4)
    start = time.monotonic()
    summary = second.fit(resume_from=tmp_path, deadline=start + 6.0)
    assert summary.steps > 3 and second.total_steps > 3  # refitted, and it trained on
    assert time.monotonic() - start > 2.0  # using the budget it was given, not stopping at the old schedule's end


def test_a_resumed_time_budget_run_continues_its_schedule_until_refitted(make_trainer, tmp_path):
    """Interrupted and resumed with a budget again, the run's first step takes the rate of the schedule its checkpoint
    holds (not the peak, as if nothing were known yet), until it is refitted to the new deadline."""
    first = make_trainer(tmp_path, steps=None, eval_every=100, save_every=100)
    interrupt_at(first, 5)
    first.fit(deadline=time.monotonic() + 60)
    total = load_checkpoint(tmp_path).trainer_state["total_steps"]
    assert total is not None and total > 6
    second = make_trainer(tmp_path, steps=None, eval_every=100, save_every=100)
    interrupt_at(second, 6)
    second.fit(resume_from=tmp_path, deadline=time.monotonic() + 60)
    lr = [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("step") == 6 and "lr" in r]
    assert lr == [lr_at(5, peak=3e-3, warmup=2, total=total, min_ratio=TrainOptions().min_lr_ratio)]


def test_a_second_interrupt_stops_at_once(make_trainer, tmp_path):
    """After the first SIGINT (which ends the run at the next step, saved), the handler in place before the run is
    back: a second Ctrl-C stops whatever the run is doing."""
    trainer = make_trainer(tmp_path)
    before = signal.getsignal(signal.SIGINT)
    seen = []
    train_step = trainer.train_step

    def wrapped() -> dict:
        record = train_step()
        if trainer.step == 1:
            seen.append(signal.getsignal(signal.SIGINT))
            os.kill(os.getpid(), signal.SIGINT)
            seen.append(signal.getsignal(signal.SIGINT))
        return record

    trainer.train_step = wrapped
    assert trainer.fit().stopped_by == "SIGINT"
    assert seen[0] is not before and seen[1] is before


def test_validation_that_scores_no_token_is_an_error_not_a_perfect_score(make_trainer, tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.eval_data = lambda: []
    with pytest.raises(ValueError, match="the validation data scored no token"):
        trainer.evaluate()

def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(make_trainer, tmp_path):
    trainer = make_trainer(tmp_path, steps=8, save_every=2)

    def poison(module, _inputs, output):  # NaN from the training forward pass of step 5 on
        return output * float("nan") if module.training and trainer.step == 4 else output

    trainer.model.norm.register_forward_hook(poison)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 5.*step-00000004"):
        trainer.fit()
    assert latest_checkpoint(tmp_path).name == "step-00000004"
    state = load_checkpoint(tmp_path).model_state
    assert all(torch.isfinite(t).all() for t in state.values())
    assert max(losses(tmp_path)) == 4


def test_huge_learning_rate_is_caught_before_a_step_is_applied(make_trainer, tmp_path):
    trainer = make_trainer(tmp_path, steps=6, lr=1e30, warmup_steps=0, save_every=1)
    with pytest.raises(NonFiniteLossError, match=r"at step (\d+)") as info:
        trainer.fit()
    bad = info.value.step
    assert bad >= 2 and latest_checkpoint(tmp_path).name == f"step-{bad - 1:08d}"
    assert all(math.isfinite(v) for v in losses(tmp_path).values())


def test_time_budget_stops_in_time_with_a_fitted_schedule(make_trainer, tmp_path):
    trainer = make_trainer(tmp_path, steps=None, warmup_steps=3, eval_every=10)  # refitted at each validation
    start = time.monotonic()
    summary = trainer.fit(deadline=start + 10.0)
    elapsed = time.monotonic() - start
    assert summary.stopped_by in ("time budget", "steps")  # "steps": it reached the estimated number
    assert elapsed < 10.0 + 2.0, elapsed
    assert trainer.total_steps is not None and summary.steps >= 3
    assert latest_checkpoint(tmp_path).name == f"step-{summary.steps:08d}"
    assert summary.val_loss is not None  # the final validation ran within the budget
    lrs = [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl") if "lr" in r]
    assert lrs[-1] < lrs[3]  # the cosine decays over the estimated number of steps


def test_gradient_accumulation_matches_full_batch(make_trainer, tiny_config, tmp_path):
    # The MoE load-balancing loss is a batch statistic (computed per micro-batch, as in Megatron): turn it off
    # so that both runs optimise the same function.
    config = tiny_config(router_aux_loss_coef=0.0)
    make_trainer(tmp_path / "whole", config=config, steps=3, micro_batch_size=4).fit()
    make_trainer(tmp_path / "parts", config=config, steps=3, micro_batch_size=1).fit()
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "parts")
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a)


class Mapped:
    """A loader whose batches pass through `fn` (x, y) -> (x, y)."""

    def __init__(self, loader, fn):
        self.loader, self.fn = loader, fn

    def __next__(self):
        return self.fn(*next(self.loader))

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


def test_router_losses_are_the_mean_of_micro_batches(make_trainer, tiny_config, tmp_path):
    """Every row alike: each micro-batch's router losses are the whole batch's, so one micro-batch or four
    optimise the same function (the router losses averaged over micro-batches, not summed)."""
    config = tiny_config(router_aux_loss_coef=0.5, router_z_loss_coef=0.1)
    for micro in (4, 1):
        trainer = make_trainer(tmp_path / str(micro), config=config, steps=3, micro_batch_size=micro)
        trainer.loader = Mapped(trainer.loader, lambda x, y: (x[:1].expand_as(x), y[:1].expand_as(y)))
        trainer.fit()
    a, b = losses(tmp_path / "4"), losses(tmp_path / "1")
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a)


def masked_labels(x, y):
    """Labels that score unevenly: row 0 its last 2 tokens, row 1 none (prompt masking, padding)."""
    y = y.clone()
    y[0, :-2], y[1] = IGNORE, IGNORE
    return x, y


def test_ignored_labels_weigh_the_loss_by_tokens_whatever_the_micro_batches(make_trainer, tiny_config, tmp_path):
    """The loss is the mean over the global batch's scored tokens, with one micro-batch or four (one of which
    scores nothing), as F.cross_entropy over the whole batch gives it."""
    config = tiny_config(router_aux_loss_coef=0.0)
    runs = {}
    for micro in (4, 1):
        trainer = make_trainer(tmp_path / str(micro), config=config, steps=2, micro_batch_size=micro)
        trainer.loader = Mapped(trainer.loader, masked_labels)
        if micro == 4:
            x, y = next(Mapped(make_trainer(tmp_path / "peek", config=config).loader, masked_labels))
            with torch.no_grad():
                logits = trainer.model(x).logits
            want = float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE))
        runs[micro] = [trainer.train_step() for _ in range(2)]
        runs[micro].append(trainer.model.state_dict())
    assert runs[4][0]["lm_loss"] == pytest.approx(want, rel=1e-5)
    for a, b in zip(runs[4][:2], runs[1][:2], strict=True):
        assert math.isfinite(b["loss"]) and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    # AdamW's first steps move each weight by about lr (3e-3) whatever its gradient's size: a gradient near 0
    # that rounds differently in 1 or 4 micro-batches moves its weight by up to ~1e-5 differently.
    for name, value in runs[4][2].items():
        torch.testing.assert_close(runs[1][2][name], value, rtol=1e-4, atol=1e-5)


def test_a_batch_that_scores_nothing_trains_the_router_only(make_trainer, tmp_path):
    """Every label ignored (a batch of prompts only): the step's loss is the router's, finite, and lm_loss is nan."""
    trainer = make_trainer(tmp_path)
    trainer.loader = Mapped(trainer.loader, lambda x, y: (x, torch.full_like(y, IGNORE)))
    record = trainer.train_step()
    assert math.isfinite(record["loss"]) and record["loss"] > 0 and math.isnan(record["lm_loss"])


def test_a_diverged_validation_loss_reports_a_capped_perplexity(make_trainer, tmp_path):
    """A validation loss past exp's range (709.8 nats) is reported, with its perplexity capped, not an
    OverflowError."""
    trainer = make_trainer(tmp_path)
    with torch.no_grad():
        trainer.model.norm.weight.mul_(1e5)
    out = trainer.evaluate()
    assert out["val_loss"] > 710 and out["val_ppl"] == math.exp(700.0)


def test_a_new_run_is_seeded_by_its_options_whatever_drew_before(make_trainer, tiny_config, tmp_path):
    """A new run's training noise (and everything else it draws) depends on its seed only."""
    config = tiny_config(conba_process_noise=0.1)
    runs = []
    for i in range(2):
        trainer = make_trainer(tmp_path / str(i), config=config, steps=3, save_every=100, eval_every=100)
        torch.rand(i + 1)  # something else drew from torch's generator in between
        trainer.fit()
        runs.append(losses(tmp_path / str(i)))
    assert runs[0] == runs[1]


def test_activation_checkpointing_trains_the_same(make_trainer, tmp_path):
    make_trainer(tmp_path / "plain", steps=3).fit()
    trainer = make_trainer(tmp_path / "recompute", steps=3, activation_checkpointing=True)
    assert all(layer.recompute is not None for layer in trainer.model.layers)
    trainer.fit()
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "recompute")
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-6 for k in a)
    MixConForCausalLM.from_pretrained(latest_checkpoint(tmp_path / "recompute"))  # clean parameter names


def test_metrics_and_plot_are_written(make_trainer, shards, tmp_path):
    summary = make_trainer(tmp_path, steps=4).fit()
    records = read_metrics(tmp_path / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr", "tokens", "tokens_per_s", "elapsed"):
        assert key in train[-1], key
    assert 0 <= train[0]["elapsed"] <= train[-1]["elapsed"]
    assert train[-1]["tokens"] == 4 * 4 * 32
    load = train[-1]["expert_load"]  # tiny: 4 MoE layers of 4 experts
    assert len(load) == 4 and all(len(row) == 4 and abs(sum(row) - 1) < 1e-3 for row in load)
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 4]
    # bytes tokenizer: every scored token is a byte but the few EOS predictions (their loss, no bytes)
    assert 1 <= val[-1]["val_bpb"] / (val[-1]["val_loss"] / math.log(2)) < 1.02
    assert val[-1]["val_ppl"] == pytest.approx(math.exp(val[-1]["val_loss"]))
    assert summary.plot.is_file() and summary.plot.read_bytes()[:4] == b"\x89PNG"


def test_the_last_step_is_logged_whatever_log_every_and_untimed_steps_have_no_throughput(make_trainer, tmp_path):
    """--log-every 3 over 7 steps logs steps 3, 6 and the last, 7, whose loss the summary reports; the first step
    of a run, and of a resumed run, is not timed: its record has no tokens_per_s (not a measured 0)."""
    summary = make_trainer(tmp_path, steps=7, log_every=3).fit()
    train = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in train] == [3, 6, 7]
    assert summary.train_loss == train[-1]["loss"] and all(r["tokens_per_s"] > 0 for r in train)
    make_trainer(tmp_path / "two", steps=2).fit()
    first, second = [r for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if "loss" in r]
    assert "tokens_per_s" not in first and second["tokens_per_s"] > 0
    one = make_trainer(tmp_path / "one", steps=1).fit()  # nothing timed: not a measured 0 tokens/s
    assert one.tokens_per_s is None and "throughput not timed: the first step after a start" in one.format()
    assert make_trainer(tmp_path / "one", steps=2).fit(resume_from=tmp_path / "one").tokens_per_s is None
    four = make_trainer(tmp_path / "one", steps=4).fit(resume_from=tmp_path / "one")
    assert four.tokens_per_s > 0 and (four.new_steps, four.new_tokens, four.steps) == (2, four.tokens // 2, 4)
    assert four.format().startswith(f"stopped by steps at step 4: 2 steps, {four.tokens // 2:,} tokens in ")
    assert f"(resumed at step 2; {four.tokens:,} tokens in all)\ntraining throughput " in four.format()
    assert one.format().startswith(f"stopped by steps after 1 step, {one.tokens:,} tokens in ")
    resumed = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [("tokens_per_s" in r) for r in resumed] == [False, False, False, True]  # each fit's first: untimed


def test_a_resume_with_more_steps_recomputes_the_schedule_over_the_new_total(make_trainer, tmp_path):
    """As --steps' help says: steps 5-8 follow the cosine over 8 steps, so the learning rate rises again after the
    4-step run ended at its minimum."""
    make_trainer(tmp_path, steps=4).fit()
    make_trainer(tmp_path, steps=8).fit(resume_from=latest_checkpoint(tmp_path))
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl") if "lr" in r}
    assert lrs[4] == pytest.approx(3e-3 * 0.1)  # the first run's end: min_lr_ratio x peak
    assert [lrs[s] for s in range(5, 9)] == [lr_at(s - 1, peak=3e-3, warmup=2, total=8, min_ratio=0.1)
                                            for s in range(5, 9)]
    assert lrs[5] > lrs[4]


def test_a_run_resumed_from_another_directory_replaces_every_checkpoint_there(make_trainer, tmp_path):
    """Resuming another run directory's checkpoint into a run directory holding a run (even at earlier steps):
    refused unless discard_later; then that run's checkpoints and metrics are gone, not mixed with the new ones."""
    make_trainer(tmp_path / "a", steps=2, save_every=1).fit()
    make_trainer(tmp_path / "b", steps=4).fit()
    with pytest.raises(ValueError, match=r"a holds checkpoints \(step-00000001, step-00000002\) of the run"):
        make_trainer(tmp_path / "a", steps=6).fit(resume_from=tmp_path / "b")
    make_trainer(tmp_path / "a", steps=6).fit(resume_from=tmp_path / "b", discard_later=True)
    assert [p.name for p in list_checkpoints(tmp_path / "a")] == ["step-00000006"]
    assert sorted({r["step"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl")}) == [5, 6]


def test_a_run_whose_checkpoints_folder_is_a_link_resumes_as_its_own(make_trainer, tmp_path):
    """checkpoints/ moved to another disk and linked back: a resume is the run's own (it was taken for another
    run directory's, which refused it, or with discard_later deleted the run's checkpoints and metrics)."""
    run = tmp_path / "run"
    make_trainer(run, steps=2, save_every=1).fit()
    (run / "checkpoints").rename(tmp_path / "elsewhere")
    (run / "checkpoints").symlink_to(tmp_path / "elsewhere")
    make_trainer(run, steps=3, save_every=1).fit(resume_from=run)
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002", "step-00000003"]  # keep_last 2
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3]


def test_validation_equals_cross_entropy_over_whole_logits(make_trainer, shards, tmp_path):
    """evaluate() (the fused head) == token-weighted F.cross_entropy over whole logits, ignored labels and an
    all-ignored batch included."""
    trainer = make_trainer(tmp_path)
    batches = list(trainer.eval_data())
    x, y = batches[0]
    y = y.clone()
    y[0, :5], y[1], y[0, 9] = IGNORE, IGNORE, ByteTokenizer.eos_id  # a document's end: loss but no bytes
    batches = [(x, y), batches[1], (x, torch.full_like(y, IGNORE))]
    trainer.eval_data = lambda: iter(batches)
    total, n, nbytes = 0.0, 0, 0
    with torch.no_grad(), trainer.model.evaluating():
        for x, y in batches:
            logits = trainer.model(x).logits.double()
            total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum"))
            n += int((y != IGNORE).sum())
            nbytes += int(((y != IGNORE) & (y < 256)).sum())  # the scored bytes: EOS stands for no text
    out = trainer.evaluate()
    assert out["val_loss"] == pytest.approx(total / n, rel=1e-6)
    assert nbytes < n and out["val_bpb"] == pytest.approx(total / math.log(2) / nbytes, rel=1e-6)
    assert trainer.model.training  # back in training mode


def test_document_mask_scores_each_document_alone(make_trainer, tiny_config, tmp_path):
    """With document_mask, training and validation losses are those of each document (from its EOS on) run
    alone; without it, documents see each other."""
    config = tiny_config(router_aux_loss_coef=0.0)
    trainer = make_trainer(tmp_path, config=config, document_mask=True)
    eos = config.eos_token_id
    x, y = next(trainer.loader)
    x, y = x.clone(), y.clone()
    x[:, [5, 6, 20]] = eos  # documents [0, 5), [5, 6) (EOS alone), [6, 20), [20, 32)
    y[:3, :4] = IGNORE
    total, n = 0.0, 0
    with torch.no_grad():
        for a, b in ((0, 5), (5, 6), (6, 20), (20, 32)):
            logits = trainer.model(x[:, a:b]).logits.double()
            total += float(F.cross_entropy(logits.flatten(0, 1), y[:, a:b].flatten(), ignore_index=IGNORE,
                                           reduction="sum"))
            n += int((y[:, a:b] != IGNORE).sum())
    trainer.eval_data = lambda: iter([(x, y)])
    assert trainer.evaluate()["val_loss"] == pytest.approx(total / n, rel=1e-6)
    trainer.loader = iter([(x, y)])
    assert trainer.train_step()["lm_loss"] == pytest.approx(total / n, rel=1e-6)

    plain = make_trainer(tmp_path / "plain", config=config)
    plain.eval_data = lambda: iter([(x, y)])
    assert plain.evaluate()["val_loss"] != pytest.approx(total / n, rel=1e-5)  # untrained: near-uniform either way


def test_document_mask_needs_an_eos_id(make_trainer, tmp_path):
    with pytest.raises(ValueError, match="document_mask needs the model config's eos_token_id"):
        make_trainer(tmp_path, config=MixConConfig.preset("tiny", vocab_size=259), document_mask=True)



@pytest.mark.parametrize("field,value", [
    ("grad_clip", -1.0),  # would flip every gradient's sign
    ("micro_batch_size", -1), ("micro_batch_size", 0), ("warmup_steps", -5), ("keep_last", -1),
    ("lr", -1.0), ("lr", float("nan")), ("weight_decay", -0.1), ("min_lr_ratio", 1.5), ("beta2", 1.0),
    ("steps", 0), ("time_budget", 0.0), ("batch_size", 2.5), ("seq_len", True), ("val_fraction", 1.0),
    ("max_bytes", 0), ("precision", "fp16"), ("parallel", "tp"), ("eval_batches", 0), ("beta1", 1.0),
    ("beta1", -0.1),
])
def test_options_out_of_range_are_refused_naming_the_field(field, value):
    TrainOptions().check()  # the defaults pass
    with pytest.raises(ValueError, match=rf"TrainOptions\.{field}={value!r} must be"):
        TrainOptions(**{field: value}).check()


@pytest.mark.parametrize("field,value", [
    ("min_lr_ratio", 1.0),  # a constant rate after the warmup
    ("min_lr_ratio", 0.0), ("beta1", 0.0), ("beta2", 0.0), ("val_fraction", 0.0), ("lr", 0.0), ("weight_decay", 0.0),
    ("warmup_steps", 0), ("keep_last", 0), ("steps", 1), ("micro_batch_size", 1), ("max_bytes", None),
])
def test_options_at_the_ends_of_their_ranges_are_accepted(field, value):
    TrainOptions(**{field: value}).check()


def test_options_read_from_a_checkpoint_leave_out_fields_this_version_lacks():
    """A checkpoint written by a version with an option since removed still resumes."""
    saved = {**dataclasses.asdict(TrainOptions(steps=7, lr=1e-3)), "an_option_since_removed": 1}
    assert TrainOptions.from_dict(saved) == TrainOptions(steps=7, lr=1e-3)


@pytest.mark.parametrize("options,world,message", [
    (dict(batch_size=6), 4, r"batch_size=6 must be divisible by the world size 4"),
    (dict(batch_size=6, micro_batch_size=2), 2, r"micro_batch_size=2 must be a divisor of the per-process batch "
                                                r"\(batch_size / world size = 3\)"),
])
def test_a_batch_the_processes_cannot_share_is_refused(options, world, message):
    TrainOptions(**options).check()  # one process can take it
    with pytest.raises(ValueError, match=message):
        TrainOptions(**options).check(world)


@pytest.mark.slow
def test_hundred_steps_on_tinyshakespeare_lower_validation_loss(make_trainer, byte_shards, shakespeare_corpus,
                                                                tmp_path):
    ds = byte_shards(shakespeare_corpus, tmp_path / "data")
    trainer = make_trainer(tmp_path / "run", ds=ds, steps=100, batch_size=8, seq_len=64, warmup_steps=10,
                           eval_every=50, eval_batches=8, save_every=100)
    summary = trainer.fit()
    val = losses(tmp_path / "run", "val_loss")
    assert sorted(val) == [0, 50, 100]
    assert val[0] > 5.0  # about ln(259): untrained
    assert val[100] < val[0] - 2.0, val  # clearly learned (letter and word statistics)
    assert 1 <= summary.val_bpb / (val[100] / math.log(2)) < 1.02  # EOS predictions: loss without bytes


def test_a_process_group_of_another_size_than_env_is_refused(make_trainer, tmp_path):
    """Built without `env=` under torchrun, every process would train the whole batch (and log sums as means)."""
    import torch.distributed as dist

    from mixcon.training.distributed import DistEnv

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        trainer = make_trainer(tmp_path / "run")  # one process, and env says one: fine
        with pytest.raises(ValueError, match=r"Trainer: a process group of 1 processes is initialised, but env has "
                                             r"world_size=2; pass env=init_distributed\(\)"):
            Trainer(trainer.model, trainer.options, tmp_path / "run2", loader=trainer.loader,
                    env=DistEnv(rank=0, world_size=2))
    finally:
        dist.destroy_process_group()


def test_grad_clip_0_clips_nothing_and_every_group_steps_at_the_scheduled_rate(make_trainer, tmp_path):
    runs = {}
    for clip in (0.0, 1e9, 1e-3):
        trainer = make_trainer(tmp_path / str(clip), grad_clip=clip)
        records = []
        for _ in range(3):  # warmup, then the cosine: the no-decay group (norms, A_log, dt_bias, D) too
            records.append(trainer.train_step())
            assert [group["lr"] for group in trainer.optimizer.param_groups] == [records[-1]["lr"]] * 2
        runs[clip] = [r["loss"] for r in records], [p.detach().clone() for p in trainer.model.parameters()]
    assert runs[0.0][0] == runs[1e9][0] != runs[1e-3][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0.0][1], runs[1e9][1], strict=True))


def test_a_loader_of_another_batch_size_is_refused_by_the_step(make_trainer, shards, tmp_path):
    from mixcon.data import TrainLoader

    trainer = make_trainer(tmp_path / "run")  # batch_size 4
    trainer.loader = TrainLoader(shards, 32, 2)
    with pytest.raises(ValueError, match=r"the loader gave a batch of 2 sequences, expected batch_size=4"):
        trainer.train_step()


def test_validation_without_token_bytes_has_no_bits_per_byte(make_trainer, tmp_path):
    trainer = make_trainer(tmp_path / "run")
    with_bytes = trainer.evaluate()
    batches = list(trainer.eval_data())
    ignored = [(x, torch.full_like(y, IGNORE)) for x, y in batches[:1]]
    trainer.eval_data = lambda: iter(ignored + batches)  # a batch that scores nothing adds nothing
    assert trainer.evaluate() == with_bytes
    trainer.token_bytes = None
    without = trainer.evaluate()
    assert set(without) == {"val_loss", "val_ppl"} and without["val_loss"] == with_bytes["val_loss"]
    assert without["val_ppl"] == pytest.approx(math.exp(without["val_loss"]))


def test_a_resume_at_another_world_size_seeds_each_process_by_the_step(make_trainer, tmp_path):
    """The saved RNG states are one per process of the old run: a new world size starts streams of its own, from
    (seed, step, rank), which a resume at another step does not repeat."""
    from mixcon.training.distributed import DistEnv
    from mixcon.training.trainer import _process_seed

    make_trainer(tmp_path / "run", steps=2, save_every=2, eval_every=100).fit()
    trainer = make_trainer(tmp_path / "run", steps=4, seed=3)
    trainer.env = DistEnv(rank=1, world_size=2)
    trainer.resume(tmp_path / "run")
    resumed = torch.get_rng_state()
    torch.manual_seed(_process_seed(3 + 7919 * 2, 1))
    assert torch.equal(resumed, torch.get_rng_state())


def test_the_timer_leaves_out_the_first_step_and_what_it_excludes(monkeypatch):
    from mixcon.training import trainer as trainer_module

    clock = [100.0]
    monkeypatch.setattr(trainer_module.time, "monotonic", lambda: clock[0])
    timer = trainer_module._Timer(save_seconds=4.0)

    def after(seconds: float) -> None:
        clock[0] += seconds

    after(9.0)  # the first step: compiling, allocating
    timer.tick(100)
    assert timer.tokens_per_s is None and timer.seconds_per_step == 0.0
    after(2.0)
    timer.tick(100)
    assert timer.exclude(lambda: after(5.0)) == 5.0  # validation
    after(3.0)
    timer.tick(100)
    assert (timer.steps_timed, timer.seconds_per_step, timer.tokens_per_s) == (2, 2.5, 40.0)
    for _ in range(20):  # the step time is that of the latest steps: a machine that got faster is seen as fast
        after(1.0)
        timer.tick(100)
    assert timer.seconds_per_step == 1.0


def test_the_schedule_fills_the_time_left_after_validation_and_the_last_checkpoint(make_trainer, tmp_path, monkeypatch):
    from mixcon.training import trainer as trainer_module

    clock = [1000.0]
    monkeypatch.setattr(trainer_module.time, "monotonic", lambda: clock[0])
    trainer = make_trainer(tmp_path / "run", steps=None, eval_every=10)
    timer = trainer_module._Timer(save_seconds=2.0)
    timer.recent.extend([0.5, 1.5])  # 1 s per step
    timer.eval_seconds = 4.0  # per validation: 0.4 s per step
    trainer.step = 7
    # 100 s left, less 4 + 2 + 1 kept for the final validation and checkpoint: 0.97 x 93 s / 1.4 s per step
    assert trainer._budget_steps(1100.0, timer) == 7 + int(0.97 * 93 / 1.4)
    trainer.total_steps = 50  # fitted already: fitted again after each validation
    assert (trainer._refit_schedule(1100.0, timer, True), trainer._refit_schedule(1100.0, timer, False)) == (True,
                                                                                                              False)



@pytest.mark.parametrize(("warmup", "needed"), [(50, 20), (5, 5), (0, 2)])
def test_a_new_budget_run_fits_its_schedule_once_its_warmup_or_20_steps_are_timed(make_trainer, tmp_path, warmup,
                                                                                   needed):
    """The first fit waits for min(warmup, 20) timed steps (at least 2): within warmup the learning rate does not
    depend on the schedule's length, and 20 steps time the machine well enough; a resumed run refits after 2."""
    from mixcon.training import trainer as trainer_module

    trainer = make_trainer(tmp_path / "run", steps=None, warmup_steps=warmup)
    timer = trainer_module._Timer(save_seconds=1.0)
    fits = []
    for timed in range(1, 25):
        timer.steps_timed = timed
        fits.append(trainer._refit_schedule(1e9, timer, False))
    assert fits.index(True) + 1 == needed and all(fits[needed - 1:])
    trainer.total_steps, trainer._refit_pending = 100, True  # a resumed run, its old schedule pending
    timer.steps_timed = 1
    assert not trainer._refit_schedule(1e9, timer, False)
    timer.steps_timed = 2
    assert trainer._refit_schedule(1e9, timer, False) and not trainer._refit_pending
    assert not trainer._refit_schedule(1e9, timer, False)  # then only at validations


def as_rank_1_of_2(trainer: Trainer) -> Trainer:
    """`trainer` as the second of two processes runs it, without a process group (its collectives are no-ops)."""
    from mixcon.training.distributed import DistEnv

    trainer.env = DistEnv(rank=1, world_size=2)
    trainer.local_batch = trainer.options.batch_size // 2
    trainer.micro = trainer.options.micro_batch_size or trainer.local_batch
    return trainer


def test_rank_1_of_a_run_seeded_at_the_top_of_the_seed_range_trains(make_trainer, tmp_path):
    """--seed takes up to 2**64 - 1: a process's seed, the run's plus its rank, wraps round within torch's range."""
    trainer = as_rank_1_of_2(make_trainer(tmp_path, steps=1, seed=2**64 - 1, eval_every=100))
    assert trainer.fit().steps == 1


def test_steps_none_without_a_deadline_is_refused(make_trainer, tmp_path):
    trainer = make_trainer(tmp_path, steps=None)
    trainer.train_step = lambda: pytest.fail("trains with no end")  # (it would never stop)
    with pytest.raises(ValueError, match=r"TrainOptions\.steps is None: give a deadline"):
        trainer.fit()
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before anything was written


def test_a_non_finite_gradient_norm_stops_before_the_step_is_applied(make_trainer, tmp_path):
    """A finite loss whose gradients overflow: the norm is caught and the weights are left as they were."""
    trainer = make_trainer(tmp_path, steps=4)
    trainer.model.norm.weight.register_hook(lambda grad: grad * math.inf)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient norm \(inf\) at step 1; .*no checkpoint was "
                                                 r"saved yet"):
        trainer.train_step()
    assert trainer.step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


def test_a_run_without_validation_data_trains_and_reports_no_validation(make_trainer, tmp_path):
    trainer = make_trainer(tmp_path, steps=2)
    trainer.eval_data = None
    assert trainer.evaluate() == {}
    summary = trainer.fit()
    assert summary.steps == 2 and (summary.val_step, summary.val_loss, summary.val_bpb) == (None, None, None)
    assert not [r for r in read_metrics(tmp_path / "metrics.jsonl") if "val_loss" in r]
    assert load_checkpoint(tmp_path).trainer_state["last_val"] == {}


def test_bf16_precision_runs_the_forward_in_bfloat16_on_the_cpu(make_trainer, tmp_path):
    dtypes: dict[str, set[torch.dtype]] = {}
    for precision in ("fp32", "bf16"):
        trainer = make_trainer(tmp_path / precision, precision=precision)
        seen = dtypes[precision] = set()
        for module in trainer.model.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(lambda _m, _args, out, seen=seen: seen.add(out.dtype))
        assert math.isfinite(trainer.train_step()["loss"])
    assert dtypes == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}}


def test_validation_is_reported_on_the_progress_bar(make_trainer, tmp_path, capsys):
    trainer = make_trainer(tmp_path, steps=1)
    trainer.progress = True
    summary = trainer.fit()
    out = capsys.readouterr().out
    assert "step 0: validation loss " in out
    assert (f"step 1: validation loss {summary.val_loss:.4f}, perplexity {summary.val_ppl:.2f}, "
            f"{summary.val_bpb:.4f} bits/byte") in out


def test_a_run_in_another_thread_than_the_main_one_trains_without_signal_handlers(make_trainer, tmp_path):
    """signal.signal works in the main thread only: a run in another (a notebook's, a server's) goes on without."""
    import threading

    trainer = make_trainer(tmp_path, steps=2)
    before = signal.getsignal(signal.SIGINT)
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["summary"] = trainer.fit()
        except BaseException as e:  # reported below: an exception in a thread is lost
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert "error" not in result, result.get("error")
    assert result["summary"].steps == 2 and signal.getsignal(signal.SIGINT) is before


def test_a_process_other_than_rank_0_writes_nothing(make_trainer, tmp_path):
    """Rank 0 writes checkpoints and metrics and deletes the checkpoints a new run replaces; another rank trains,
    names the checkpoint rank 0 writes, and leaves the run directory alone."""
    make_trainer(tmp_path, steps=1).fit()
    old = list_checkpoints(tmp_path)
    (tmp_path / "metrics.jsonl").unlink()
    trainer = as_rank_1_of_2(make_trainer(tmp_path, steps=2, save_every=1))
    summary = trainer.fit(discard_later=True)
    assert summary.steps == 2 and summary.checkpoint == tmp_path / "checkpoints" / "step-00000002"
    assert (summary.metrics, summary.plot, summary.train_loss) == (None, None, None)
    assert list_checkpoints(tmp_path) == old and not (tmp_path / "metrics.jsonl").exists()
    assert summary.val_step == 2  # it validated (its share) all the same


def test_a_process_with_fewer_validation_rows_than_pieces_runs_as_many_forwards(make_trainer, tmp_path):
    """Of a last validation batch of 3 rows in micro-batches of 1, rank 0 of 2 takes 2 rows, rank 1 one: rank 1
    runs 2 forwards too (a sharded model needs every process in each), the second on one fully ignored row, which
    adds nothing to its loss."""
    x, y = next(iter(make_trainer(tmp_path / "data").eval_data()))
    solo = make_trainer(tmp_path / "solo", micro_batch_size=1)
    solo.eval_data = lambda: [(x[2:3], y[2:3])]
    trainer = as_rank_1_of_2(make_trainer(tmp_path / "rank1", micro_batch_size=1))
    trainer.eval_data = lambda: [(x[:3], y[:3])]
    rows: list[int] = []
    trainer.model.norm.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[0]))
    result = trainer.evaluate()
    assert rows == [1, 1]
    assert result == pytest.approx(solo.evaluate())


def on_a_clock(monkeypatch: pytest.MonkeyPatch, clock: list[float], trainer: Trainer, **seconds: float) -> Trainer:
    """`trainer` reading time.monotonic from `clock`, which only its methods named in `seconds` advance (by that
    many seconds a call)."""
    from mixcon.training import trainer as trainer_module

    monkeypatch.setattr(trainer_module.time, "monotonic", lambda: clock[0])

    def taking(seconds: float, fn: Callable[[], Any]) -> Callable[[], Any]:
        def timed() -> Any:
            clock[0] += seconds
            return fn()
        return timed

    for name, duration in seconds.items():
        setattr(trainer, name, taking(duration, getattr(trainer, name)))
    return trainer


def test_a_time_budget_run_ends_by_its_deadline_as_its_timed_steps_validations_and_checkpoints_say(
        make_trainer, tmp_path, monkeypatch):
    """On a clock that only steps (2 s), validations (3 s) and checkpoints (4 s) advance, a run stops in time for
    what it has timed in its loop: its next step, the final validation and checkpoint, and the step's own
    checkpoint before them (a checkpoint step that is no validation step is saved again with the final
    validation). Resumed from a checkpoint without validation, it has none at its start to time."""
    clock = [0.0]
    make_trainer(tmp_path).save()
    trainer = on_a_clock(monkeypatch, clock, make_trainer(tmp_path, steps=1000, eval_every=4, eval_batches=1,
                                                          save_every=5, keep_last=1),
                         train_step=2.0, evaluate=3.0, save=4.0)
    summary = trainer.fit(resume_from=tmp_path, deadline=40.0)
    assert summary.stopped_by == "time budget" and 40.0 - (2.0 + 3.0 + 2 * 4.0 + 1.0) < clock[0] <= 40.0


def test_a_resumed_time_budget_run_keeps_time_for_the_final_validation_before_its_first(make_trainer, tmp_path,
                                                                                       monkeypatch):
    """The checkpoint holds how long a validation took: a resumed run that validates only at its end keeps time
    for it (it reserved nothing, and passed the deadline by the validation's duration less a second)."""
    clock = [0.0]
    on_a_clock(monkeypatch, clock, make_trainer(tmp_path, steps=2, eval_batches=1), evaluate=10.0).fit()
    clock[0] = 0.0
    trainer = on_a_clock(monkeypatch, clock, make_trainer(tmp_path, steps=1000, eval_every=100, eval_batches=1,
                                                          save_every=100),
                         train_step=1.0, evaluate=10.0, save=0.5)
    summary = trainer.fit(resume_from=tmp_path, deadline=20.0)
    assert summary.stopped_by == "time budget" and clock[0] <= 20.0
