"""The paper's reference paths in bench/ compute the right thing, so that the benchmark compares against real work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package

from bench import paper_reference as ref
from hediff.common.selection import distortion, hill_cost, min_distortion_mask

SHAPE = (4, 8, 8)
TAU = 0.01


@pytest.fixture(scope="module")
def ctx():
    return ref.paper_context()


def _latent(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE)


def test_reference_hill_cost_equals_ours():
    x = _latent(0)
    got = ref.hill_cost_reference(ref.as_reference_tensor(x))[0].double().numpy()
    for channel in got:  # the same map on every channel: the cost of the channel sum
        np.testing.assert_allclose(channel, hill_cost(x), rtol=1e-4)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("tau", [0.005, TAU, 0.1])
def test_greedy_selection_is_ours_plus_the_one_element_that_crosses_the_budget(seed, tau):
    # The reference keeps moving the cheapest element to plaintext while the spent distortion is below the
    # budget, so it stops one element after common.selection's rule (largest prefix with sum <= budget).
    x = _latent(seed)
    plain_ref = (ref.greedy_plaintext_selection(ref.as_reference_tensor(x), tau) == 0)[0].numpy()
    mask_ours = min_distortion_mask(x, tau)
    plain_ours = ~mask_ours
    d = distortion(x)
    assert not (plain_ours & ~plain_ref).any(), "the reference must keep every element we leave in plaintext"
    extra = np.argwhere(plain_ref & ~plain_ours)
    assert len(extra) == 1
    # the extra element is the cheapest one we encrypt, and it takes the spent distortion to the budget or past it
    assert d[tuple(extra[0])] == pytest.approx(d[mask_ours].min(), rel=1e-5)
    budget = tau * d.sum()
    assert d[plain_ours].sum() <= budget < d[plain_ref].sum() * (1 + 1e-6)


def test_sparse_step_decrypts_to_the_affine_update(ctx):
    x = _latent(1)
    b = 0.1 * _latent(2)
    f = 1.03
    res = ref.sparse_step(ref.as_reference_tensor(x), f, ref.as_reference_tensor(b), ctx, TAU)
    assert res.latent.shape == (1, *SHAPE)
    assert np.abs(res.latent[0].double().numpy() - (f * x + b)).max() < 1e-2
    assert res.n_encrypted == int(min_distortion_mask(x, TAU).sum()) - 1
    assert set(res.times) == set(ref.SPARSE_STAGES)


def test_sparse_server_touches_only_the_coo_values(ctx):
    x = torch.zeros(1, 1, 2, 3)
    x[0, 0, 0, 1], x[0, 0, 1, 2] = 2.0, -1.0
    coo = ref.dense_to_coo(x)
    assert coo.indices.tolist() == [[0, 0, 0, 1], [0, 0, 1, 2]]
    b = torch.arange(6, dtype=torch.float32).reshape(1, 1, 2, 3)
    enc, rem = ref.server_update(ref.encrypt_coo(coo, ctx), torch.zeros_like(x), 2.0, b)
    out = ref.merge_coo(ref.decrypt_coo(enc), rem)
    np.testing.assert_allclose(out.numpy(), (2.0 * x + b).numpy(), atol=1e-2)


def test_sparse_step_on_a_batch_selects_over_the_whole_batch(ctx):
    # the reference samples 3 images at once and runs selection, COO and merge on the (3, C, H, W) batch
    xs = np.stack([_latent(s) for s in (3, 4, 5)])
    bs = 0.1 * np.stack([_latent(s) for s in (6, 7, 8)])
    res = ref.sparse_step(torch.as_tensor(xs, dtype=torch.float32), 0.98, torch.as_tensor(bs, dtype=torch.float32), ctx)
    assert res.latent.shape == xs.shape
    assert np.abs(res.latent.double().numpy() - (0.98 * xs + bs)).max() < 1e-2
    assert 0 < res.n_encrypted < xs.size


def test_coo_container_rebuilds_numpy_indices_per_element_and_encrypts_in_place(ctx):
    x = torch.as_tensor(_latent(9), dtype=torch.float32).unsqueeze(0)
    x[x.abs() < 0.5] = 0
    coo = ref.dense_to_coo(x)
    assert isinstance(coo.indices, np.ndarray) and coo.indices.dtype == np.int64
    np.testing.assert_array_equal(coo.indices, x.nonzero().numpy())
    np.testing.assert_array_equal(coo.values.numpy(), x[x != 0].numpy())
    assert ref.encrypt_coo(coo, ctx) is coo and coo.values.size() == len(coo)
    # every derived container (scalar product, sum, decryption) holds a fresh copy of the same indices
    derived = [coo.scaled(2.0), coo.plus(torch.zeros_like(x)), ref.decrypt_coo(coo)]
    for d in derived:
        assert d.indices is not coo.indices
        np.testing.assert_array_equal(d.indices, coo.indices)
        assert d.indices.dtype == np.int64 and d.indices.shape == coo.indices.shape


def test_gather_at_coo_indices_is_the_torch1_per_dimension_gather():
    # the reference writes ``b[indices.T]``; torch <= 2.1 read a (4, n) numpy index as a tuple of 4 index arrays
    b = torch.randn(1, 4, 8, 8)
    idx = torch.tensor([[0, 0, 0, 1], [0, 3, 7, 2], [0, 1, 4, 4]]).numpy()
    coo = ref.CooLatent(torch.zeros(3), torch.as_tensor(idx), tuple(b.shape))
    got = coo.plus(b).values
    np.testing.assert_array_equal(got.numpy(), [b[tuple(i)].item() for i in idx])


@pytest.mark.parametrize("step", [ref.baseline_step, ref.baseline_vector_step])
def test_per_element_baseline_decrypts_correctly(ctx, step):
    xs = torch.tensor([0.5, -1.25, 2.0, 0.0, -3.5])
    bs = torch.tensor([0.1, 0.2, -0.3, 0.4, 0.0])
    got, times = step(xs, 0.97, bs, ctx)
    assert len(got) == len(xs)
    np.testing.assert_allclose(got, (0.97 * xs + bs).numpy(), atol=1e-2)
    assert set(times) == set(ref.BASELINE_STAGES)


def test_quick_benchmark_runs_end_to_end(tmp_path):
    from bench import he_step

    assert he_step.main(["--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "he_step_quick.json").read_text())
    assert data["all_correct"]
    assert set(data["ours"]) == {name for name, _, _ in he_step.OURS}
    assert set(data["paper_sparse"]["sizes"]) == {"32", "64"}
    assert data["paper_baseline"]["sample"] == 32 and data["paper_baseline"]["extrapolated"]
    assert "speedups" in data and data["target"]["what"]
    assert "extrapolated" in (tmp_path / "he_step_quick.md").read_text()
