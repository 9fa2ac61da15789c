"""Single-token step of the Conba scan contract (DESIGN.md §2.1): decoding, O(P·N) per head."""

from __future__ import annotations

import torch

from mixcon.ops.contract import check_step_inputs


def conba_scan_step(
    x: torch.Tensor,  # (B, H, P)
    k: torch.Tensor,  # (B, G, N)
    q: torch.Tensor,  # (B, G, N)
    log_decay: torch.Tensor,  # (B, H)
    beta: torch.Tensor,  # (B, H)
    state: torch.Tensor,  # (B, H, P, N): S_{t-1}
    *,
    delta_rule: bool,
    delay_gain: torch.Tensor | None = None,  # (H,)
    delayed_state: torch.Tensor | None = None,  # (B, H, P, N): S_{t-tau}, when tau > 0
    out: torch.Tensor | None = None,  # (B, H, P, N): S_t goes there; may be `state` or `delayed_state` (autograd too)
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the recurrence; returns (y (B, H, P), S_t (B, H, P, N))."""
    # Decoding is dispatch-bound, so the step is a handful of kernels: the state enters three matrix-vector
    # products (S k, S_t q, S_{t-tau} q) and one decay-plus-rank-one update.
    B, H, P, G, N = check_step_inputs(x, k, q, log_decay, beta, state, delay_gain, delayed_state)
    if out is not None and (out.shape != state.shape or not out.is_contiguous()):
        raise ValueError(f"conba_scan_step: out must be a contiguous {(B, H, P, N)} tensor")
    dt = state.dtype
    hg = H // G
    # out= ops record no gradients, and a compiled graph writes its inputs by copy (fused by the compiler).
    in_place = out is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
    inputs = (x, k, q, log_decay, beta, state, delay_gain, delayed_state)
    if (out is not None and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and any(t is not None and t.requires_grad for t in inputs)):
        # Autograd saves the states it reads: it reads copies of those that `out` overwrites.
        state, delayed_state = (s if s is None or not _shares_memory(s, out) else s.clone()
                                for s in (state, delayed_state))
    # Heads grouped by key group: each group's (H/G · P, N) block of rows shares one key and query.
    S = state.reshape(B * G, hg * P, N)  # a view unless the batch is strided
    kc = k.to(dt).reshape(B * G, N, 1)  # (B·G, N, 1)
    qc = q.to(dt).reshape(B * G, N, 1)
    decay = log_decay.to(dt).exp()[..., None]  # (B, H, 1): γ_t
    beta_t = beta.to(dt)[..., None]  # (B, H, 1)
    # Every read of the old states comes before `out` (which may alias them) is written.
    delayed = None
    if delayed_state is not None:
        delayed = torch.bmm(delayed_state.reshape(B * G, hg * P, N), qc).view(B, H, P)  # S_{t-tau} q_t
    write = x.to(dt)
    if delta_rule:  # e_t = x_t - (γ_t S_{t-1}) k_t
        write = write - decay * torch.bmm(S, kc).view(B, H, P)
    S_new = torch.mul(state, decay[..., None], out=out) if in_place else (state * decay[..., None]).contiguous()
    # S_t = γ_t S_{t-1} + (β_t e_t) k_tᵀ (e_t = x_t open-loop): (B·G, hg·P, 1) x (B·G, 1, N), in place
    S_new.view(B * G, hg * P, N).baddbmm_((beta_t * write).reshape(B * G, hg * P, 1), kc.view(B * G, 1, N))
    if out is not None and not in_place:
        out.copy_(S_new)
    y = torch.bmm(S_new.view(B * G, hg * P, N), qc).view(B, H, P)
    if delayed is not None:
        y = torch.addcmul(y, delay_gain.to(dt)[:, None], delayed)
    return y.to(x.dtype), S_new


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are views of one storage."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
