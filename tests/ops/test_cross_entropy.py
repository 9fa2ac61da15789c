"""The fused, chunked LM-head cross-entropy and token scores against F.cross_entropy over the whole logits."""

import pytest
import torch
import torch.nn.functional as F

from mixcon.ops.cross_entropy import IGNORE, linear_cross_entropy, linear_token_scores


def reference(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h, weight).flatten(0, -2)
    return F.cross_entropy(logits.to(torch.float64 if h.dtype == torch.float64 else torch.float32),
                           labels.flatten(), ignore_index=IGNORE)


def inputs(shape: tuple[int, ...], V: int, d: int, dtype: torch.dtype, ignored: float = 0.3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, d, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(V, d, generator=g, dtype=dtype).requires_grad_()
    labels = torch.randint(0, V, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignored] = IGNORE
    return h, weight, labels


def grads(loss_fn, h, weight, labels, scale: float = 1.0):
    h.grad = weight.grad = None
    loss = loss_fn(h, weight, labels)
    (loss * scale).backward()
    return loss.detach(), h.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 64, None])
@pytest.mark.parametrize("shape", [(2, 9), (13,)])
def test_matches_cross_entropy_fp64(chunk_rows, shape):
    h, weight, labels = inputs(shape, V=11, d=5, dtype=torch.float64)
    want = grads(reference, h, weight, labels, scale=2.5)
    got = grads(lambda *a: linear_cross_entropy(*a, chunk_rows=chunk_rows), h, weight, labels, scale=2.5)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_fp32_default_chunks_and_no_grad():
    h, weight, labels = inputs((4, 300), V=9000, d=16, dtype=torch.float32)  # 1200 rows: 3 default chunks
    want = grads(reference, h, weight, labels)
    got = grads(linear_cross_entropy, h, weight, labels)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, weight, labels), want[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 2.0**16])  # 2^16: GradScaler's first scale
def test_fp16_gradients_take_the_loss_scale(scale):
    # A mean's per-row gradients over 4,096 rows and 1,024 classes lie near fp16's subnormals: rounded to fp16
    # before the scale applies they lose digits (2.4e-3 error), and a scale of 2^16 cast to fp16 is inf.
    h, weight, labels = inputs((4096,), V=1024, d=16, dtype=torch.float64, ignored=0.0)
    h, weight = (t.detach().mul(0.5).requires_grad_() for t in (h, weight))
    want = grads(reference, h, weight, labels)
    h16, w16 = (t.detach().half().requires_grad_() for t in (h, weight))
    _, gh, gw = grads(lambda *a: linear_cross_entropy(*a, chunk_rows=300), h16, w16, labels, scale=scale)
    assert gh.dtype == gw.dtype == torch.float16
    for got, ref in ((gh, want[1]), (gw, want[2])):
        assert got.isfinite().all()
        assert (got.double() / scale - ref).norm() / ref.norm() < 1e-3  # fp16 rounding: ~3.4e-4


def test_bf16_autocast_matches_autocast_reference():
    h, weight, labels = inputs((3, 40), V=50, d=32, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = grads(reference, h, weight, labels)
        got = grads(lambda *a: linear_cross_entropy(*a, chunk_rows=16), h, weight, labels)
    assert got[0].dtype == torch.float32 and got[1].dtype == h.dtype and got[2].dtype == weight.dtype
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-3)


def test_only_the_weight_needs_grad():
    h, weight, labels = inputs((20,), V=7, d=4, dtype=torch.float64)
    h = h.detach()
    weight.grad = None
    reference(h, weight, labels).backward()
    want = weight.grad.clone()
    weight.grad = None
    linear_cross_entropy(h, weight, labels, chunk_rows=6).backward()
    torch.testing.assert_close(weight.grad, want, rtol=1e-12, atol=1e-12)


def test_all_ignored_is_nan_like_cross_entropy():
    h, weight, labels = inputs((5,), V=7, d=4, dtype=torch.float64, ignored=1.0)
    assert reference(h, weight, labels).isnan()
    loss = linear_cross_entropy(h, weight, labels)
    assert loss.isnan()
    loss.nan_to_num(nan=0.0).backward()  # weighted out by a caller: zero gradients, not nan
    assert h.grad.eq(0).all() and weight.grad.eq(0).all()


