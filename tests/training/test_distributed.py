"""`torchrun --nproc_per_node 2 -m mixcon train` on CPU (gloo): DDP and FSDP2 agree with one process at the same
global batch, only rank 0 writes, and a checkpoint written by two processes continues in one."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from mixcon.cli import main
from mixcon.training.checkpoint import list_checkpoints
from mixcon.training.metrics import read_metrics

TOLERANCE = 1e-5


def train_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    # The MoE load-balancing loss is a statistic of each process's batch (as in Megatron and torchtitan), so it
    # differs between 1 and 2 processes; without it both optimise exactly the same function. The largest seed
    # --seed takes: each process's seed (the run's plus its rank, plus steps on a resume at another world size)
    # must stay within what torch.manual_seed takes.
    return ["train", "--config", "tiny", "--set", "router_aux_loss_coef=0", "--tokenizer", "bytes",
            "--seed", str(2**64 - 1), "--corpus", str(corpus), "--val-fraction", "0.1", "--steps", "6",
            "--batch-size", "4", "--seq-len", "32",
            "--warmup-steps", "2", "--eval-every", "3", "--eval-batches", "2", "--save-every", "3",
            "--sample-tokens", "0", "--no-progress", "--device", "cpu", "--out", str(out), *extra]


def metric(run: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run / "metrics.jsonl") if key in r}


def assert_close(a: dict[int, float], b: dict[int, float]) -> None:
    assert a.keys() == b.keys()
    worst = max(abs(a[k] - b[k]) for k in a)
    assert worst <= TOLERANCE, (worst, a, b)


@pytest.fixture(scope="module")
def single(text_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, 4 micro-batches of 1 sequence per step: those of the two processes, whose router statistics
    (aux_loss, a mean over micro-batches) are then the same."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(train_args(text_corpus, out, "--micro-batch-size", "1")) == 0
    return out


@pytest.fixture(scope="module")
def two_processes(text_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The DDP or FSDP2 run of 2 processes, 2 micro-batches of 1 sequence per process per step (each run once)."""
    runs: dict[str, Path] = {}

    def run(parallel: str) -> Path:
        if parallel not in runs:
            out = tmp_path_factory.mktemp(parallel) / "run"
            mode, _, recompute = parallel.partition("+")  # "fsdp+recompute": with activation checkpointing
            extra = ["--activation-checkpointing"] if recompute else []
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                   "mixcon", *train_args(text_corpus, out, "--micro-batch-size", "1", "--parallel", mode, *extra)]
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            assert result.stdout.count("stopped by steps after 6 steps") == 1  # only rank 0 reports
            runs[parallel] = out
        return runs[parallel]

    return run


@pytest.mark.parametrize("parallel", ["ddp", "fsdp", "fsdp+recompute"])
def test_two_processes_match_one_process(single, two_processes, parallel):
    run = two_processes(parallel)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert_close(metric(run, "loss"), metric(single, "loss"))
    assert_close(metric(run, "val_loss"), metric(single, "val_loss"))
    assert_close(metric(run, "aux_loss"), metric(single, "aux_loss"))  # averaged over the processes, not summed
    assert metric(run, "tokens")[6] == metric(single, "tokens")[6] == 6 * 4 * 32
    assert [p.name for p in list_checkpoints(run)] == ["step-00000003", "step-00000006"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_checkpoint_of_two_processes_continues_in_one(single, two_processes, parallel, text_corpus, tmp_path):
    start = list_checkpoints(two_processes(parallel))[0]  # step 3
    out = tmp_path / "continued"
    assert main(train_args(text_corpus, out, "--micro-batch-size", "2", "--resume", str(start))) == 0
    continued, reference = metric(out, "loss"), metric(single, "loss")
    assert sorted(continued) == [4, 5, 6]
    assert_close(continued, {k: reference[k] for k in continued})


def test_a_second_torchrun_on_a_run_in_use_is_refused_by_every_process(text_corpus, tmp_path):
    """Rank 0 finds the run locked: every process exits with the refusal (rank 1 crashed in a barrier)."""
    from mixcon.training.checkpoint import lock_run

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mixcon", *train_args(text_corpus, out)]
    with lock_run(out):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "is in use by another training process" in result.stderr
    # (torchrun's own launcher still prints its ChildFailedError traceback)
    assert "[rank 1] mixcon train:" in result.stderr and "RuntimeError" not in result.stderr, result.stderr[-3000:]


def test_all_reduce_sums_or_takes_the_largest_across_processes(tmp_path):
    """A stop signal reaching both ranks is that signal (15), not the sum of their numbers."""
    script = ("import sys, torch, torch.distributed as dist\n"
              "from mixcon.training.distributed import all_reduce\n"
              "rank = int(sys.argv[1])\n"
              "dist.init_process_group('gloo', init_method='file://' + sys.argv[2], rank=rank, world_size=2)\n"
              "values = [rank + 1.0, 15.0]\n"
              "total, largest = all_reduce(torch.tensor(values), 'sum'), all_reduce(torch.tensor(values), 'max')\n"
              "print(total.tolist(), largest.tolist())\n"
              "dist.destroy_process_group()\n")
    ranks = [subprocess.Popen([sys.executable, "-c", script, str(rank), str(tmp_path / "store")], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in (0, 1)]
    outs = [rank.communicate(timeout=120) for rank in ranks]
    assert [out for out, _ in outs] == ["[3.0, 30.0] [2.0, 15.0]\n"] * 2, outs
