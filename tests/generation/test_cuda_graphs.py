"""Decoding from CUDA graphs (`capture_decode`): replayed steps equal eager ones, one graph per set of cache tensors."""

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mixcon.generation.cuda_graphs import weight_pointers

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts, of 5 and 9 tokens: the first left-padded."""
    ids = torch.randint(3, 300, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    return ids, mask


def _decode(model, ids, mask, steps, max_length=None):
    """Logits of a prefill then `steps` greedy steps, (B, steps + 1, V), and the cache."""
    with torch.no_grad():
        cache = model.new_cache(ids.shape[0], max_length=max_length or ids.shape[1] + steps)
        logits = [model(ids, attention_mask=mask, cache=cache, logits_to_keep=1).logits]
        for _ in range(steps):
            logits.append(model(logits[-1][:, -1].argmax(-1, keepdim=True), cache=cache).logits)
    return torch.cat(logits, 1), cache


@pytest.mark.parametrize("tau", [0, 2])
def test_replayed_steps_equal_eager_ones(tiny_model, tau, graph_stand_in):
    """One graph per ring phase of the Conba states (tau = 2: two; tau = 0: one), replayed from then on; the
    cache ends as the eager steps leave it."""
    model = tiny_model(conba_delay=tau)
    ids, mask = _prompts()
    expected, eager_cache = _decode(model, ids, mask, 7)
    graphs = graph_stand_in.install(model)
    logits, cache = _decode(model, ids, mask, 7)
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9)
    phases = max(tau, 1)
    assert len(graphs.graphs) == phases and graphs.replays == 7 - phases
    for a, b in zip(eager_cache.layers, cache.layers, strict=True):
        for x, y in zip(a.tensors(), b.tensors(), strict=True):
            torch.testing.assert_close(y, x, rtol=1e-9, atol=1e-9)


def test_steps_under_autocast_run_as_they_are(tiny_model, graph_stand_in):
    """A graph would freeze autocast's cast cache: steps under autocast are neither captured nor replayed."""
    model = tiny_model(conba_delay=0)
    graphs = graph_stand_in.install(model)
    ids, mask = _prompts()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _decode(model, ids, mask, 3)
    assert not graphs.graphs and graphs.replays == 0
    _decode(model, ids, mask, 3)
    assert len(graphs.graphs) == 1 and graphs.replays == 2


def test_a_grown_cache_gets_new_graphs(tiny_model, graph_stand_in):
    model = tiny_model()
    ids = torch.randint(3, 300, (1, 4))
    expected, _ = _decode(model, ids, None, 5, max_length=6)  # grows to 12 at the third step
    graphs = graph_stand_in.install(model)
    logits, _ = _decode(model, ids, None, 5, max_length=6)
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9)
    assert len(graphs.graphs) == 4 and graphs.replays == 1  # steps at capacity 6: 2 graphs, 0 replays; at 12: 2, 1


def test_a_cache_keys_its_graphs_on_the_weights_it_was_decoded_with(tiny_model, monkeypatch, graph_stand_in):
    """Looked up at a cache's first graphed step (once: a walk over the modules), so that replaced weights get new
    graphs; copies of the cache look again (the copy of a model has its own weights)."""
    import mixcon.models.mixcon as models

    model = tiny_model()
    walks = []
    monkeypatch.setattr(models, "weight_pointers", lambda m: walks.append(m) or weight_pointers(m))
    graph_stand_in.install(model)
    _, cache = _decode(model, torch.randint(3, 300, (1, 4)), None, 3)
    assert walks == [model] and cache.weights == weight_pointers(model)
    assert len(cache.weights) == len(set(cache.weights)) + 1  # every parameter (the tied LM head twice)
    assert copy.deepcopy(cache).weights is None and pickle.loads(pickle.dumps(cache)).weights is None
    older = object.__new__(type(cache))  # pickled before `weights` existed
    older.__setstate__({k: v for k, v in cache.__getstate__().items() if k != "weights"})
    assert older.weights is None
    assert copy.copy(cache).weights == cache.weights
    model.norm.weight = nn.Parameter(model.norm.weight * 2)
    assert weight_pointers(model) != cache.weights


def _toy_step(ids, positions, key_mask, index, caches):
    """A step that reads every argument and writes its cache in place."""
    ((state,),) = caches
    state.add_(1)
    return ids + positions + key_mask[-1].sum() + index + state.sum()


