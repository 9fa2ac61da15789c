"""MixConConfig: presets, layout, JSON round trip, and a clear error for every impossible value."""

from __future__ import annotations

import re

import pytest
import torch

from mixcon import MixConConfig, MixConForCausalLM


def test_presets_and_twins():
    small = MixConConfig.preset("small")
    assert small.layout_string() == "CCACCCAC/DMDMDMDM | CCACCCAC/DMDMDMDM"
    assert MixConConfig.preset("small", attn_per_block=1).layout()[:8] == [
        ("conba", "mlp"), ("conba", "moe"), ("conba", "mlp"), ("conba", "moe"),
        ("attention", "mlp"), ("conba", "moe"), ("conba", "mlp"), ("conba", "moe")]
    assert {m for m, _ in MixConConfig.preset("small", attn_per_block=8).layout()} == {"attention"}
    assert {m for m, _ in MixConConfig.preset("small", attn_per_block=0).layout()} == {"conba"}
    assert {f for _, f in MixConConfig.preset("small", moe_every=0).layout()} == {"mlp"}
    paper = MixConConfig.preset("mixcon-paper")
    assert (paper.n_layers, paper.vocab_size, paper.conba_heads, paper.conba_delay) == (32, 256000, 128, 2)


def test_explicit_patterns_override_the_default_placement():
    cfg = MixConConfig.preset("small", attn_per_block=1, layer_pattern="CCCCCCCA", moe_pattern="MDDDDDDD")
    assert cfg.layout()[7] == ("attention", "mlp") and cfg.layout()[0] == ("conba", "moe")
    full = "A" * 8 + "C" * 8
    cfg = MixConConfig.preset("small", attn_per_block=1, layer_pattern=full)
    assert [m for m, _ in cfg.layout()] == ["attention"] * 8 + ["conba"] * 8
    cfg = MixConConfig.preset("small", moe_pattern="D" * 8 + "M" * 8)  # one letter per layer of the model
    assert [f for _, f in cfg.layout()] == ["mlp"] * 8 + ["moe"] * 8


def test_json_round_trip(tmp_path):
    cfg = MixConConfig.preset("tiny", conba_delay=3, layer_pattern="CACC", attn_per_block=1)
    assert MixConConfig.from_json(cfg.to_json()) == cfg
    cfg.save(tmp_path / "c.json")
    assert MixConConfig.load(tmp_path / "c.json") == cfg
    (tmp_path / "c.json").write_text(cfg.to_json()[:20])  # a truncated file: refused by name
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / 'c.json'))}: not a config JSON file "
                                         r"\(Expecting"):
        MixConConfig.load(tmp_path / "c.json")
    for text, kind in (("null", "NoneType"), ("[1, 2]", "list"), ("42", "int")):
        (tmp_path / "c.json").write_text(text)
        with pytest.raises(ValueError, match=rf"c\.json: not a config JSON file \(a {kind}, not an object of fields\)"):
            MixConConfig.load(tmp_path / "c.json")
    (tmp_path / "c.json").write_bytes(b'{"d_model": 32, "name": "caf\xe9"}')  # Latin-1, not UTF-8
    with pytest.raises(ValueError, match=r"c\.json: not a config JSON file \('utf-8' codec can't decode"):
        MixConConfig.load(tmp_path / "c.json")


