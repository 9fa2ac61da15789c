"""Conba: a selective state-space layer with feedback control (DESIGN.md §2)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mixcon.config import MixConConfig
from mixcon.generation.cache import ConbaCache
from mixcon.layers.context import DecodeStep, ForwardContext, check_input
from mixcon.layers.linear import Linear
from mixcon.layers.mlp import SwiGLU
from mixcon.layers.norm import GatedRMSNorm
from mixcon.ops import causal_conv, conba_scan, conba_scan_step
from mixcon.ops._jvp import carries_tangents
from mixcon.ops.dtypes import compute_dtype

# Steps per segment of an eager forward without autograd (see `Conba._segments`).
EAGER_SEGMENT = 2048


@dataclass(frozen=True)
class SegmentedPrefill:
    """How Conba layers run forwards without autograd after `MixConForCausalLM.compile_prefill`: every
    whole `segment` steps through `layer_fn` (one compiled `Conba.mix`, shared by all layers), chained
    through the conv tail and the states; the rest of a sequence eager. `chunk`: the scan's chunk
    length there (the contract's result does not depend on it)."""

    layer_fn: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
    segment: int
    chunk: int


class Conba(nn.Module):
    """u -> in_proj -> causal conv + SiLU on (x, k, q) -> Conba scan -> gated RMSNorm -> out_proj.

    Switches (all from the config): `conba_selective` ("swiglu": Δ from a small SwiGLU Sel(u);
    "linear": Δ from the input projection, Mamba-2), `conba_state_scaling` (a second forget gate s_t),
    `conba_control` (delta-rule feedback with gain β, L2-normalised keys and queries),
    `conba_delay` (τ: the readout adds g_h · S_{t-τ} q_t), and training-only process and
    observation noise.
    """

    # The sequence form of the scan contract; `conba_scan_reference` has the same signature.
    scan_fn = staticmethod(conba_scan)
    # Forwards without autograd in compiled segments, when set (`MixConForCausalLM.compile_prefill`).
    prefill: SegmentedPrefill | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickling and `copy.deepcopy` leave `prefill` behind (the model's `__setstate__` compiles it anew)."""
        state = super().__getstate__()
        state.pop("prefill", None)
        return state

    def __init__(self, config: MixConConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.H, self.P, self.N, self.G = (config.conba_heads, config.conba_head_dim, config.conba_state,
                                          config.conba_groups)
        self.inner = self.H * self.P
        self.selective = config.conba_selective
        self.control = config.conba_control
        self.scaling = config.conba_state_scaling
        self.tau = config.conba_delay
        self.beta_max = config.conba_beta_max
        self.chunk = config.conba_chunk
        self.kernel = config.conba_kernel
        self.process_noise = config.conba_process_noise
        self.observation_noise = config.conba_observation_noise
        # in_proj: z (H·P), x (H·P), k (G·N), q (G·N), then per-head logits as enabled:
        # dt (linear Sel), beta (control), rho (state scaling).
        self.conv_dim = self.inner + 2 * self.G * self.N  # x, k and q go through the causal conv
        self.in_sizes = [self.inner, self.conv_dim]
        self.in_sizes += [self.H] * (int(self.selective == "linear") + int(self.control) + int(self.scaling))
        self.in_proj = Linear(config.d_model, sum(self.in_sizes), bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, config.conba_conv, groups=self.conv_dim, bias=True)
        self.sel = SwiGLU(config.d_model, config.conba_sel_hidden, self.H) if self.selective == "swiglu" else None
        self.dt_bias = nn.Parameter(torch.empty(self.H))
        self.A_log = nn.Parameter(torch.empty(self.H))
        self.D = nn.Parameter(torch.empty(self.H))
        self.rho_bias = nn.Parameter(torch.empty(self.H)) if self.scaling else None
        self.delay_gain = nn.Parameter(torch.empty(self.H)) if self.tau > 0 else None
        self.norm = GatedRMSNorm(self.inner, groups=self.G, eps=config.norm_eps)
        self.out_proj = Linear(self.inner, config.d_model, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        """Mamba-2 initialisation: A ~ U[1, 16], Δ log-uniform in [dt_min, dt_max], D = 1; s ≈ 1; g = 0."""
        if self.A_log.is_meta:
            return
        self.A_log.copy_(torch.empty(self.H).uniform_(1, 16).log())
        dt = torch.exp(torch.rand(self.H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.D.fill_(1.0)
        if self.rho_bias is not None:
            # s = σ(5) ≈ 0.993 per step (s^1000 ≈ 1e-3: a head's memory at init is at most ~150 steps), our
            # choice: the gate's gradient (1 - s ≈ 7e-3) stays large enough for it to learn; σ(9) would leave a
            # slow head alone but hardly move.
            self.rho_bias.fill_(5.0)
        if self.delay_gain is not None:
            self.delay_gain.zero_()

    def extra_repr(self) -> str:
        return (f"heads={self.H}, head_dim={self.P}, state={self.N}, groups={self.G}, selective={self.selective!r}, "
                f"control={self.control}, state_scaling={self.scaling}, tau={self.tau}, chunk={self.chunk}, "
                f"kernel={self.kernel!r}")

    def conv_taps(self) -> torch.Tensor:
        """The depthwise conv's weights as (width, C), one row per tap, contiguous."""
        return self.conv1d.weight[:, 0].t().contiguous()

    def _conv(self, xkq: torch.Tensor, tail: torch.Tensor | None, taps: torch.Tensor | None = None,
              seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Depthwise causal conv + SiLU over time: (B, T, C) -> (B, T, C); `tail` (B, width - 1, C), the
        previous steps' inputs (zeros when None), is updated in place; `taps`: `conv_taps()`, if at hand;
        `seq_idx` (B, T): no tap reads a step of an earlier document (a document sees zeros before it)."""
        # `causal_conv`: shifted multiply-adds in the (B, T, C) layout, a hand-written gradient. A compiled graph
        # gets `taps` as an input: inside it, the transposed copy is fused away and the loop over C reads the
        # weights with a stride, which inductor does not vectorise.
        B, _, C = xkq.shape
        width = self.conv1d.kernel_size[0]
        full = torch.cat([xkq.new_zeros(B, width - 1, C) if tail is None else tail.to(xkq.dtype), xkq], dim=1)
        if tail is not None:
            tail.copy_(full[:, -(width - 1):])
        out = causal_conv(full, self.conv_taps() if taps is None else taps, self.conv1d.bias, seq_idx)
        return F.silu(out)

    def _scan_inputs(self, u: torch.Tensor, mask: torch.Tensor | None, conv_tail: torch.Tensor | None,
                     taps: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, ...]:
        """(B, T, d_model) -> the gate z (B, T, H·P) and the scan's x (B, T, H, P), k, q (B, T, G, N),
        log decay and gain (B, T, H); pads (`mask` False) neither decay nor write."""
        B, T, _ = u.shape
        z, xkq, *rest = self.in_proj(u).split(self.in_sizes, dim=-1)
        logits = iter(rest)  # the per-head logits that are enabled, in `self.in_sizes` order
        if mask is not None:  # pads enter the conv as zeros and leave the state as it is: exact before a
            # row's first token or after its last, the only places the model leaves pads (it moves the others)
            xkq = xkq.masked_fill(~mask[..., None], 0)  # (not a product: a pad's inf or nan times 0 is nan)
        f32 = compute_dtype(u)
        xkq = self._conv(xkq.to(f32), conv_tail, taps, seq_idx)  # in fp32: the scan reads x, k, q in fp32
        x, kq = xkq.split([self.inner, 2 * self.G * self.N], dim=-1)
        x = x.view(B, T, self.H, self.P)
        kq = kq.view(B, T, 2 * self.G, self.N)  # k's G rows, then q's

        # Selective state function -> step size Δ (fp32).
        dt_raw = self.sel(u) if self.sel is not None else next(logits)
        delta = F.softplus(dt_raw.to(f32) + self.dt_bias.to(f32))  # (B, T, H)
        log_decay = -delta * self.A_log.to(f32).exp()  # log α_t
        if self.control:
            beta = self.beta_max * torch.sigmoid(next(logits).to(f32))  # gain β_t
            kq = F.normalize(kq, dim=-1)  # k and q at once (decoding is dispatch-bound)
        else:
            beta = delta  # open-loop write Δ_t x_t k_tᵀ (Mamba-2)
        k, q = kq.split(self.G, dim=2)
        if self.scaling:
            log_decay = log_decay + F.logsigmoid(next(logits).to(f32) + self.rho_bias.to(f32))  # log s_t
        if mask is not None:
            log_decay = log_decay.masked_fill(~mask[..., None], 0.0)
            beta = beta.masked_fill(~mask[..., None], 0.0)
        return z, x, k, q, log_decay, beta

    def _finish(self, o: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Scan output (B, T, H, P) + D skip -> gated RMSNorm -> out_proj: (B, T, d_model)."""
        o = torch.addcmul(o, self.D.to(o.dtype)[:, None], x)
        if self.training and self.observation_noise > 0:
            o = o + self.observation_noise * torch.randn_like(o)
        return self.out_proj(self.norm(o.flatten(2), z))

    def _triton(self, u: torch.Tensor) -> bool:
        """Whether forwards without autograd scan with the Triton kernel: asked for, on CUDA (or in
        Triton's CPU interpreter), and not in fp64 (the kernel computes in fp32; the torch scan keeps fp64)."""
        return (self.kernel == "triton" and u.dtype != torch.float64
                and (u.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"))

    def _scan_for(self, u: torch.Tensor, packed: bool, *inputs: torch.Tensor | None
                  ) -> Callable[..., tuple[torch.Tensor, ...]]:
        """The scan of this forward on its `inputs`: `scan_fn`, or the Triton kernel without autograd when `_triton`
        (not for packed documents, nor inputs with forward-mode AD tangents, which the kernel does not take)."""
        if torch.is_grad_enabled() or packed or not self._triton(u) or carries_tangents(*inputs):
            return self.scan_fn
        try:
            from mixcon.ops.triton_chunk import conba_scan_triton
        except ImportError as e:
            raise ImportError("conba_kernel='triton' needs the triton package: pip install 'mixcon[triton]' "
                              "(or conba_kernel='torch')") from e
        return conba_scan_triton

    def mix(self, u: torch.Tensor, mask: torch.Tensor | None, conv_tail: torch.Tensor | None,
            state: torch.Tensor | None, past: torch.Tensor | None, chunk: int, taps: torch.Tensor | None = None,
            seq_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The layer on (B, T, d_model) after a conv tail (updated in place), S_0 (B, H, P, N) and the tau
        past states (B, tau, H, P, N) (all None: zeros, no cache). Returns the output (B, T, d_model),
        S_T, and the tau most recent states (None when `state` is None). `taps`: `conv_taps()`, if at hand;
        `seq_idx` (B, T): packed documents (the conv and the scan restart at each)."""
        z, x, k, q, log_decay, beta = self._scan_inputs(u, mask, conv_tail, taps, seq_idx)
        x_write = x
        if self.training and self.process_noise > 0:
            x_write = x + self.process_noise * torch.randn_like(x)
        kw = dict(delta_rule=self.control, tau=self.tau, delay_gain=self.delay_gain, chunk_size=chunk)
        if seq_idx is not None:
            kw["seq_idx"] = seq_idx
        scan = self._scan_for(u, seq_idx is not None, x_write, k, q, log_decay, beta, state, past, self.delay_gain)
        if state is None:
            o, final = scan(x_write, k, q, log_decay, beta, **kw)
            past_out = None
        else:
            o, final, past_out = scan(x_write, k, q, log_decay, beta, initial_state=state,
                                      initial_past_states=past, return_past_states=True, **kw)
        return self._finish(o, x, z), final, past_out  # o: (B, T, H, P)

    def _segments(self) -> SegmentedPrefill:
        """How forwards without autograd run: `self.prefill` (compiled), else eager `EAGER_SEGMENT` steps at a time,
        so that the scan's per-chunk intermediates of one segment, not of the whole sequence, are alive at once."""
        return self.prefill or SegmentedPrefill(Conba.mix, EAGER_SEGMENT, self.chunk)

    def _mix_segments(self, u: torch.Tensor, mask: torch.Tensor | None, conv_tail: torch.Tensor,
                      state: torch.Tensor, past: torch.Tensor | None,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`mix` by `_segments()`: whole segments through its function, the rest eager."""
        p = self._segments()
        outs, taps = [], self.conv_taps()
        for start in range(0, u.shape[1], p.segment):
            end = min(start + p.segment, u.shape[1])
            # Dense copies: a compiled graph guards on strides, which differ for slices of different lengths.
            piece = u[:, start:end].clone(memory_format=torch.contiguous_format)
            m = None if mask is None else mask[:, start:end].clone(memory_format=torch.contiguous_format)
            fn = p.layer_fn if end - start == p.segment else Conba.mix
            out, state, past = fn(self, piece, m, conv_tail, state, past, p.chunk, taps)
            state, past = state.contiguous(), None if past is None else past.contiguous()
            outs.append(out)
        return torch.cat(outs, dim=1), state, past

    def forward(self, u: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        """(B, T, d_model) -> (B, T, d_model); `ctx` carries padding, positions and the cache."""
        check_input("Conba", u, self.in_proj.in_features, self.in_proj.weight.dtype)
        B, T, _ = u.shape
        if ctx is None:
            ctx = ForwardContext.build(None, B, T, None, u.device)
        cache = ctx.cache.layers[self.layer_idx] if ctx.cache is not None else None
        assert cache is None or isinstance(cache, ConbaCache)
        segmented = (T >= self._segments().segment and not torch.is_grad_enabled() and not self._triton(u)
                     and ctx.seq_idx is None)
        if cache is not None:
            tail, state, past = cache.conv, cache.state, cache.ordered() if self.tau else None
        elif segmented:  # chained from zeros, as a cache-less forward starts
            tail = u.new_zeros(B, self.conv1d.kernel_size[0] - 1, self.conv_dim)
            state = u.new_zeros(B, self.H, self.P, self.N, dtype=compute_dtype(u))
            past = state.new_zeros(B, self.tau, *state.shape[1:]) if self.tau else None
        else:
            return self.mix(u, ctx.token_mask, None, None, None, self.chunk, seq_idx=ctx.seq_idx)[0]
        if segmented:
            out, state, past = self._mix_segments(u, ctx.token_mask, tail, state, past)
        else:
            out, state, past = self.mix(u, ctx.token_mask, tail, state, past, self.chunk)
        if cache is not None:
            cache.set_ordered(past if self.tau else state[:, None])
        return out

    def decode(self, u: torch.Tensor, cache: tuple[torch.Tensor, ...], step: DecodeStep) -> torch.Tensor:
        """One new token per row, (B, 1, d_model) -> (B, 1, d_model), by the step form of the scan.

        For the new token t, `cache` is (conv tail, S_{t-1}, oldest ring slot): the tail is updated in place,
        S_{t-tau} is read from the oldest slot (tau > 0), and S_t is written over it."""
        conv, state, oldest = cache
        # The taps as a view: one step's product reads them once, no transposed copy per token.
        z, x, k, q, log_decay, beta = self._scan_inputs(u, None, conv, self.conv1d.weight[:, 0].t())
        o, _ = conba_scan_step(
            x[:, 0], k[:, 0], q[:, 0], log_decay[:, 0], beta[:, 0], state, delta_rule=self.control,
            delay_gain=self.delay_gain, delayed_state=oldest if self.tau else None, out=oldest,
        )
        return self._finish(o[:, None], x, z)