def test_each_tensor_read_in_place_is_part_of_a_graphs_key(graph_stand_in):
    """A step's tensors other than the tokens and the position: another such tensor (or the key mask's memory seen
    as another shape, strides or dtype), and a graph captured on the first would read the first."""
    graphs = graph_stand_in()
    mask = torch.ones(3, 3, dtype=torch.bool).tril()
    args = [torch.tensor([[1]]), torch.tensor([2]), mask, torch.tensor([3]), [(torch.zeros(2),)]]

    def step(*changed):
        for i, value in changed:
            args[i] = value
        new = [a.clone() if i < 4 else [(a[0][0].clone(),)] for i, a in enumerate(args)]
        out = graphs(_toy_step, *args, weights=())
        assert torch.equal(out, _toy_step(*new)), changed

    step()
    step((0, torch.tensor([[5]])), (3, torch.tensor([4])))  # new tokens and position: copied in, replayed
    assert (len(graphs.graphs), graphs.replays) == (1, 1)
    step((1, torch.tensor([9])))
    step((2, torch.ones(3, 3, dtype=torch.bool)))
    step((2, mask.t()))  # strides
    step((2, mask[:2]))  # shape
    step((2, mask.view(torch.uint8)))  # dtype
    step((4, [(torch.full((2,), 5.0),)]))
    assert (len(graphs.graphs), graphs.replays) == (7, 1)
    graphs(_toy_step, *args, weights=(1,))
    assert (len(graphs.graphs), graphs.replays) == (8, 1)


def test_a_graph_reads_its_own_copies_of_the_tokens_and_the_position(graph_stand_in):
    """Replays copy the tokens and the position into the graph's own inputs, never into the tensors the step was
    captured on (the caller's: freed or reused after the call)."""
    graphs = graph_stand_in()
    positions, mask, caches = torch.tensor([2]), torch.ones(3, 3, dtype=torch.bool), [(torch.zeros(2),)]
    ids, index = torch.tensor([[1]]), torch.tensor([3])
    graphs(_toy_step, ids, positions, mask, index, caches, weights=())
    graphs(_toy_step, torch.tensor([[5]]), positions, mask, torch.tensor([4]), caches, weights=())
    assert graphs.replays == 1 and ids.tolist() == [[1]] and index.tolist() == [3]


def test_a_graph_captured_under_inference_mode_replays_outside_it(graph_stand_in):
    """`generate` decodes under torch.inference_mode, transformers' generate under no_grad: a graph captured in
    one mode replays in the other (its own inputs, written before each replay, are ordinary tensors)."""
    graphs = graph_stand_in()
    positions, mask, caches = torch.tensor([2]), torch.ones(3, 3, dtype=torch.bool), [(torch.zeros(2),)]
    with torch.inference_mode():
        graphs(_toy_step, torch.tensor([[1]]), positions, mask, torch.tensor([3]), caches, weights=())
    with torch.no_grad():
        logits = graphs(_toy_step, torch.tensor([[5]]), positions, mask, torch.tensor([4]), caches, weights=())
    assert graphs.replays == 1 and logits.tolist() == [[5 + 2 + 3 + 4 + 4]]  # the state summed to 4


def test_a_step_that_cannot_be_captured_decodes_on_without_graphs(tiny_model, graph_stand_in, monkeypatch):
    """A failed capture: that step's result (it ran before) and every later step's as without graphs, one warning."""
    model = tiny_model()
    ids = torch.randint(3, 300, (1, 4))
    expected, _ = _decode(model, ids, None, 5)
    graphs = graph_stand_in.install(model)

    def fail(run, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "_capture", fail)
    with pytest.warns(RuntimeWarning) as warned:
        logits, _ = _decode(model, ids, None, 5)
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9)
    assert [str(w.message) for w in warned] == [
        "capture_decode: a decoding step could not be captured in a CUDA graph (RuntimeError: operation not permitted "
        "when stream is capturing); decoding goes on without graphs"]
    assert not graphs.graphs and graphs.replays == 0