@pytest.mark.parametrize("overrides,field", [
    (dict(attn_per_block=9), "attn_per_block"),
    (dict(attn_per_block=-1), "attn_per_block"),
    (dict(attn_per_block=3), "attn_per_block"),  # does not divide L = 8
    (dict(conba_per_block=5), "conba_per_block"),  # a + c != L
    (dict(top_k=9), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(n_heads=3, n_kv_heads=1), "n_heads"),
    (dict(conba_head_dim=48), "conba_head_dim"),
    (dict(conba_groups=3), "conba_groups"),
    (dict(layer_pattern="CCAC"), "layer_pattern"),  # wrong length
    (dict(layer_pattern="CCACCCXC"), "layer_pattern"),  # unknown letter
    (dict(layer_pattern="CCCCCCCC"), "layer_pattern"),  # 0 'A' but attn_per_block = 2
    (dict(moe_pattern="DMDMDMDQ"), "moe_pattern"),
    (dict(conba_process_noise=-0.1), "conba_process_noise"),
    (dict(conba_observation_noise=float("nan")), "conba_observation_noise"),
    (dict(conba_delay=-1), "conba_delay"),
    (dict(conba_selective="mlp"), "conba_selective"),
    (dict(conba_beta_max=3.0), "conba_beta_max"),
    (dict(conba_beta_max=2.1), "conba_beta_max"),  # just above the bound 2
    (dict(d_model=0), "d_model"),
    (dict(d_model=None), "d_model"),  # not optional (it was a TypeError)
    (dict(moe_every=-2), "moe_every"),
    (dict(moe_every=9), "moe_every"),  # more than a block: no layer would be MoE
    (dict(conba_conv=1), "conba_conv"),
    (dict(eos_token_id=10**6), "eos_token_id"),
    (dict(eos_token_id=8192), "eos_token_id"),  # small's vocab_size: one past the last id
    (dict(conba_control="yes"), "conba_control"),
    (dict(conba_kernel="cuda"), "conba_kernel"),
    (dict(conba_kernel="triton", conba_chunk=48), "conba_chunk"),  # the kernel's chunk is a power of two
    (dict(attn_rope=True, head_dim=5), "head_dim"),
    (dict(attn_rope=True, d_model=40, n_heads=8, n_kv_heads=2), "n_heads"),  # head_dim unset: 40 / 8 = 5
    # Types: a float, bool or string where an int or a number belongs is named, not passed on to torch.
    (dict(moe_every=1.5), "moe_every"),
    (dict(moe_every=True), "moe_every"),
    (dict(top_k=2.0), "top_k"),
    (dict(n_experts=8.0), "n_experts"),
    (dict(head_dim=64.0), "head_dim"),
    (dict(expert_hidden=0), "expert_hidden"),
    (dict(norm_eps="1e-5"), "norm_eps"),
    (dict(norm_eps=float("nan")), "norm_eps"),
    (dict(rope_theta=float("nan")), "rope_theta"),
    (dict(init_std=float("inf")), "init_std"),
    (dict(conba_beta_max="1"), "conba_beta_max"),
    (dict(eos_token_id=1.5), "eos_token_id"),
    (dict(eos_token_id=True), "eos_token_id"),
    (dict(pad_token_id=-1), "pad_token_id"),
    (dict(attn_per_block=8, conba_per_block=1), "conba_per_block"),
    (dict(extra=5), "extra"),
    (dict(extra={"run": 3, 7: "seed"}), "extra"),  # a key that JSON would turn into "7"
    (dict(extra={"dtype": torch.float32}), "extra"),
    (dict(router_aux_loss_coef=-0.01), "router_aux_loss_coef"),  # would reward imbalanced experts
    (dict(router_z_loss_coef=float("nan")), "router_z_loss_coef"),
    (dict(conba_beta_max=0.0), "conba_beta_max"),  # the delta rule would write nothing
    (dict(conba_per_block=6.0), "conba_per_block"),
    (dict(extra={"shape": (1, 2)}), "extra"),  # a tuple comes back from config.json as a list
])
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"MixConConfig\.{field}="):
        MixConConfig.preset("small", **overrides)


@pytest.mark.parametrize("overrides", [
    dict(top_k=8, n_experts=8),  # every expert for every token: a dense MoE
    dict(moe_every=8),  # one MoE layer per block, its last
    dict(conba_delay=0),  # no delayed state
    dict(moe_every=16, moe_pattern="DM" * 4),  # a pattern places the MoE layers: moe_every is unused
    dict(attn_per_block=3, layer_pattern="AAACCCCC"),  # a pattern places them: 3 need not divide 8
    dict(d_model=250, n_heads=4, head_dim=64, conba_head_dim=50),  # head_dim given: n_heads need not divide d_model
    dict(norm_eps=1e-30, init_std=1e-30, rope_theta=1e-30),
])
def test_values_at_the_edges_of_what_is_allowed(overrides):
    config = MixConConfig.preset("small", **overrides)
    assert {name: getattr(config, name) for name in overrides} == overrides


