"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

if TYPE_CHECKING:
    from mixcon import MixConForCausalLM

# Without a GPU, Triton kernels can only run in Triton's interpreter; it is chosen when triton is
# imported, so the switch is set here, before any test imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    """The real text in ../shared/data/tinyshakespeare.txt; skips the test when it is absent."""
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"real text not present: {path} (the shared data folder beside the checkout)")
    return path


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    """A text file of 1,960 bytes (one sentence 40 times): enough for the byte-level benchmarks' toy runs."""
    path = tmp_path / "text.txt"
    path.write_text("the king said to the queen that we shall go now\n" * 40)
    return path


@pytest.fixture(scope="session")
def have_c_compiler() -> bool:
    """Whether torch.compile's CPU backend (inductor's C++ kernels) can build here."""
    return shutil.which("cc") is not None or shutil.which("gcc") is not None


@pytest.fixture
def tiny_model() -> Callable[..., MixConForCausalLM]:
    """Builds the `tiny` preset (any field overridden) in eval mode, seeded, with the delay gain made to count
    (it starts at 0)."""

    from mixcon import MixConConfig, MixConForCausalLM  # after TRITON_INTERPRET is set

    def build(dtype: torch.dtype = torch.float64, seed: int = 0, **overrides: Any) -> MixConForCausalLM:
        torch.manual_seed(seed)
        model = MixConForCausalLM(MixConConfig.preset("tiny", **overrides)).to(dtype).eval()
        with torch.no_grad():
            for layer in model.layers:
                if getattr(layer.mixer, "delay_gain", None) is not None:
                    layer.mixer.delay_gain.uniform_(-1, 1)
        return model

    return build


LOCAL_TASKS = {
    "mixcon_choice.yaml": """\
task: mixcon_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""",
    "mixcon_text.yaml": """\
task: mixcon_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""",
}
LOCAL_DOCS = [
    {"question": "2 + 2 =", "choices": [" 4", " 5", " 22"], "answer": 0, "text": "Two and two make four.\n"},
    {"question": "The sky is", "choices": [" blue", " loud"], "answer": 0, "text": "The sky is blue today."},
    {"question": "Cats say", "choices": [" woof", " meow"], "answer": 1, "text": "Cats say meow; dogs woof."},
]


@pytest.fixture
def graph_stand_in() -> type:
    """A stand-in for `DecodeGraphs` on the CPU, a graph being its function: a replay recomputes the step from
    the graph's own inputs, which `DecodeGraphs` must have filled with the call's (as a CUDA replay reads them),
    into one output buffer for all graphs (as replays of graphs sharing a memory pool overwrite their outputs).
    `graph_stand_in.install(model)`: `model.capture_decode()` with it."""
    from mixcon.generation.cuda_graphs import DecodeGraphs

    class StandIn(DecodeGraphs):
        device_type = "cpu"

        def __init__(self, max_graphs: int = 16) -> None:
            super().__init__(max_graphs)
            self.output: torch.Tensor | None = None

        def _warm_up(self, run: Callable[[], torch.Tensor], device: torch.device) -> torch.Tensor:
            return run()

        def _capture(self, run: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], torch.Tensor]:
            def replay() -> torch.Tensor:
                logits = run()
                if self.output is None or self.output.shape != logits.shape:
                    with torch.inference_mode(False):  # as a graph's memory, written by replays in either mode
                        self.output = torch.empty_like(logits)
                return self.output.copy_(logits)

            return replay

        @classmethod
        def install(cls, model: MixConForCausalLM, max_graphs: int = 16) -> DecodeGraphs:
            model.capture_decode(max_graphs)
            model._decode_graphs = graphs = cls(max_graphs)
            return graphs

    return StandIn


@pytest.fixture
def local_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[dict[str, Any]]]:
    """A folder of two `lm-eval` task YAMLs over three local JSON Lines documents (multiple choice: mixcon_choice;
    rolling log-likelihood: mixcon_text), the documents, and the Hugging Face hub switched off."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in LOCAL_DOCS))
    for name, text in LOCAL_TASKS.items():
        (folder / name).write_text(text.format(data=data))
    return folder, LOCAL_DOCS