def test_the_least_recently_used_graph_goes(tiny_model, graph_stand_in):
    """max_graphs=2 and three caches decoded in turn: a replayed graph is kept over one used before it."""
    model = tiny_model(conba_delay=0)
    ids = torch.randint(3, 300, (1, 4))
    caches = [model.new_cache(1, max_length=16) for _ in range(3)]
    with torch.no_grad():
        for cache in caches:
            model(ids, cache=cache)
        graphs = graph_stand_in.install(model, max_graphs=2)
        for i in (0, 1, 0, 2, 0):  # the third cache's graph replaces the second's
            model(torch.tensor([[7]]), cache=caches[i])
    assert len(graphs.graphs) == 2 and graphs.replays == 2


def test_only_the_most_recent_graphs_are_kept(tiny_model, graph_stand_in):
    """max_graphs=1 with two ring phases: each step replaces the other phase's graph and none is replayed."""
    model = tiny_model(conba_delay=2)
    ids = torch.randint(3, 300, (1, 4))
    expected, _ = _decode(model, ids, None, 5)
    graphs = graph_stand_in.install(model, max_graphs=1)
    logits, _ = _decode(model, ids, None, 5)
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9)
    assert len(graphs.graphs) == 1 and graphs.replays == 0


def test_replayed_steps_attend_over_the_whole_capacity(tiny_model, monkeypatch, graph_stand_in):
    """As a compiled step: one shape per capacity, so that a graph serves every later step."""
    import mixcon.layers.attention as attention

    model = tiny_model()
    seen = []
    decode_attention = attention.decode_attention
    monkeypatch.setattr(attention, "decode_attention", lambda q, k, v, mask: seen.append(k.shape[2]) or
                        decode_attention(q, k, v, mask))
    graph_stand_in.install(model)
    _decode(model, torch.randint(3, 300, (1, 4)), None, 3, max_length=16)
    assert seen and set(seen) == {16}


def test_steps_off_cuda_run_as_they_are(tiny_model):
    """On a CPU `capture_decode` changes nothing: no graph, the same tokens."""
    model = tiny_model()
    prompt = torch.randint(3, 300, (1, 5))
    expected = model.generate(prompt, 6)
    model.capture_decode()
    assert torch.equal(model.generate(prompt, 6), expected)
    assert not model._decode_graphs.graphs and model._decode_graphs.replays == 0


def test_capture_decode_is_kept_by_copies_and_undone_by_uncompile(tiny_model):
    model = tiny_model()
    with pytest.raises(ValueError, match=r"max_graphs=0 must be an integer >= 1"):
        model.capture_decode(max_graphs=0)
    model.capture_decode(max_graphs=3)
    model._decode_graphs.graphs["a graph"] = lambda: None  # as a CUDA graph, it does not pickle
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert copied._decode_graphs is not model._decode_graphs  # graphs of the copy's own weights
        assert copied._decode_graphs.max_graphs == 3 and not copied._decode_graphs.graphs
    state = {k: v for k, v in model.__getstate__().items() if k not in ("_decode_graphs", "_compiled")}
    older = object.__new__(type(model))  # as pickled before capture_decode existed
    older.__setstate__(state)
    assert torch.equal(older.generate(torch.tensor([[5, 6]]), 3), model.generate(torch.tensor([[5, 6]]), 3))
    model.compile_decode(backend="eager")  # graphs of the step before would replay it
    assert not model._decode_graphs.graphs
    model.uncompile()
    assert model._decode_graphs is None and "graphs" not in model._compiled


HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive", "unique_dim"}


class OpNames(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._opname)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("batch", "overrides"), [(1, {}), (1, dict(conba_delay=0, attn_rope=True)), (3, {})])
def test_a_decoding_step_reads_nothing_back_to_the_host(tiny_model, monkeypatch, batch, overrides):
    """What a CUDA graph can hold: with the static shapes of a step on CUDA (the MoE's gathered experts for a few
    tokens, all experts for more), no op of the step waits for a value on the device."""
    import mixcon.layers.moe as moe
    import mixcon.ops.linear as ops_linear

    monkeypatch.setattr(moe, "static_shapes", lambda h: True)
    monkeypatch.setattr(ops_linear, "SLOW_BLAS_ROWS", False)  # one-row products as on CUDA (F.linear), on any CPU
    model = tiny_model(**overrides)
    ops = OpNames()
    step = model.decode_step

    def recorded(*args):
        with ops:
            return step(*args)

    model._decode_step = recorded
    _decode(model, torch.randint(3, 300, (batch, 4)), None, 2)
    assert {"mm", "index_copy_", "baddbmm_"} <= ops.names and not ops.names & HOST_READS
    assert ("index" in ops.names) == (batch == 1)  # one token's experts gathered


