"""The metrics file survives a run killed at any moment."""

from __future__ import annotations

import json
import sys
import types

import pytest

from mixcon.training.metrics import METRICS_FILE, PLOT_FILE, MetricsLogger, read_metrics


def test_a_record_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    records = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"step": 2, "val_loss": 4.5},
               {"step": 3, "loss": 3.0}]
    lines = [json.dumps(r) + "\n" for r in records]
    (tmp_path / METRICS_FILE).write_text("".join(lines) + '{"step": 4, "lo')  # killed mid-append
    assert read_metrics(tmp_path / METRICS_FILE) == records
    logger = MetricsLogger(tmp_path, resume_step=2)  # resumed from the checkpoint of step 2
    logger.log({"step": 3, "loss": 2.5})
    assert read_metrics(tmp_path / METRICS_FILE) == [*records[:3], {"step": 3, "loss": 2.5}]
    assert (tmp_path / METRICS_FILE).read_text() == "".join(lines[:3]) + json.dumps({"step": 3, "loss": 2.5}) + "\n"


def test_a_damaged_record_before_the_end_is_an_error(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "lo\n{"step": 3, "loss": 3.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        read_metrics(tmp_path / METRICS_FILE)
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "lo\n')  # complete lines: not torn
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(tmp_path / METRICS_FILE)


def test_a_new_log_leaves_no_plot_of_the_run_it_replaces(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "loss": 5.0}\n')
    (tmp_path / PLOT_FILE).write_bytes(b"old plot")
    MetricsLogger(tmp_path, resume_step=1)  # resuming: the run's plot stays until it is redrawn
    assert (tmp_path / PLOT_FILE).is_file()
    MetricsLogger(tmp_path)
    assert not (tmp_path / PLOT_FILE).exists() and read_metrics(tmp_path / METRICS_FILE) == []


def test_a_long_run_keeps_only_the_plotted_fields_and_plots_at_a_bounded_cost(tmp_path, monkeypatch):
    """Every record goes to the file whole; memory keeps what the plot draws, and the plot draws at most
    PLOT_POINTS train points (evenly spaced, first and last included) however many steps were logged."""
    import matplotlib.axes

    from mixcon.training import metrics

    logger = MetricsLogger(tmp_path)
    for step in range(1, 5001):
        logger.log({"step": step, "loss": 1.0 / step, "lr": 1e-3, "expert_load": [[0.25] * 4] * 12})
    logger.log({"step": 5000, "val_loss": 0.5, "val_bpb": 1.25})
    assert logger.records[0] == {"step": 1, "loss": 1.0} and logger.records[-1] == {
        "step": 5000, "val_loss": 0.5, "val_bpb": 1.25}
    assert read_metrics(tmp_path / METRICS_FILE)[0]["expert_load"] == [[0.25] * 4] * 12
    drawn = []
    plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, x, *a, **k: drawn.append(list(x)) or plot(
        self, x, *a, **k))
    logger.plot()
    assert len(drawn[0]) == metrics.PLOT_POINTS and drawn[0][0] == 1 and drawn[0][-1] == 5000
    assert drawn[1] == drawn[0] and drawn[2] == [5000]  # the EMA at the same steps, then validation
    resumed = MetricsLogger(tmp_path, resume_step=10)
    assert resumed.records == [{"step": s, "loss": 1.0 / s} for s in range(1, 11)]


