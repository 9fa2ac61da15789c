"""`mixcon generate`: stream text from a checkpoint, token by token."""

from __future__ import annotations

import argparse
import codecs
import sys
from typing import TextIO

import torch

from mixcon.cli.common import SEED, add_available_device_argument, add_dtype_argument, check_cuda_graphs, number_type
from mixcon.data.tokenizer import AnyTokenizer
from mixcon.models.mixcon import MixConForCausalLM
from mixcon.ops.dtypes import DTYPES
from mixcon.training.checkpoint import CheckpointError, load_model_and_tokenizer


class Utf8Printer:
    """Prints the text of generated tokens as they arrive: their bytes through an incremental UTF-8 decoder, which
    holds back only the start of a character still incomplete (at most 3 bytes) and prints bytes that can form
    none as U+FFFD at once, as the whole text's decode shows them. Each token costs the same however long the
    text already is."""

    def __init__(self, tokenizer: AnyTokenizer, out: TextIO | None = None) -> None:
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.ids: list[int] = []
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, tokens: torch.Tensor) -> None:
        self.ids.append(int(tokens[0]))
        self._emit(self.decoder.decode(self.tokenizer.decode_bytes(self.ids[-1:])))

    def end(self) -> str:
        """Print what is left and a newline; returns the whole text."""
        self._emit(self.decoder.decode(b"", final=True) + "\n")
        return self.tokenizer.decode(self.ids)

    def _emit(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()


def stream(model: MixConForCausalLM, tok: AnyTokenizer, prompt: str, max_new_tokens: int, *, greedy: bool = False,
           temperature: float = 0.8, top_k: int | None = 50, top_p: float | None = 0.95, min_p: float | None = None,
           repetition_penalty: float | None = None, seed: int = 0, out: TextIO | None = None) -> str:
    """Print `prompt`, then its continuation as it is generated; returns the continuation. The prompt follows an
    EOS token, which is how every document starts in training."""
    device = model.embed.weight.device
    out = out or sys.stdout
    ids = torch.tensor([[tok.eos_id, *tok.encode(prompt)]], device=device)
    out.write(prompt)
    streamer = Utf8Printer(tok, out)
    model.generate(ids, max_new_tokens, do_sample=not greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                   min_p=min_p, repetition_penalty=repetition_penalty, eos_token_id=tok.eos_id, seed=seed,
                   streamer=streamer,
                   vocab_limit=min(tok.vocab_size, model.config.vocab_size))  # the ids the tokenizer decodes
    return streamer.end()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="stream text from a checkpoint",
                       description="Load a model (a run directory's latest checkpoint, a checkpoint directory, or a "
                                   "save_pretrained directory) and print a continuation of --prompt token by token.")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="run directory, checkpoint or model directory")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max-new-tokens", type=number_type(int, 0), default=200,
                   help="tokens to generate (default: %(default)s)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    p.add_argument("--temperature", type=number_type(float, 0, above=True, hint="; --greedy for argmax decoding"),
                   default=0.8, help="sampling temperature (default: %(default)s)")
    p.add_argument("--top-k", type=number_type(int, 0), default=50,
                   help="sample from the k most likely tokens; 0: no top-k filter (default: %(default)s)")
    p.add_argument("--top-p", type=number_type(float, 0, above=True, maximum=1), default=0.95,
                   help="nucleus sampling mass (default: %(default)s)")
    p.add_argument("--min-p", type=number_type(float, 0, maximum=1), default=0.0,
                   help="drop tokens less likely than this times the likeliest one; 0: no min-p filter (default: "
                        "%(default)s)")
    p.add_argument("--repetition-penalty", type=number_type(float, 0, above=True), default=1.0,
                   help="divide the positive logits, multiply the negative ones, of tokens already in the text "
                        "(prompt included), greedy or sampled, as transformers' repetition_penalty; 1: none "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=SEED, default=0,
                   help="sampling seed (default: %(default)s; on a CPU, PyTorch's generator reads its low 32 bits "
                        "only)")
    p.add_argument("--tokenizer", default=None, help="'bytes' or a tokenizer path (default: the checkpoint's own)")
    add_available_device_argument(p)
    add_dtype_argument(p)
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile, and prefill prompts of 512+ tokens through compiled "
                        "Conba layers (pays off after ~100 tokens or a long prompt; the first call compiles)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay decoding steps from CUDA graphs (capture_decode; a CUDA --device only)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # bytes of the command line that are no UTF-8 (Python keeps them as surrogates)
        raise SystemExit(f"mixcon generate: --prompt is not UTF-8 text (from character {e.start} on); give it in "
                         "UTF-8") from e
    check_cuda_graphs("mixcon generate", args)
    try:
        model, tok = load_model_and_tokenizer(args.checkpoint, args.device, args.tokenizer, DTYPES[args.dtype])
        if args.compile:
            model.compile_decode()
            model.compile_prefill()
        if args.cuda_graphs:
            model.capture_decode()
        stream(model, tok, args.prompt, args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
               top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
               seed=args.seed)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"mixcon generate: {e}") from e
    return 0
