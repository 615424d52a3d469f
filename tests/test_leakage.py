"""Leakage attacks (common/attacks.py, bench/leakage.py) and the measured numbers the app ships.

Real tiny model, real attacks: least-squares inversion of conv_in, gradient inversion of the U-shaped split's
activations, greedy prompt recovery through the causal text encoder, start-noise recovery from plaintext shares.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hediff.common.attacks import (
    invert_by_gradient,
    invert_linear_conv,
    nearest_embedding_tokens,
    psnr,
    recover_from_plaintext_history,
    recover_tokens_greedy,
    ssim,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def unet(tiny_model_dir):
    from hediff.common.models import load_unet

    return load_unet(tiny_model_dir)


@pytest.fixture(scope="module")
def text(tiny_model_dir):
    from hediff.common.models import load_text_encoder, load_tokenizer

    return load_text_encoder(tiny_model_dir), load_tokenizer(tiny_model_dir)


def test_psnr_and_ssim_measure_closeness():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 32, 32, generator=g, dtype=torch.float64)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
    assert psnr(x, x) == float("inf") and ssim(x, x) == pytest.approx(1.0)
    # MSE 0.01 on data range 1 is 20 dB by definition
    assert psnr(x + 0.1, x, data_range=1.0) == pytest.approx(20.0)
    mild, strong = x + 0.02 * noise, x + 0.3 * noise
    assert psnr(mild, x, 1.0) > psnr(strong, x, 1.0)
    assert 1.0 > ssim(mild, x, 1.0) > ssim(strong, x, 1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(x, x[..., :16])


def test_conv_in_activations_give_the_latent_back(unet):
    """Splits conv_in and down0.resnet0 send conv_in(x_t): least squares returns x_t to float rounding."""
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = unet.conv_in(x)
    rebuilt, info = invert_linear_conv(unet.conv_in, h)
    assert psnr(rebuilt, x) > 40
    assert torch.allclose(rebuilt.float(), x, atol=1e-4)
    assert info["relative_residual"] < 1e-8
    # fp16 activations on the wire change nothing that matters
    rebuilt16, _ = invert_linear_conv(unet.conv_in, h.half().float())
    assert psnr(rebuilt16, x) > 40
    with pytest.raises(ValueError, match="stride-1"):
        invert_linear_conv(torch.nn.Conv2d(4, 8, 3, stride=2), h)


def test_gradient_inversion_of_a_non_linear_head_beats_the_prior(unet):
    """resnets[0](conv_in(x)) alone (GroupNorm, SiLU, convs): Adam with the public weights finds x_t."""
    from bench.leakage import resnet0_view

    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    view = resnet0_view(_Setup(unet), 801)
    with torch.no_grad():
        sent = view(x)
    rebuilt, info = invert_by_gradient(view, sent, tuple(x.shape), steps=60, lr=0.1)
    assert info["final_loss"] < info["first_loss"] / 10
    assert psnr(rebuilt, x) > psnr(torch.zeros_like(x), x) + 10


@pytest.mark.slow
def test_gradient_inversion_of_the_u_shaped_split_beats_the_prior(unet, text):
    """u1 sends down_blocks[0]'s output (cross-attention, half resolution); Adam still gets a likeness back."""
    from bench.leakage import u_view
    from hediff.common.models import encode_prompt

    te, tok = text
    cond, uncond = encode_prompt(tok, te, "a red circle")
    ehs = torch.cat([uncond, cond])
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    view = u_view(_Setup(unet), 1, 801, ehs)
    with torch.no_grad():
        sent = view(x)
    assert sent[0].shape == (2, 32, 8, 8)
    rebuilt, info = invert_by_gradient(view, sent, tuple(x.shape), steps=300, lr=0.1)
    assert info["final_loss"] < info["first_loss"] / 10
    assert psnr(rebuilt, x) > psnr(torch.zeros_like(x), x) + 5


class _Setup:
    def __init__(self, unet):
        self.unet = unet