def test_labels_of_another_shape_are_refused():
    h, weight, labels = inputs((4,), V=7, d=4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"labels \(8,\) must have h's shape without its last dimension, \(4,\)"):
        linear_cross_entropy(h, weight, labels.repeat(2), chunk_rows=2)


def test_second_derivatives_are_refused_not_wrong():
    """The backward only rescales gradients the forward computed: differentiating it again (as gradgradcheck
    does, through the incoming gradient) is an error, not a silently wrong second derivative."""
    h, weight, labels = inputs((4,), V=7, d=4, dtype=torch.float64)
    h.requires_grad_(True)
    loss = linear_cross_entropy(h, weight, labels, chunk_rows=2)
    scale = torch.ones((), dtype=torch.float64, requires_grad=True)
    (grad_h,) = torch.autograd.grad(loss, h, grad_outputs=scale, create_graph=True)
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        grad_h.sum().backward()


def test_bad_chunk_rows():
    h, weight, labels = inputs((5,), V=7, d=4, dtype=torch.float64)
    with pytest.raises(ValueError, match="chunk_rows=0"):
        linear_cross_entropy(h, weight, labels, chunk_rows=0)


@pytest.mark.parametrize("chunk_rows", [None, 1, 5])
def test_token_scores_are_each_tokens_cross_entropy_and_argmax(chunk_rows):
    torch.manual_seed(0)
    h, weight = torch.randn(3, 7, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64)
    labels = torch.randint(0, 50, (3, 7))
    labels[0, :3] = labels[2, 6] = IGNORE
    weight[45] = 3 * h[1, 2]  # at [1, 2] an id past the limit has the largest logit
    logits = F.linear(h, weight)
    assert int(logits[1, 2].argmax()) == 45
    labels[1, 2] = int(logits[1, 2, :30].argmax())  # greedy among the first 30 ids only
    nll, greedy = linear_token_scores(h, weight, labels, vocab_limit=30, chunk_rows=chunk_rows)
    want = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    torch.testing.assert_close(nll, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(greedy, (logits[..., :30].argmax(-1) == labels) | (labels == IGNORE)) and bool(greedy[1, 2])
    with pytest.raises(ValueError, match="chunk_rows=0"):
        linear_token_scores(h, weight, labels, chunk_rows=0)
    with pytest.raises(ValueError, match="labels"):
        linear_token_scores(h, weight, labels[:, :3])


def test_an_ignored_rows_non_finite_hidden_state_counts_nothing():
    """Pads' rows are ignored even when non-finite: the loss, its gradients and the token scores are those of
    the other rows (a product by 0 would have made them nan)."""
    h, weight, labels = inputs((6,), V=7, d=4, dtype=torch.float64)
    labels[[1, 4]] = IGNORE
    bad = h.detach().clone()
    bad[1], bad[4] = float("nan"), float("inf")
    bad.requires_grad_(True)
    loss = linear_cross_entropy(bad, weight, labels, chunk_rows=4)
    loss.backward()
    torch.testing.assert_close(loss, reference(h, weight, labels), rtol=1e-12, atol=1e-12)
    assert bool(weight.grad.isfinite().all()) and bool(bad.grad[[1, 4]].eq(0).all())
    nll, _ = linear_token_scores(bad, weight, labels)
    assert bool(nll.isfinite().all()) and bool(nll[[1, 4]].eq(0).all())


@pytest.mark.parametrize("fn", [linear_cross_entropy, linear_token_scores])
def test_hidden_states_of_another_dtype_than_the_weights_are_refused_by_name(fn):
    h, weight, labels = torch.randn(3, 8), torch.randn(10, 8, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.long)
    with pytest.raises(TypeError, match=rf"^{fn.__name__}: input is torch.float32, the weights torch.bfloat16"):
        fn(h, weight, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fn(h, weight.float(), labels)


def test_fp16_gradients_stay_finite_where_only_their_fp32_products_fit():
    """One scored row and a loss scale of 2^17: the scale over the count is above fp16's range (65,504), its
    product with the row's gradients is not. 70,000 alike rows: the weights' summed gradient, before the mean's
    1/count, is above it too."""
    torch.manual_seed(0)
    h, w = torch.randn(4, 16) * 0.05, torch.randn(32, 16) * 0.05  # gradients x 2^17 within fp16's range
    labels = torch.tensor([1, IGNORE, IGNORE, IGNORE])
    h16, w16 = (t.half().requires_grad_() for t in (h, w))
    (linear_cross_entropy(h16, w16, labels) * 2.0**17).backward()
    h32, w32 = (t.half().float().requires_grad_() for t in (h, w))
    (F.cross_entropy(h32 @ w32.T, labels, ignore_index=IGNORE) * 2.0**17).backward()
    for got, ref in ((h16.grad, h32.grad), (w16.grad, w32.grad)):
        assert got.isfinite().all()
        torch.testing.assert_close(got.float(), ref, rtol=2e-3, atol=1e-2)
    h16 = (h[:1] * 40).half().expand(70_000, 16).contiguous()  # entries ~2: a sum over the rows ~10^5
    w16 = w.half().requires_grad_()
    labels = torch.full((70_000,), 3)
    linear_cross_entropy(h16, w16, labels).backward()
    w32 = w.half().float().requires_grad_()
    F.cross_entropy(h16[:1].float() @ w32.T, labels[:1]).backward()  # the mean of alike rows: one row's
    assert w16.grad.isfinite().all()
    torch.testing.assert_close(w16.grad.float(), w32.grad, rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("fn", [linear_cross_entropy, linear_token_scores])
def test_labels_of_the_same_size_in_another_shape_are_refused(fn):
    """Labels transposed to (T, B) for h (B, T, d) would pair each hidden state with another position's token."""
    h, weight, labels = inputs((2, 3), V=7, d=4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"labels \(3, 2\) must have h's shape without its last dimension, \(2, 3\)"):
        fn(h, weight, labels.t())


def test_token_scores_of_bf16_inputs_are_fp32():
    """bf16 hidden states and weights: the products in bf16, the negative log-likelihoods in fp32."""
    torch.manual_seed(0)
    h, weight = torch.randn(3, 7, 16).bfloat16(), torch.randn(50, 16).bfloat16()
    labels = torch.randint(0, 50, (3, 7))
    nll, _ = linear_token_scores(h, weight, labels)
    assert nll.dtype == torch.float32
    want = F.cross_entropy((h @ weight.t()).float().reshape(-1, 50), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(nll.reshape(-1), want, rtol=1e-5, atol=1e-5)


def test_default_chunks_hold_chunk_elements_logits(monkeypatch):
    """Without chunk_rows, CHUNK_ELEMENTS / V rows per chunk (V the vocabulary, not the width): the head's matmul
    runs once per chunk."""
    from mixcon.ops import cross_entropy

    monkeypatch.setattr(cross_entropy, "CHUNK_ELEMENTS", 64)  # V = 16: 4 rows per chunk
    h, weight, labels = inputs((2, 5), V=16, d=8, dtype=torch.float64)  # 10 rows: 3 chunks
    calls = []
    real_t = torch.Tensor.t
    monkeypatch.setattr(torch.Tensor, "t", lambda self: calls.append(self.shape) or real_t(self))
    linear_token_scores(h, weight, labels)
    assert calls.count(weight.shape) == 3


def test_a_vocabulary_wider_than_a_chunk_takes_one_row_at_a_time(monkeypatch):
    """V above CHUNK_ELEMENTS: chunks of one row (not of zero, which would never end or score nothing)."""
    from mixcon.ops import cross_entropy

    monkeypatch.setattr(cross_entropy, "CHUNK_ELEMENTS", 8)  # V = 16: 0.5 rows per chunk
    h, weight, labels = inputs((5,), V=16, d=4, dtype=torch.float64)
    want = grads(reference, h, weight, labels)
    for g, w in zip(grads(linear_cross_entropy, h, weight, labels), want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    nll, _ = linear_token_scores(h.detach(), weight.detach(), labels)
    torch.testing.assert_close(nll.sum() / (labels != IGNORE).sum(), want[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16])
def test_labels_of_a_narrow_integer_dtype_are_taken(dtype):
    """Token ids as a data loader may keep them (int32, int16): the same loss and scores as int64 labels (the
    gather needs int64 indices on older torch, int32 or int64 on newer)."""
    h, weight, labels = inputs((2, 5), V=11, d=4, dtype=torch.float64)
    want = grads(reference, h, weight, labels)
    got = grads(lambda *a: linear_cross_entropy(*a, chunk_rows=3), h, weight, labels.to(dtype))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, weight, labels.to(dtype)), want[0], rtol=1e-12, atol=1e-12)
    for a, b in zip(linear_token_scores(h, weight, labels.to(dtype)), linear_token_scores(h, weight, labels),
                    strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [-1, 7])
@pytest.mark.parametrize("fn", [linear_cross_entropy, linear_token_scores])
def test_labels_outside_the_vocabulary_are_an_error(fn, bad):
    """As in F.cross_entropy, a label neither in [0, V) nor IGNORE is an error, not silently scored as some id."""
    h, weight, labels = inputs((4,), V=7, d=4, dtype=torch.float64)
    labels[2] = bad
    with pytest.raises((RuntimeError, IndexError)):
        fn(h, weight, labels)


def test_fp16_autocast_weight_gradients_stay_finite_where_only_their_fp32_product_fits():
    """fp32 weights under fp16 autocast (mixed precision with a GradScaler): the head's products run in fp16, and
    the weights' summed gradient over a chunk of 70,000 alike rows, before the mean's 1/count, is above fp16's
    range; taken in fp32 as for fp16 weights, it is the mean's gradient (it was inf whatever the loss scale)."""
    torch.manual_seed(0)
    h, w = (torch.randn(1, 16) * 2).expand(70_000, 16).contiguous(), torch.randn(32, 16) * 0.05
    labels = torch.full((70_000,), 3)
    got, want = w.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = linear_cross_entropy(h, got, labels)
        ref = F.cross_entropy((h[:1] @ want.T).float(), labels[:1])  # the mean of alike rows: one row's
    loss.backward()
    ref.backward()
    assert got.grad.dtype == torch.float32 and got.grad.isfinite().all()
    torch.testing.assert_close(got.grad, want.grad, rtol=2e-3, atol=2e-3)


class _FreshLogits(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that return a new tensor of at least `elements` elements (not a view, not written in place)."""

    def __init__(self, elements: int):
        super().__init__()
        self.elements, self.count = elements, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = func._schema
        fresh = not schema.is_mutable and not any(r.alias_info for r in schema.returns)
        if fresh and isinstance(out, torch.Tensor) and out.numel() >= self.elements:
            self.count += 1
        return out


@pytest.mark.parametrize("score", ["loss with grad", "loss", "token scores"])
def test_fp32_chunks_share_one_logits_buffer(score):
    """Every chunk's (rows, V) logits (and their softmax) are written over one buffer: fresh ones per chunk cost an
    eager training step of `small` ~5 % (docs/benchmarks.md §39)."""
    h, weight, labels = inputs((4, 9), V=64, d=4, dtype=torch.float32)  # 36 rows: 5 chunks of 8
    with torch.set_grad_enabled(score == "loss with grad"), _FreshLogits(8 * 64) as fresh:
        if score == "token scores":
            linear_token_scores(h, weight, labels, chunk_rows=8)
        else:
            linear_cross_entropy(h, weight, labels, chunk_rows=8)
    assert fresh.count == 1


@pytest.mark.parametrize("inf", [float("inf"), -float("inf")])
def test_infinite_logits_take_logsumexps_rule(inf):
    """Logits of ±inf (an infinite weight) give what torch.logsumexp gives (an infinite row maximum counts as 0:
    +inf where a row holds +inf, where F.cross_entropy's log-softmax gives nan)."""
    h, weight, labels = inputs((6,), V=7, d=3, dtype=torch.float64, ignored=0.0)
    h, weight = h.detach().abs(), weight.detach()
    weight[2, 0] = inf
    logits = h @ weight.t()  # (6, 7)
    want = (logits.logsumexp(-1) - logits.gather(1, labels[:, None])[:, 0]).mean()
    assert want.isinf() if inf > 0 else want.isfinite()
    torch.testing.assert_close(linear_cross_entropy(h, weight, labels, chunk_rows=4), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flop_counters_see_each_chunks_three_products(dtype):
    """The logits, ∂h and ∂W of every chunk are products torch's FlopCounterMode counts (an in-place addmm_ it does
    not: `bench speed`'s training step would understate its FLOP/s)."""
    from torch.utils.flop_counter import FlopCounterMode

    h, weight, labels = inputs((4, 9), V=64, d=8, dtype=dtype)  # 36 rows: 5 chunks of 8
    with FlopCounterMode(display=False) as counter:
        linear_cross_entropy(h, weight, labels, chunk_rows=8)
    assert counter.get_total_flops() == 3 * 2 * 36 * 64 * 8
