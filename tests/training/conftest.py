"""Training fixtures: a small text corpus as byte shards, and a factory of `tiny` trainers on it."""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mixcon import MixConConfig, MixConForCausalLM
from mixcon.data import ByteTokenizer, Corpus, ShardDataset, TrainLoader, eval_batches, prepare_shards
from mixcon.training.trainer import Trainer, TrainOptions

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"


def write_text_corpus(folder: Path, text: str, n_files: int) -> Path:
    """`text` cut at line boundaries into `n_files` documents (the split into train/val is by document)."""
    lines = text.splitlines(keepends=True)
    per = -(-len(lines) // n_files)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        (folder / f"{i:03d}.txt").write_text("".join(lines[i * per:(i + 1) * per]), encoding="utf-8")
    return folder


def generated_text(n_bytes: int, seed: int = 0) -> str:
    """Stand-in text when the shared data is absent: lines of words from a small vocabulary."""
    rng = random.Random(seed)
    words = ["the", "king", "and", "queen", "of", "a", "castle", "said", "to", "his", "lord", "that", "we", "shall",
             "go", "now"]
    out, size = [], 0
    while size < n_bytes:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + ".\n"
        out.append(line)
        size += len(line)
    return "".join(out)


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 documents, 120 KB: tinyshakespeare when the shared data folder is present, generated text otherwise."""
    text = SHAKESPEARE.read_text()[:120_000] if SHAKESPEARE.is_file() else generated_text(120_000)
    return write_text_corpus(tmp_path_factory.mktemp("corpus"), text, 20)


@pytest.fixture(scope="session")
def shakespeare_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"real text not present: {SHAKESPEARE} (the shared data folder beside the checkout)")
    return write_text_corpus(tmp_path_factory.mktemp("shakespeare"), SHAKESPEARE.read_text(), 40)


def _byte_shards(corpus: Path, out: Path) -> ShardDataset:
    return prepare_shards(Corpus.from_spec(str(corpus)), ByteTokenizer(), out, val_fraction=0.1, workers=1,
                          progress=False)


@pytest.fixture(scope="session")
def byte_shards() -> Callable[[Path, Path], ShardDataset]:
    """(corpus folder, out folder) -> byte-level shards, 10% of the bytes (in whole documents) for validation."""
    return _byte_shards


@pytest.fixture(scope="session")
def shards(text_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> ShardDataset:
    return _byte_shards(text_corpus, tmp_path_factory.mktemp("shards"))


def _tiny_config(**overrides: object) -> MixConConfig:
    tok = ByteTokenizer()
    return MixConConfig.preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, **overrides)


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., MixConConfig]:
    """(**overrides) -> the `tiny` preset with the bytes tokenizer's vocabulary."""
    return _tiny_config


TrainerFactory = Callable[..., Trainer]


@pytest.fixture
def make_trainer(shards: ShardDataset) -> TrainerFactory:
    """(run_dir, config=None, ds=None, **options) -> a Trainer of a freshly seeded `tiny` model, batches of 4 x 32
    bytes, warmup 2, validation on 2 batches every 4 steps, no progress bar."""

    def factory(run_dir: Path, config: MixConConfig | None = None, ds: ShardDataset | None = None,
                **overrides: object) -> Trainer:
        ds = ds or shards
        options = TrainOptions(**{"steps": 8, "batch_size": 4, "seq_len": 32, "warmup_steps": 2, "eval_every": 4,
                                  "eval_batches": 2, "save_every": 4, "lr": 3e-3, **overrides})
        torch.manual_seed(options.seed)
        model = MixConForCausalLM(config or _tiny_config())
        loader = TrainLoader(ds, options.seq_len, options.batch_size, seed=options.seed)
        return Trainer(model, options, run_dir, loader=loader, tokenizer=ByteTokenizer(), progress=False,
                       eval_data=lambda: eval_batches(ds, options.seq_len, options.batch_size,
                                                      max_batches=options.eval_batches),
                       token_bytes=ByteTokenizer().token_bytes())

    return factory


@pytest.fixture
def kill_mid_delete(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """kill_mid_delete(name): from then on, deleting a folder (shutil.rmtree, but for its ignore_errors clean-ups)
    removes the folder's file `name`, then stops as a SIGKILL would, as far as the folder can tell
    (KeyboardInterrupt)."""
    real_rmtree = shutil.rmtree

    def arm(name: str) -> None:
        def killed_mid_delete(path: Path, *args: object, **kwargs: object) -> None:
            if not kwargs.get("ignore_errors"):
                (Path(path) / name).unlink()
                raise KeyboardInterrupt
            real_rmtree(path, *args, **kwargs)

        monkeypatch.setattr(shutil, "rmtree", killed_mid_delete)

    return arm
