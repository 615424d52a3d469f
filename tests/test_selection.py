import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hediff.common.selection import (
    DEFAULT_MASK_FRACTION,
    distortion,
    hill_cost,
    min_distortion_mask,
    new_mask_seed,
    random_mask,
    select_mask,
)


def _reference_hill(latent: np.ndarray) -> np.ndarray:
    """The reference code's torch formulation: kernels summed over channels, reflect padding."""
    x = torch.from_numpy(latent).double()[None]
    c = x.shape[1]
    hp = torch.tensor([[-1.0, 2, -1], [2, -4, 2], [-1, 2, -1]], dtype=torch.float64)
    r = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), hp.expand(1, c, 3, 3)).abs()
    l1 = F.conv2d(F.pad(r, (1, 1, 1, 1), mode="reflect"), torch.full((1, 1, 3, 3), 1 / 9, dtype=torch.float64))
    inv = torch.where(l1 > 0, 1 / l1, torch.zeros_like(l1))
    return F.conv2d(F.pad(inv, (7, 7, 7, 7), mode="reflect"), torch.full((1, 1, 15, 15), 1 / 225, dtype=torch.float64))[
        0, 0
    ].numpy()


def test_hill_cost_matches_the_torch_reference():
    x = np.random.default_rng(0).standard_normal((4, 32, 32))
    np.testing.assert_allclose(hill_cost(x), _reference_hill(x), rtol=1e-10)


def test_selection_is_the_exact_cumulative_sum_rule():
    x = np.random.default_rng(1).standard_normal((4, 16, 16))
    tau = 0.05
    mask = min_distortion_mask(x, tau)
    d = distortion(x)
    plain = d[~mask]
    assert plain.sum() <= tau * d.sum()
    # adding the cheapest encrypted element would exceed the budget: the plaintext set is the longest prefix
    assert plain.sum() + d[mask].min() > tau * d.sum()
    assert plain.max() <= d[mask].min()


@pytest.mark.parametrize(
    "tau,expected", [(0.005, 0.919), (0.01, 0.886), (0.05, 0.747), (0.1, 0.645), (0.2, 0.503), (0.5, 0.237)]
)
def test_encrypted_fraction_on_gaussian_latents_matches_the_paper(tau, expected):
    fractions = [
        min_distortion_mask(np.random.default_rng(s).standard_normal((4, 64, 64)), tau).mean() for s in range(3)
    ]
    assert abs(np.mean(fractions) - expected) < 0.01


def test_edge_cases():
    x = np.random.default_rng(2).standard_normal((4, 8, 8))
    assert min_distortion_mask(x, 0.0).all()
    assert not min_distortion_mask(x, 1.0).any()
    assert select_mask(x, "full") is None
    with pytest.raises(ValueError, match="tau"):
        min_distortion_mask(x, 1.5)
    with pytest.raises(ValueError, match="encryption mode"):
        select_mask(x, "partial")
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        hill_cost(x[0])
    assert min_distortion_mask(np.zeros((4, 8, 8)), 0.01).all()  # flat latent: zero cost everywhere, all encrypted


def test_random_mask_is_an_exact_share_fixed_by_the_seed():
    seed = bytes(range(32))
    mask = random_mask((4, 64, 64), DEFAULT_MASK_FRACTION, seed)
    assert mask.dtype == bool and mask.shape == (4, 64, 64)
    assert int(mask.sum()) == round(DEFAULT_MASK_FRACTION * mask.size)  # 14516 of 16384, every time
    assert np.array_equal(mask, random_mask((4, 64, 64), DEFAULT_MASK_FRACTION, seed))
    other = random_mask((4, 64, 64), DEFAULT_MASK_FRACTION, new_mask_seed())
    assert not np.array_equal(mask, other)
    assert random_mask((4, 8, 8), 0.0, seed).sum() == 0 and random_mask((4, 8, 8), 1.0, seed).all()
    # nested: a larger share of the same seed encrypts a superset
    assert np.all(random_mask((4, 8, 8), 0.3, seed) <= random_mask((4, 8, 8), 0.6, seed))


def test_random_mask_is_uniform_and_ignores_the_latent():
    # every position is encrypted with probability ~fraction over fresh secret seeds (binomial, 2000 draws: sd 0.011;
    # 0.08 is 7 sd, so the 72 positions stay inside it but for a bias; 400 draws at 0.1 (4 sd) failed once in CI)
    hits = np.mean([random_mask((2, 6, 6), 0.5, new_mask_seed()) for _ in range(2000)], axis=0)
    assert np.all(np.abs(hits - 0.5) < 0.08), hits
    with pytest.raises(ValueError, match="does not depend on the latent"):
        select_mask(np.zeros((4, 8, 8)), "random-mask")


def test_random_mask_bad_input():
    with pytest.raises(ValueError, match="mask fraction"):
        random_mask((4, 8, 8), 1.5, new_mask_seed())
    with pytest.raises(ValueError, match="mask fraction"):
        random_mask((4, 8, 8), float("nan"), new_mask_seed())
    with pytest.raises(ValueError, match="secret seed"):
        random_mask((4, 8, 8), 0.5, b"short")
