"""The Conba scan contract's shared parts (DESIGN.md §2.1): input checks, the log-decay floor, document starts,
the initial states, the result for T = 0, the delayed readout of the initial past states, and the Triton
kernel's limits."""

from __future__ import annotations

import torch

from mixcon.checks import is_integer

# The chunked forms work with differences of cumulative log decays within a chunk: a log decay far below
# this (or -inf, a full reset) would make them lose precision (or give nan). A decay of exp(-100) ~ 4e-44
# is a full reset at every precision the scan computes in, so they clamp there.
LOG_DECAY_FLOOR = -100.0


def check_scan_inputs(
    x: torch.Tensor,
    k: torch.Tensor,
    q: torch.Tensor,
    log_decay: torch.Tensor,
    beta: torch.Tensor,
    tau: int,
    delay_gain: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    initial_past_states: torch.Tensor | None,
    seq_idx: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[int, int, int, int, int, int]:
    """Validate (B,T,H,P) / (B,T,G,N) / (B,T,H) shapes, seq_idx (B,T) and chunk_size; return (B, T, H, P, G, N)."""
    B, T, H, P, G, N = _check_shapes("conba_scan", ("B", "T"), x, k, q, log_decay, beta)
    if not (is_integer(tau) and tau >= 0):
        raise ValueError(f"conba_scan: tau={tau!r} must be a Python int >= 0")
    if not (is_integer(chunk_size) and chunk_size >= 1):
        raise ValueError(f"conba_scan: chunk_size={chunk_size!r} must be a Python int >= 1")
    if tau > 0 and (delay_gain is None or delay_gain.shape != (H,)):
        got = "none" if delay_gain is None else f"shape {tuple(delay_gain.shape)}"
        raise ValueError(f"conba_scan: tau={tau} > 0 needs delay_gain of shape (H,)=({H},), got {got}")
    if tau == 0 and delay_gain is not None:
        raise ValueError("conba_scan: delay_gain without a delay (tau=0) would be ignored; give tau > 0, or no gain")
    if initial_state is not None and initial_state.shape != (B, H, P, N):
        raise ValueError(f"conba_scan: initial_state must be (B, H, P, N)={(B, H, P, N)}, "
                         f"got {tuple(initial_state.shape)}")
    if initial_past_states is not None and initial_past_states.shape != (B, tau, H, P, N):
        raise ValueError(f"conba_scan: initial_past_states must be (B, tau, H, P, N)={(B, tau, H, P, N)}, "
                         f"got {tuple(initial_past_states.shape)}")
    if seq_idx is not None:
        check_seq_idx(seq_idx, (B, T), "conba_scan: seq_idx")
    return B, T, H, P, G, N


def _check_shapes(op: str, lead: tuple[str, ...], x: torch.Tensor, k: torch.Tensor, q: torch.Tensor,
                  log_decay: torch.Tensor, beta: torch.Tensor) -> tuple[int, ...]:
    """x (*lead, H, P), k and q (*lead, G, N), log_decay and beta (*lead, H), G dividing H; returns
    (*lead sizes, H, P, G, N). `lead` names the leading dimensions: ("B", "T") for a sequence, ("B",) a step."""
    n, dims = len(lead), ", ".join(lead)
    if x.dim() != n + 2:
        raise ValueError(f"{op}: x must be ({dims}, H, P), got shape {tuple(x.shape)}")
    sizes, (H, P) = tuple(x.shape[:n]), x.shape[n:]
    named = ", ".join(f"{d}={size}" for d, size in zip(lead, sizes, strict=True))
    if k.dim() != n + 2 or tuple(k.shape[:n]) != sizes or k.shape != q.shape:
        raise ValueError(f"{op}: k and q must both be ({named}, G, N), got {tuple(k.shape)} and {tuple(q.shape)}")
    G, N = k.shape[n:]
    if G < 1 or H % G != 0:
        raise ValueError(f"{op}: the number of key groups G={G} must divide the number of heads H={H}")
    for name, t in (("log_decay", log_decay), ("beta", beta)):
        if t.shape != (*sizes, H):
            raise ValueError(f"{op}: {name} must be ({dims}, H)={(*sizes, H)}, got {tuple(t.shape)}")
    for name, t in (("x", x), ("k", k), ("q", q), ("log_decay", log_decay), ("beta", beta)):
        if not t.is_floating_point():  # (integers would truncate the outputs)
            raise ValueError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    return (*sizes, H, P, G, N)


def check_step_inputs(
    x: torch.Tensor,
    k: torch.Tensor,
    q: torch.Tensor,
    log_decay: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    delay_gain: torch.Tensor | None,
    delayed_state: torch.Tensor | None,
) -> tuple[int, int, int, int, int]:
    """Validate the shapes of one step, (B,H,P) / (B,G,N) / (B,H) / (B,H,P,N); return (B, H, P, G, N)."""
    B, H, P, G, N = _check_shapes("conba_scan_step", ("B",), x, k, q, log_decay, beta)
    for name, t in (("state", state), ("delayed_state", delayed_state)):
        if t is not None and t.shape != (B, H, P, N):
            raise ValueError(f"conba_scan_step: {name} must be {(B, H, P, N)}, got {tuple(t.shape)}")
    if (delay_gain is None) != (delayed_state is None):
        raise ValueError("conba_scan_step: delay_gain and delayed_state go together")
    if delay_gain is not None and delay_gain.shape != (H,):
        raise ValueError(f"conba_scan_step: delay_gain must be (H,)=({H},), got {tuple(delay_gain.shape)}")
    return B, H, P, G, N


def check_seq_idx(seq_idx: torch.Tensor, shape: tuple[int, int], name: str = "seq_idx", ordered: bool = True) -> None:
    """seq_idx must be an integer (B, T) tensor (a document index per token), non-decreasing along T when `ordered`
    (a check that reads the values back: what needs only equal indices to mean one document skips it)."""
    if seq_idx.shape != shape:
        raise ValueError(f"{name} must be (B, T)={shape}, got {tuple(seq_idx.shape)}")
    if seq_idx.dtype.is_floating_point or seq_idx.dtype.is_complex or seq_idx.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer document indices, got dtype {seq_idx.dtype}")
    # Not inside a compiled graph (a data-dependent branch would break it): the model checks at its boundary.
    if (ordered and shape[1] > 1 and not torch.compiler.is_compiling()
            and bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any())):
        raise ValueError(f"{name} must be non-decreasing along T: each document's tokens are contiguous")


