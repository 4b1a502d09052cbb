"""Guidance identities (paper Sec. 3.4) as pure functions."""
import pytest
import torch

from taxadiffusion.guidance import cfg, in_interval, paper_form, paper_w_to_scale, taxaguide


@pytest.fixture
def eps():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)


def test_scale_one_is_the_condition_and_zero_the_reference(eps):
    ref, cond = eps
    torch.testing.assert_close(taxaguide(ref, cond, 1.0), cond)
    assert torch.equal(taxaguide(ref, cond, 0.0), ref)
    torch.testing.assert_close(cfg(ref, cond, 1.0), cond)


def test_paper_form_equals_diffusers_form_with_s_equal_1_plus_w(eps):
    ref, cond = eps
    for w in (0.0, 2.0, 5.0, 9.0):
        torch.testing.assert_close(paper_form(ref, cond, w), taxaguide(ref, cond, paper_w_to_scale(w)))


def test_taxaguide_extrapolates_along_the_difference(eps):
    ref, cond = eps
    out = taxaguide(ref, cond, 6.0)
    torch.testing.assert_close(out - cond, 5.0 * (cond - ref))
    # the same rule as CFG: only the reference differs
    torch.testing.assert_close(out, cfg(ref, cond, 6.0))


def test_guidance_interval():
    on = [i for i in range(10) if in_interval(i, 10, (0.0, 0.5))]
    assert on == [0, 1, 2, 3, 4]
    assert all(in_interval(i, 10, (0.0, 1.0)) for i in range(10))
    assert [i for i in range(10) if in_interval(i, 10, (0.7, 1.0))] == [7, 8, 9]
    with pytest.raises(ValueError):
        in_interval(0, 10, (0.6, 0.2))