@pytest.mark.parametrize("field", ["norm_eps", "init_std", "rope_theta"])
def test_scales_must_be_above_zero(field):
    with pytest.raises(ValueError, match=rf"MixConConfig\.{field}=0\.0 is invalid: must be a finite number > 0"):
        MixConConfig.preset("small", **{field: 0.0})


def test_a_config_changed_after_construction_is_checked_again_by_the_model():
    cfg = MixConConfig.preset("tiny")
    cfg.n_kv_heads = 3
    with pytest.raises(ValueError, match=r"MixConConfig\.n_kv_heads=3"):
        MixConForCausalLM(cfg)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown preset"):
        MixConConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown fields"):
        MixConConfig.from_dict({"d_modle": 3})


def test_config_sources_of_the_wrong_type_are_named():
    """What a YAML/JSON file may hold (a list as preset, integer keys, no mapping at all): errors, not TypeErrors."""
    with pytest.raises(ValueError, match=r"unknown preset \['tiny'\]"):
        MixConConfig.preset(["tiny"])
    with pytest.raises(ValueError, match=r"unknown fields \['foo', 2\]"):
        MixConConfig.from_dict({"d_model": 32, "foo": 1, 2: 3})
    for bad in ([], None):
        with pytest.raises(ValueError, match=rf"expected a mapping of field names to values, got {type(bad).__name__}"):
            MixConConfig.from_dict(bad)
    with pytest.raises(TypeError, match=r"MixConForCausalLM takes a MixConConfig \(MixConConfig\.from_dict for a "
                                        r"mapping\), got dict"):
        MixConForCausalLM(MixConConfig.preset("tiny").to_dict())
    model = MixConForCausalLM(MixConConfig.preset("tiny"))
    for segment in (1.5, "a", 0):
        with pytest.raises(ValueError, match=rf"compile_prefill: segment={segment!r} and chunk=8 must be integers"):
            model.compile_prefill(segment=segment)
    for chunk in (0, 2.0):
        with pytest.raises(ValueError, match=rf"compile_prefill: segment=512 and chunk={chunk!r} must be integers"):
            model.compile_prefill(chunk=chunk)


def test_numpy_and_zero_dim_tensor_numbers_are_taken_as_python_numbers():
    """np.int64(32) or torch.tensor(64) is a valid width (it was refused as "must be an integer"); the config
    keeps Python numbers, so that it writes to JSON."""
    import numpy as np

    config = MixConConfig.preset("tiny", d_model=np.int64(32), mlp_hidden=torch.tensor(64), norm_eps=np.float32(1e-5))
    assert (config.d_model, config.mlp_hidden) == (32, 64) and type(config.d_model) is int
    assert type(config.norm_eps) is float and MixConConfig.from_json(config.to_json()) == config
    assert type(MixConConfig.preset("small", conba_per_block=np.int64(6)).conba_per_block) is int
    # booleans, 1-d tensors and float tensors (torch.tensor(32.5) was not to become 32): not integers
    for value in (True, torch.tensor(True), np.True_, torch.tensor([32]), torch.tensor(32.5), torch.tensor(32.0)):
        with pytest.raises(ValueError, match=r"d_model=.* is invalid: must be an integer >= 1"):
            MixConConfig.preset("tiny", d_model=value)
    for value in (torch.tensor(True), np.complex128(0.5 + 1j), torch.tensor(0.5 + 1j), np.str_("0.5")):
        with pytest.raises(ValueError, match=r"conba_beta_max=.* is invalid: must be a finite number"):
            MixConConfig.preset("tiny", conba_beta_max=value)
