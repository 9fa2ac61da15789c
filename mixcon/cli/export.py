"""`mixcon export hf`: a run, checkpoint or model directory as one Hugging Face transformers directory."""

from __future__ import annotations

import argparse

from mixcon.cli.common import add_command, add_dtype_argument
from mixcon.ops.dtypes import DTYPES
from mixcon.training.checkpoint import CheckpointError

DESCRIPTION = """\
Write a model with its tokenizer as a transformers directory: config.json (model_type "mixcon"),
model.safetensors, generation_config.json, tokenizer.json and tokenizer_config.json (texts start with EOS,
as training documents do; padding on the left; text that spells a special token such as <|eos|> encodes as
its id, as transformers' tokenizers do, where mixcon reads it as text), modeling_mixcon.py and a model card
(README.md, with
Hugging Face Hub metadata and loading code). AutoTokenizer and AutoModelForCausalLM.from_pretrained(OUT)
load it after `import mixcon.integrations.transformers`, or with trust_remote_code=True wherever mixcon is
installed (e.g. tools that take a model path); `mixcon generate` and `mixcon eval` read it too. Needs
`pip install 'mixcon[hf]'`."""


def register(sub: argparse._SubParsersAction) -> None:
    actions = add_command(sub, "export", "Export", "write a checkpoint in another library's format")
    p = actions.add_parser("hf", help="as a transformers model + tokenizer directory", description=DESCRIPTION)
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="run directory, checkpoint or model directory")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write (renamed into place when done)")
    p.add_argument("--tokenizer", default=None, help="'bytes' or a tokenizer path (default: the checkpoint's own)")
    add_dtype_argument(p, help="dtype of the weights written (default: %(default)s)")
    p.add_argument("--max-shard-size", default="50GB",
                   help="largest weights file; bigger models are sharded as transformers shards them, e.g. 5GB "
                        "(default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    p.set_defaults(func=run_hf)


def run_hf(args: argparse.Namespace) -> int:
    try:
        from mixcon.integrations.transformers import export_hf

        out = export_hf(args.checkpoint, args.out, tokenizer=args.tokenizer, dtype=DTYPES[args.dtype],
                        max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    except (CheckpointError, ImportError, OSError, ValueError) as e:
        raise SystemExit(f"mixcon export hf: {e}") from e
    print(f"wrote {out}: AutoModelForCausalLM / AutoTokenizer.from_pretrained load it after "
          "`import mixcon.integrations.transformers`, or with trust_remote_code=True")
    return 0
