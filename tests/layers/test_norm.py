import pytest
import torch
import torch.nn.functional as F

from mixcon import MixConConfig
from mixcon.layers.norm import GatedRMSNorm, RMSNorm


@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_rms_norm_is_x_over_its_root_mean_square_with_eps(eps):
    """On inputs of scale 0.01 (mean square 1e-4) eps changes the result: it must be the norm's own."""
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=eps).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = 0.01 * torch.randn(3, 16, dtype=torch.float64)
    expected = x / (x.square().mean(-1, keepdim=True) + eps).sqrt() * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 4])
def test_gated_rms_norm_normalises_each_group_of_o_times_silu_z(groups):
    torch.manual_seed(0)
    norm = GatedRMSNorm(16, groups=groups, eps=1e-3).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    o, z = 0.05 * torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 3, 16, dtype=torch.float64)
    h = (o * F.silu(z)).unflatten(-1, (groups, -1))
    expected = (h / (h.square().mean(-1, keepdim=True) + 1e-3).sqrt()).flatten(-2) * norm.weight
    torch.testing.assert_close(norm(o, z), expected, rtol=1e-12, atol=1e-12)


def test_gated_rms_norm_of_bf16_inputs_computes_in_fp32_and_returns_bf16():
    """bf16 o and z (a bf16 model): the product and its norm in fp32, rounded to bf16 once before the (bf16)
    weight scales it, as transformers' Mamba-2 gated norm does."""
    torch.manual_seed(0)
    norm = GatedRMSNorm(64, groups=2).bfloat16()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    o, z = torch.randn(4, 64, dtype=torch.bfloat16), torch.randn(4, 64, dtype=torch.bfloat16)
    h = (o.float() * F.silu(z.float())).unflatten(-1, (2, -1))
    expected = norm.weight * F.rms_norm(h, (32,), eps=1e-5).flatten(-2).bfloat16()
    got = norm(o, z)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected)


def test_norms_start_as_the_identity_scale():
    """A norm built on its own (outside a model, whose reset_parameters sets them too) starts with weight one; by
    default with the config's eps (1e-5) and, gated, one group over the whole width."""
    for norm in (RMSNorm(16), GatedRMSNorm(16, groups=4)):
        assert torch.equal(norm.weight, torch.ones(16))
    assert RMSNorm(16).eps == GatedRMSNorm(16).eps == MixConConfig().norm_eps == 1e-5
    assert GatedRMSNorm(16).groups == 1


def test_gated_rms_norm_refuses_groups_that_do_not_divide_its_width():
    for groups in (0, 3):
        with pytest.raises(ValueError, match=rf"GatedRMSNorm: groups={groups} must be >= 1 and divide dim=16"):
            GatedRMSNorm(16, groups=groups)


def test_rms_norm_prints_its_width_and_eps():
    assert repr(RMSNorm(16, eps=1e-6)) == "RMSNorm(16, eps=1e-06)"