def document_starts(seq_idx: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True where a token's document differs from the previous token's (never at t = 0)."""
    starts = torch.zeros_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return starts


def triton_chunk_ok(chunk_size: int, tau: int) -> bool:
    """Whether the Triton kernel takes this chunk size: a power of two >= 16 and >= tau."""
    return is_integer(chunk_size) and chunk_size >= 16 and chunk_size & (chunk_size - 1) == 0 and chunk_size >= tau


def initial_states(
    x: torch.Tensor,  # (B, T, H, P)
    N: int,
    tau: int,
    initial_state: torch.Tensor | None,  # (B, H, P, N)
    initial_past_states: torch.Tensor | None,  # (B, tau, H, P, N)
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """S_0 (B, H, P, N) and S_{1-tau} .. S_0 (B, tau, H, P, N) in `dtype`: zeros, and S_0 repeated, unless given."""
    B, _, H, P = x.shape
    S0 = x.new_zeros(B, H, P, N, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    if initial_past_states is None:
        return S0, S0.unsqueeze(1).expand(B, tau, H, P, N)
    return S0, initial_past_states.to(dtype)


def no_steps(x: torch.Tensor, S0: torch.Tensor, past0: torch.Tensor, out_dtype: torch.dtype,
             return_past_states: bool) -> tuple[torch.Tensor, ...]:
    """A scan's result for T = 0: no output, and the states as they were, in tensors of their own (as every other
    length returns; `initial_states` may hand back the caller's tensor or a view of it)."""
    y = x.new_zeros(*x.shape[:1], 0, *x.shape[2:], dtype=out_dtype)
    S0, past0 = (t.clone(memory_format=torch.contiguous_format) for t in (S0, past0))
    return (y, S0, past0) if return_past_states else (y, S0)


def early_delayed_readout(q: torch.Tensor, past0: torch.Tensor, heads_per_group: int) -> torch.Tensor:
    """S_{t-tau} q_t for the first min(tau, T) steps, which read the initial past states:
    q (B, T, G, N), past0 (B, tau, H, P, N) -> (B, min(tau, T), H, P)."""
    head = min(past0.shape[1], q.shape[1])
    qh = q[:, :head].to(past0.dtype).repeat_interleave(heads_per_group, dim=2)  # (B, head, H, N)
    return torch.einsum("bthpn,bthn->bthp", past0[:, :head], qh)
