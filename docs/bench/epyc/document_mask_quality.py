"""Quality of runs trained with and without `--document-mask`, scored three ways on their val split.

    python docs/bench/epyc/document_mask_quality.py --corpus OUT.jsonl   # the training corpus
    python docs/bench/epyc/document_mask_quality.py RUN [RUN ...]         # score runs trained on it

The corpus: every paragraph (non-empty line that is not a "= heading =") of WikiText-2's validation split
in ../shared/data, one JSON Lines record each (1,841 documents, median 570 bytes).

alone: each val document from its own start (its EOS), as a prompt meets the model; packed: the val
stream in disjoint rows of SEQ_LEN tokens, as training validates, with the documents of a row seeing
each other (plain) or not (masked). Bits per byte = loss per token / ln 2 / the split's bytes per token.
"""
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from mixcon.data.shards import ShardDataset
from mixcon.evaluation import document_nll
from mixcon.training.checkpoint import load_model_and_tokenizer

SEQ_LEN = 256  # `mixcon train`'s default --seq-len, which the runs used


def packed_loss(model, tokens: np.ndarray, seq_len: int, eos: int, masked: bool) -> float:
    n = (len(tokens) - 1) // seq_len
    rows = torch.from_numpy(tokens[: n * seq_len + 1].astype(np.int64))
    x, y = rows[:-1].view(n, seq_len), rows[1:].view(n, seq_len)
    total = 0.0
    with torch.no_grad():
        for i in range(0, n, 8):
            xb, yb = x[i:i + 8], y[i:i + 8]
            seq_idx = (xb == eos).cumsum(1) if masked else None
            out = model(xb, labels=yb, seq_idx=seq_idx, return_logits=False)
            total += out.lm_loss.item() * yb.numel()
    return total / y.numel()


def write_corpus(out: Path) -> None:
    source = Path(__file__).resolve().parents[4] / "shared" / "data" / "wikitext2_valid.txt"
    lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines()]
    paragraphs = [t for t in lines if t and not (t.startswith("=") and t.endswith("="))]
    out.write_text("".join(json.dumps({"text": t}) + "\n" for t in paragraphs), encoding="utf-8")
    print(f"wrote {len(paragraphs)} paragraphs to {out}")


def main() -> None:
    if sys.argv[1:2] == ["--corpus"]:
        write_corpus(Path(sys.argv[2]))
        return
    results = {}
    for run in map(Path, sys.argv[1:]):
        model, tok = load_model_and_tokenizer(run, "cpu", None, torch.float32)
        model.eval()
        ds = ShardDataset(run / "data")
        tokens = ds.tokens("val")
        eos = ds.eos_id
        starts = [*np.flatnonzero(tokens == eos).tolist(), len(tokens)]
        docs = [tokens[a:b].tolist() for a, b in itertools.pairwise(starts) if b - a >= 2]
        nll = document_nll(model, docs, pad_id=tok.pad_id, context=SEQ_LEN)
        alone = math.fsum(nll) / sum(len(d) - 1 for d in docs)
        to_bpb = 1 / math.log(2) / ds.bytes_per_token("val")
        row = {"alone": alone * to_bpb,
               "packed_plain": packed_loss(model, tokens, SEQ_LEN, eos, False) * to_bpb,
               "packed_masked": packed_loss(model, tokens, SEQ_LEN, eos, True) * to_bpb}
        results[run.name] = row
        print(f"{run.name:10s} " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
