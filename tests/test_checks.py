"""The shared predicates of mixcon.checks."""

from __future__ import annotations

import math

import pytest
import torch

from mixcon.checks import as_number, is_integer, is_number, within


@pytest.mark.parametrize("value,integer,number", [
    (3, True, True), (0, True, True), (-2, True, True), (True, False, False), (False, False, False),
    (2.0, False, True), (-0.5, False, True), (math.nan, False, False), (math.inf, False, False),
    (-math.inf, False, False), ("3", False, False), (None, False, False),
])
def test_integers_and_numbers_exclude_bools_and_non_finite_values(value, integer, number):
    assert is_integer(value) is integer
    assert is_number(value) is number


def test_as_number_takes_real_scalars_and_leaves_complex_text_and_durations():
    """np.float32(0.5), a 0-d tensor: floats. A complex scalar's float() dropped its imaginary part (np.complex128)
    or raised torch's RuntimeError, and a numpy text scalar was parsed ('0.5' taken as a number): left as they are,
    as is a numpy duration (a numbers.Real float() refuses), for the caller to refuse by name."""
    np = pytest.importorskip("numpy")
    for value, number in ((np.float32(0.5), 0.5), (np.array(2.5), 2.5), (torch.tensor(3), 3.0), (np.uint8(3), 3.0)):
        assert type(as_number(value)) is float and as_number(value) == number
    for value in (np.complex128(0.5 + 1j), torch.tensor(0.5 + 1j), np.array(0.5 + 1j), np.str_("0.5"),
                  np.array("0.5"), np.timedelta64(3, "s")):
        assert as_number(value) is value and not is_number(as_number(value))


def test_within_checks_each_bound_given():
    assert within(5) and within(5, 5) and not within(5, 5, above=True) and within(5, 4, above=True)
    assert within(5, maximum=5) and not within(5.1, maximum=5) and not within(4, 5)
    assert within(0.5, 0, 1) and not within(0, 0, 1, above=True) and not within(2, 0, 1)


@pytest.mark.parametrize("layer", ["Conba", "Attention", "MoE"])
def test_layers_refuse_inputs_of_another_dtype_by_name_outside_autocast(layer):
    from mixcon import MixConConfig
    from mixcon.layers.attention import Attention
    from mixcon.layers.conba import Conba
    from mixcon.layers.moe import MoE

    config = MixConConfig.preset("tiny")
    module = {"Conba": lambda: Conba(config, 0), "Attention": lambda: Attention(config, 2),
              "MoE": lambda: MoE(32, 64, 4, 2)}[layer]().bfloat16()
    u = torch.randn(2, 5, 32)
    with pytest.raises(TypeError, match=rf"^{layer}: input is torch.float32, the weights torch.bfloat16: cast one "
                                        r"to the other \(or run under torch.autocast\)$"):
        module(u)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts each product's inputs itself: the same
        for out in (module(u), module.float()(u.bfloat16())):  # bf16 weights on fp32 input, then the reverse
            assert (out[0] if isinstance(out, tuple) else out).shape == u.shape


def test_check_dtype_leaves_quantised_integer_weights_to_their_layers():
    from mixcon.checks import check_dtype

    check_dtype("Conba", torch.randn(2, 3, dtype=torch.float16), torch.uint8)  # (bitsandbytes' 4-bit storage)
    with pytest.raises(TypeError, match=r"^Conba: input is torch.float16, the weights torch.float32"):
        check_dtype("Conba", torch.randn(2, 3, dtype=torch.float16), torch.float32)