@pytest.mark.parametrize(("resume_step", "purge_step"), [(None, 0), (2, 3)])
def test_tensorboard_hides_what_the_resumed_run_redoes(tmp_path, monkeypatch, resume_step, purge_step):
    """Steps after the checkpoint (a crashed run's, which the resumed one logs again) or, for a new run, all
    the old events: TensorBoard's purge_step, as metrics.jsonl is cut back to the checkpoint."""
    made, scalars = [], []

    class Writer:  # torch's SummaryWriter, recording how it was opened
        def __init__(self, log_dir: str, **kwargs: object) -> None:
            made.append(kwargs)

        def add_scalar(self, *args: object) -> None:
            scalars.append(args)

        def close(self) -> None:
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    logger = MetricsLogger(tmp_path, resume_step=resume_step, tensorboard=True)
    logger.log({"step": 3, "loss": 1.5, "lr": 1e-3, "expert_load": [[0.5, 0.5]], "stopped_by": "steps"})
    logger.close()
    assert made == [{"purge_step": purge_step}]
    assert scalars == [("loss", 1.5, 3), ("lr", 1e-3, 3)]  # the numbers at their step, not the step itself


def test_the_plot_leaves_out_losses_that_are_not_finite_and_smooths_from_the_first(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = []
    plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, x, y, *a, **k: drawn.append((list(x), list(y)))
                        or plot(self, x, y, *a, **k))
    titles = []
    set_title = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda self, t, *a, **k: titles.append(t)
                        or set_title(self, t, *a, **k))
    logger = MetricsLogger(tmp_path)
    for step, loss in enumerate([2.0, float("nan"), 1.0, float("inf"), 2.0], 1):
        logger.log({"step": step, "loss": loss})
    for step, bpb in [(2, 3.25), (4, 2.5)]:
        logger.log({"step": step, "val_loss": bpb, "val_bpb": bpb})
    logger.plot()
    # the loss, its EMA (weight 0.1 on each new value, starting at the first loss), then the validation loss
    assert drawn == [([1, 3, 5], [2.0, 1.0, 2.0]), ([1, 3, 5], pytest.approx([2.0, 1.9, 1.91])), ([2, 4], [3.25, 2.5])]
    assert titles == ["final validation: 2.500 bits per byte"]


def test_values_that_are_not_finite_numbers_are_written_as_null(tmp_path):
    """Strict JSON (jq, JavaScript, pandas' strict readers): NaN and Infinity are not JSON; the plot skips them."""
    log = MetricsLogger(tmp_path)
    log.log({"step": 1, "loss": 0.5, "lm_loss": float("nan"), "grad_norm": float("inf")})
    log.log({"step": 2, "loss": float("nan"), "val_loss": 2.0, "val_bpb": float("inf"),
             "expert_load": [[float("nan"), 1.0]]})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} is not JSON")) for line in lines]
    assert records[0] == {"step": 1, "loss": 0.5, "lm_loss": None, "grad_norm": None}
    assert records[1]["loss"] is None and records[1]["expert_load"] == [[None, 1.0]]
    assert read_metrics(tmp_path / "metrics.jsonl") == records
    log.plot()
    resumed = MetricsLogger(tmp_path, resume_step=2)
    assert resumed.records == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": None, "val_loss": 2.0, "val_bpb": None}]
    resumed.plot()  # (a null bits per byte is no title)


@pytest.mark.parametrize("line", ['{"note": "lr lowered here"}', "[1, 2]", '{"step": "3", "loss": 1.0}'])
def test_a_line_that_is_not_a_metrics_record_is_an_error_naming_it(tmp_path, line):
    """A line added by hand: a ValueError naming the file and line (resuming died in a KeyError or TypeError)."""
    (tmp_path / METRICS_FILE).write_text(f'{{"step": 1, "loss": 5.0}}\n{line}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics record \(a JSON object with an integer "
                                         r"step\)"):
        MetricsLogger(tmp_path, resume_step=1)


def test_blank_lines_are_skipped_and_counted_in_the_line_numbers(tmp_path):
    """A file edited by hand (an editor's blank lines, one of spaces) reads as its records; errors name the line
    as the editor numbers it."""
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1, "loss": 5.0}\n\n   \n{"step": 2, "loss": 4.0}\n\n')
    assert read_metrics(path) == [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}]
    path.write_text('{"step": 1, "loss": 5.0}\n\n{"step": 2, "lo\n{"step": 3, "loss": 3.0}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:3: not a JSON record"):
        read_metrics(path)
