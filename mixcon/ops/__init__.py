"""Functional kernels. The Conba scan contract (DESIGN.md §2.1) in three implementations:
`conba_scan` (chunked: training and prefill), `conba_scan_reference` (sequential loop, for tests)
and `conba_scan_step` (one token: decoding); a fourth, forward only, is the Triton kernel
`mixcon.ops.triton_chunk.conba_scan_triton` (needs triton; imported where used). Beside them,
`linear_cross_entropy` and `linear_token_scores`: the LM head and its loss, or each token's score, over
row chunks, `causal_conv`: Conba's depthwise causal conv over time, and `rms_norm` (`F.rms_norm`, with a
hand-written gradient on a CPU)."""

from mixcon.ops.chunk import conba_scan
from mixcon.ops.conv import causal_conv
from mixcon.ops.cross_entropy import linear_cross_entropy, linear_token_scores
from mixcon.ops.naive import conba_scan_reference
from mixcon.ops.norm import rms_norm
from mixcon.ops.step import conba_scan_step

__all__ = ["causal_conv", "conba_scan", "conba_scan_reference", "conba_scan_step", "linear_cross_entropy",
           "linear_token_scores", "rms_norm"]