def test_u_view_is_what_the_u_shaped_head_sends(unet, text):
    """Cross-check the bench's server view against the product's U-shaped head (helper C2's UNetHeadTail)."""
    from bench.leakage import u_view
    from hediff.common.models import encode_prompt
    from hediff.common.split import UNetHeadTail

    te, tok = text
    cond, uncond = encode_prompt(tok, te, "a blue square")
    ehs = torch.cat([uncond, cond])
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    ht = UNetHeadTail.from_unet(unet, "u1")
    with torch.no_grad():
        sent, _kept = ht.head(x, 801, ehs)
        mine = u_view(_Setup(unet), 1, 801, ehs)(x)[0]
    assert set(sent) == {"h"}
    assert torch.allclose(sent["h"], mine, atol=1e-5)


def test_prompt_tokens_come_back_from_the_embeddings(text):
    """The server gets per-token states for cross-attention; the causal encoder gives the tokens away."""
    te, tok = text
    prompt = "my red cat"
    ids = tok([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = te(ids)[0][0]
    rec = recover_tokens_greedy(lambda s: te(s)[0], hidden, te.config.vocab_size, tok.bos_token_id, tok.eos_token_id)
    n = len(rec)
    assert rec == ids[0, :n].tolist() and rec[-1] == tok.eos_token_id
    assert tok.decode(rec[1:-1]) == prompt
    # the weak baseline (nearest input embedding) does not: the layers matter, the greedy search undoes them
    base = nearest_embedding_tokens(te.get_input_embeddings().weight, te.embeddings.position_embedding.weight, hidden)
    assert sum(a == b for a, b in zip(base[1:n], rec[1:])) < n - 1


def test_plaintext_shares_give_the_start_noise_back():
    """With x_i = s_i x_0 + o_i known to the server, any plaintext value reveals x_0 at its position."""
    rng = np.random.default_rng(0)
    shape = (1, 4, 8, 8)
    x0 = rng.standard_normal(shape)
    scales = [1.0, 1.3, 1.9]
    offsets = [rng.standard_normal(shape) for _ in scales]
    plain = [rng.random(shape) < 0.2 for _ in scales]
    values = [(s * x0 + o)[m] for s, o, m in zip(scales, offsets, plain)]
    est, known = recover_from_plaintext_history(shape, plain, values, scales, offsets)
    union = np.logical_or.reduce(plain)
    assert np.array_equal(known, union)
    assert np.allclose(est[union], x0[union]) and np.all(est[~union] == 0)


def test_shipped_numbers_are_the_bench_results():
    """desktop/core/data/leakage.json is exactly what --update-app makes of bench/results/leakage-*.json."""
    from bench.leakage import app_entry
    from hediff.desktop.core.leakage import DATA_FILE, FORMAT, load_table

    shipped = load_table(DATA_FILE)
    assert shipped["format"] == FORMAT and shipped["models"]
    for name, entry in shipped["models"].items():
        report = json.loads((REPO / "bench" / "results" / f"leakage-{name}.json").read_text())
        assert entry == app_entry(report)


def test_app_lookup_per_mode(tmp_path):
    from hediff.desktop.core.leakage import DATA_FILE, LeakageDataError, describe, lookup

    conv = lookup("conv_in", "full")
    assert conv is not None and conv.final_psnr > 40 and "leaks the image" in conv.verdict
    assert "PSNR" in conv.summary() and conv.model in conv.summary()
    assert lookup("conv_in", "none").final_psnr >= conv.final_psnr
    assert lookup("no-such-split", "full") is None
    assert describe("no-such-split", "full").startswith("not measured yet")

    # a model with its own row wins when asked for; broken files are reported, not raised, by describe
    data = json.loads(DATA_FILE.read_text())
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(LeakageDataError, match="unreadable"):
        lookup("conv_in", "full", path=broken)
    assert "unreadable" in describe("conv_in", "full", path=broken)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"format": "other", "models": data["models"]}))
    with pytest.raises(LeakageDataError, match="format"):
        lookup("conv_in", "full", path=wrong)
    assert lookup("conv_in", "full", path=tmp_path / "absent.json") is None
