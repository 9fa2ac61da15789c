"""`mixcon.benchmarks.bytes_lm`: byte-level training and scoring shared by `filler` and `ablate`."""

from __future__ import annotations

import pytest
import torch

from mixcon.benchmarks import common
from mixcon.config import MixConConfig
from mixcon.models.mixcon import MixConForCausalLM


def test_byte_windows_hold_out_the_streams_end_and_need_twice_its_length():
    from mixcon.benchmarks import bytes_lm

    train, held = bytes_lm.split_windows(torch.arange(100), 5, 4)
    assert torch.equal(train, torch.arange(80)) and torch.equal(held, torch.arange(80, 100).view(4, 5))
    assert bytes_lm.split_windows(torch.arange(40), 5, 4)[0].numel() == 20
    with pytest.raises(common.UsageError, match="the corpus gives 39 bytes; --eval-windows 4 x --real-len 5 needs "
                                                "at least 40"):
        bytes_lm.split_windows(torch.arange(39), 5, 4)


def test_a_byte_stream_takes_max_bytes_of_the_corpus_and_an_eos(tmp_path):
    from mixcon.benchmarks import bytes_lm

    (tmp_path / "a.txt").write_text("x" * 500)
    stream = bytes_lm.byte_stream(str(tmp_path / "a.txt"), 101)
    assert stream.numel() == 102 and int(stream[-1]) == bytes_lm.TOKENIZER.eos_id


def test_training_and_scoring_start_from_the_seeds_init_and_report_bits_per_byte(monkeypatch):
    """The model starts from torch.manual_seed(seed)'s init; held-out fillers are placed from seed + 1; nats of the
    held-out bytes become bits per byte; the final loss is the mean of the last 20 steps."""
    import math

    from mixcon.benchmarks import bytes_lm

    seen = {}

    def briefly(model, batch, *, steps, lr, seed):
        seen["init"] = {k: v.clone() for k, v in model.state_dict().items()}
        return [5.0] * 10 + [2.0] * 20

    def loss(model, held_out, ratio, filler_id, *, seed):
        seen["filler_seed"] = seed
        return 3 * math.log(2)

    monkeypatch.setattr(bytes_lm.common, "train_briefly", briefly)
    monkeypatch.setattr(bytes_lm, "filler_loss", loss)
    config = MixConConfig.preset("tiny", d_model=16)
    row = bytes_lm.train_and_score(config, torch.arange(200) % 50, torch.zeros(2, 8, dtype=torch.long), ratio=0.5,
                                   steps=30, batch_size=2, lr=1e-3, seed=5, device="cpu")
    assert row["bits_per_byte"] == pytest.approx(3.0) and row["final_loss"] == 2.0 and seen["filler_seed"] == 6
    torch.manual_seed(5)
    fresh = MixConForCausalLM(config.replace(vocab_size=bytes_lm.TOKENIZER.vocab_size)).state_dict()
    assert all(torch.equal(seen["init"][k], v) for k, v in fresh.items())


def test_training_windows_are_slices_of_the_training_part_up_to_its_last_one(monkeypatch):
    """Each training row is a window of held_out's length starting anywhere in the training part, its last
    possible start included, with round(ratio x length) fillers (PAD) that are never targets."""
    from mixcon.benchmarks import bytes_lm

    drawn = []

    def briefly(model, batch, *, steps, lr, seed):
        generator = torch.Generator().manual_seed(seed)
        drawn.extend(batch(generator) for _ in range(steps))
        return [1.0]

    monkeypatch.setattr(bytes_lm.common, "train_briefly", briefly)
    monkeypatch.setattr(bytes_lm, "filler_loss", lambda *a, **kw: 1.0)
    train = torch.arange(10) + 100
    bytes_lm.train_and_score(MixConConfig.preset("tiny", d_model=16), train, torch.zeros(2, 8, dtype=torch.long),
                             ratio=0.25, steps=20, batch_size=4, lr=1e-3, seed=0, device="cpu")
    starts = set()
    for inputs, labels in drawn:
        assert inputs.shape == labels.shape == (4, 10)  # 8 real bytes and 2 fillers
        real = inputs[inputs != bytes_lm.TOKENIZER.pad_id].view(4, 8)
        assert torch.equal(real - real[:, :1], torch.arange(8).expand(4, 8))  # consecutive bytes of `train`
        assert torch.equal(labels[labels != -100].view(4, 7), real[:, 1:])
        starts.update((real[:, 0] - 100).tolist())
    assert starts == {0, 1, 2}  # 10 - 8 + 1 windows