@cuda
@pytest.mark.parametrize("tau", [0, 2])
def test_cuda_graph_decoding_equals_eager(tiny_model, tau):
    """Real CUDA graphs: the same greedy tokens as eager steps, batched with padding, replayed after the first
    step of each ring phase; a grown cache gets new graphs; under autocast steps run as they are."""
    model = tiny_model(dtype=torch.float32, conba_delay=tau).cuda()
    ids, mask = (t.cuda() for t in _prompts())
    expected = model.generate(ids, 12, attention_mask=mask)
    expected_logits, _ = _decode(model, ids, mask, 8, max_length=ids.shape[1] + 2)
    model.capture_decode()
    assert torch.equal(model.generate(ids, 12, attention_mask=mask), expected)
    assert model._decode_graphs.replays == 11 - max(tau, 1)
    logits, _ = _decode(model, ids, mask, 8, max_length=ids.shape[1] + 2)  # grows twice
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    replays = model._decode_graphs.replays
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model.generate(ids, 4, attention_mask=mask)
    assert model._decode_graphs.replays == replays


@cuda
def test_cuda_graphs_of_a_compiled_step(tiny_model):
    model = tiny_model(dtype=torch.float32).cuda()
    prompt = torch.randint(3, 300, (1, 6), device="cuda")
    expected = model.generate(prompt, 10)
    model.compile_decode()
    model.capture_decode()
    assert torch.equal(model.generate(prompt, 10), expected)
    assert model._decode_graphs.replays > 0


@cuda
def test_beam_search_replays_real_cuda_graphs(tiny_model):
    """transformers' beam search reorders the cache every step, in place: the same beams as eager, from replays."""
    pytest.importorskip("transformers", minversion="5", reason="needs transformers >= 5")
    from mixcon.integrations.transformers import MixConHFForCausalLM

    model = tiny_model(dtype=torch.float32, eos_token_id=299, pad_token_id=298).cuda()
    hf = MixConHFForCausalLM.from_mixcon(model).eval()
    ids, mask = (t.cuda() for t in _prompts())
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, num_beams=3)
    expected = hf.generate(ids, **kwargs)
    model.capture_decode()
    assert torch.equal(hf.generate(ids, **kwargs), expected)
    assert model._decode_graphs.replays >= 6


def test_a_graph_decoded_cache_reorders_its_rows_in_place_but_branches_into_new_tensors(tiny_model, graph_stand_in):
    """select_rows keeping the batch size writes over the cache's tensors (their graphs still apply: beam search);
    dropping rows, or any cache not decoded from graphs, gets new ones; `branch` never touches the original."""
    model = tiny_model()
    graph_stand_in.install(model)
    ids, mask = _prompts()
    _, cache = _decode(model, ids, mask, 3)
    assert cache.weights is not None

    def tensors(c):
        return [t for layer in c.layers for t in layer.tensors()] + [c.key_mask, c.positions]

    before = [t.clone() for t in tensors(cache)]
    swap = torch.tensor([1, 0])
    branch = cache.branch(swap)
    assert all(torch.equal(t, b) for t, b in zip(tensors(cache), before, strict=True))  # the original as it was
    assert not {t.data_ptr() for t in tensors(branch)} & {t.data_ptr() for t in tensors(cache)}
    held = tensors(cache)  # (held: an address freed could be handed out again)
    cache.select_rows(swap)
    assert [t.data_ptr() for t in tensors(cache)] == [t.data_ptr() for t in held]
    assert all(torch.equal(t, b[swap]) for t, b in zip(tensors(cache), before, strict=True))
    cache.select_rows(torch.tensor([1]))
    assert cache.batch_size == 1 and not {t.data_ptr() for t in tensors(cache)} & {t.data_ptr() for t in held}
    model.uncompile()
    _, plain = _decode(model, ids, mask, 1)  # (no graphs: weights never looked up)
    held = tensors(plain)
    plain.select_rows(swap)
    assert not {t.data_ptr() for t in tensors(plain)} & {t.data_ptr() for t in held}
