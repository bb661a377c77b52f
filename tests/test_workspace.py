"""What the kernel backends share about a layer (rnnfast/workspace.py): the hoisted input product."""

import pytest
import torch

from rnnfast.workspace import hoisted_input, widened_addmm


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_products_are_rounded_once_to_fp32(dtype):
    """The hoisted product of half inputs keeps fp32's precision: it is never rounded to the layer dtype first
    (which would cost three or more decimal digits)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 37, generator=g).to(dtype)
    w = torch.randn(12, 37, generator=g).to(dtype)
    b = torch.randn(12, generator=g)
    got = hoisted_input(x, w, b, torch.float32)
    exact = (x.double().reshape(15, 37) @ w.double().t() + b.double()).view(5, 3, 12)
    assert got.dtype == torch.float32
    assert (got.double() - exact).abs().max() < 1e-5 * exact.abs().max()
    rounded_first = (x.reshape(15, 37) @ w.t()).float().view(5, 3, 12) + b
    assert (rounded_first.double() - exact).abs().max() > 10 * (got.double() - exact).abs().max()


def test_same_dtype_is_one_addmm():
    g = torch.Generator().manual_seed(1)
    a, w, b = (torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g,
                                                                                 dtype=torch.float64),
               torch.randn(5, generator=g, dtype=torch.float64))
    assert torch.equal(widened_addmm(b, a, w, torch.float64), torch.addmm(b, a, w))
    assert torch.equal(widened_addmm(None, a, w, torch.float64), a @ w)
