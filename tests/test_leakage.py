"""Leakage attacks (common/attacks.py, bench/leakage.py) and the measured numbers the app ships.

Real tiny model, real attacks: least-squares inversion of conv_in, gradient inversion of the U-shaped split's
activations, a learned decoder trained on the server's own generations, greedy prompt recovery through the causal
text encoder (from embeddings and from cross-attention keys), start-noise recovery from plaintext shares; verdicts
relative to the prompt-only baseline, and the plain-words label the app shows for each shipped mode.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hediff.common.attacks import (
    add_relative_noise,
    invert_by_gradient,
    invert_linear_conv,
    invert_linear_projection,
    nearest_embedding_tokens,
    nearest_template,
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


@pytest.fixture(scope="module")
def tiny_setup(tiny_model_dir, tmp_path_factory):
    from bench.leakage import load_setup

    return load_setup(str(tiny_model_dir), None, tmp_path_factory.mktemp("leak"))


@pytest.mark.slow  # ~1 min on 2 idle cores: 64 UNet calls and 200 decoder steps
def test_learned_decoder_beats_the_prior_on_the_tiny_model(tiny_setup):
    """The server makes 16 generations of its own (random grammar captions), trains a decoder on what u1 would
    send, then decodes a victim's activation: running the sampler on from the decoder's estimate gives a final
    image closer to the victim's than running on from the prior mean (zeros) at the same step."""
    from bench.leakage import (
        Sampler,
        attacker_training_set,
        decode,
        decode_activation,
        image_scores,
        u_view,
        victim_scenes,
    )
    from hediff.common.attacks import train_activation_decoder
    from hediff.common.models import encode_prompt

    sampler = Sampler(tiny_setup, 4, 7.5)
    acts, conds, targets = attacker_training_set(tiny_setup, sampler, {"u1": 1}, 16)
    assert acts["u1"].shape == (16 * 4, 2 * 32, 8, 8) and targets.shape == (16 * 4, 8, 16, 16)
    decoder, info = train_activation_decoder(acts["u1"], conds, targets, steps=200, noise_levels=(0.0, 1.0))
    assert info["final_loss"] < info["first_loss"] / 2
    gains = []
    for p, scene in enumerate(victim_scenes(2)):
        cond, uncond = encode_prompt(tiny_setup.tokenizer, tiny_setup.text_encoder, scene.caption())
        ehs = torch.cat([uncond, cond])
        traj = sampler.run(torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(100 + p)), ehs)
        image, i = decode(tiny_setup, traj.final), 2
        with torch.no_grad():
            sent = u_view(tiny_setup, 1, traj.timesteps[i], ehs)(traj.latents[i])[0]
        xt, final = decode_activation(decoder, sent, traj.timesteps[i])
        assert xt.shape == traj.latents[i].shape and final.shape == traj.final.shape

        def run_on(x, ehs=ehs, i=i, image=image):
            return image_scores(tiny_setup, decode(tiny_setup, sampler.run(x, ehs, start=i).final), image)["psnr"]

        gains.append(run_on(xt) - run_on(torch.zeros_like(xt)))
    assert min(gains) > 1.0, gains


def test_prompt_only_baseline_and_verdicts_relative_to_it(tiny_setup):
    """The baseline is a real generation from the prompt alone; the verdict compares an attack with it, not with
    the prior, and the per-mode table carries it."""
    from bench.leakage import (
        IMAGE_LEAKS,
        LEAK_MARGIN_DB,
        Sampler,
        baseline_scores,
        decode,
        mode_table,
        prompt_only_images,
        verdict,
    )
    from hediff.common.models import encode_prompt

    sampler = Sampler(tiny_setup, 3, 7.5)
    cond, uncond = encode_prompt(tiny_setup.tokenizer, tiny_setup.text_encoder, "a large red circle in the center")
    ehs = torch.cat([uncond, cond])
    x_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    truth = decode(tiny_setup, sampler.run(x_T, ehs).final)
    images = prompt_only_images(tiny_setup, sampler, ehs, starts=2, seed=0)
    assert set(images) == {"zero start", "mean of 2 random starts"}
    scores = baseline_scores(tiny_setup, images, truth)
    best = scores["best"]
    assert best["psnr"] == max(scores["zero start"]["psnr"], scores["mean of 2 random starts"]["psnr"]) < 100
    assert baseline_scores(tiny_setup, {"the true start": truth}, truth)["best"]["psnr"] == 100

    assert verdict(best["psnr"] + LEAK_MARGIN_DB, best["psnr"]) == IMAGE_LEAKS
    assert verdict(best["psnr"] + LEAK_MARGIN_DB - 0.1, best["psnr"]) == "leaks little beyond the prompt"
    # the same attack result is a leak against a weak baseline and not against a strong one
    final = best["psnr"] + 2.0
    row = {"step": 0, "psnr": final, "ssim": 0.5}
    attacks = {
        k: {"final_image": {"psnr": final, "ssim": 0.5, "from_step": 0}, "x_t": [row]}
        for k in ("conv_in", "u1", "reference.full", "reference.min-distortion", "reference.random-mask")
    }
    weak = {"best": {"psnr": best["psnr"] - 5, "ssim": 0.1, "from": "zero start"}}
    strong = {"best": {**best, "from": "zero start"}}
    u1 = [r for r in mode_table(attacks, weak, None) if r["split"] == "u1"]
    assert len(u1) == 4 and all(r["verdict"] == IMAGE_LEAKS for r in u1)
    assert u1[0]["baseline"]["psnr"] == best["psnr"] - 5
    u1 = [r for r in mode_table(attacks, strong, None) if r["split"] == "u1"]
    assert all(r["verdict"] == "leaks little beyond the prompt" for r in u1)


def test_keys_give_the_prompt_embeddings_back(unet, text):
    """Sending K = E W_k^T instead of E hides nothing: W_k has full column rank, least squares returns E."""
    te, tok = text
    ids = tok(["a small blue star"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        emb = te(ids)[0][0]
    w_k = next(m for n, m in unet.named_modules() if n.endswith("attn2")).to_k.weight
    with torch.no_grad():
        keys = emb @ w_k.T
    rebuilt, info = invert_linear_projection(w_k, keys)
    assert info["rank"] == info["columns"] == emb.shape[1]
    assert float((rebuilt - emb.double()).abs().max()) < 1e-4
    # a projection that loses dimensions cannot be undone: the rank says so
    _, low = invert_linear_projection(w_k[:, :8] @ torch.randn(8, w_k.shape[1]), keys)
    assert low["rank"] == 8 < low["columns"]


def test_template_match_reads_noised_embeddings():
    g = torch.Generator().manual_seed(0)
    candidates = torch.randn(20, 77, 16, generator=g)
    observed = add_relative_noise(candidates[13], 1.0, g)
    assert nearest_template(candidates, observed) == 13
    assert torch.equal(add_relative_noise(candidates[0], 0.0), candidates[0])
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        add_relative_noise(candidates[0], -1.0)


def test_the_label_of_every_shipped_mode_says_what_was_measured():
    """The line the CLI, the form and the Privacy tab show: never "private" where a measurement says not."""
    from hediff.desktop.core.leakage import DATA_FILE, MODEL_PREFERENCE, load_table, lookup, privacy_label

    models = load_table(DATA_FILE)["models"]
    rows = models[next(m for m in MODEL_PREFERENCE if m in models)]["modes"]
    assert {r["split"] for r in rows} >= {"conv_in", "down0.resnet0", "u1", "u2", "u3", "reference"}
    for r in rows:
        m = lookup(r["split"], r["encryption"])
        label = privacy_label(r["split"], r["encryption"])
        tokens = f"{m.prompt_token_accuracy * 100:.0f}% of tokens"
        rebuilt = "exactly" if m.final_psnr >= 100 else f"{m.final_psnr:.1f} dB"
        measured = f"measured {rebuilt} vs {m.baseline_psnr:.1f} dB from the prompt alone"
        assert m.leaks_image == (r["verdict"] == "leaks the image")
        if m.leaks_image and m.prompt_token_accuracy >= 0.5:
            assert (
                label
                == f"Not private: this server can rebuild your images ({measured}) and read your prompts ({tokens})"
            )
        elif m.prompt_token_accuracy >= 0.5:
            assert label.startswith(f"Not private: this server can read your prompts ({tokens})") and measured in label
        else:
            assert label.startswith(("Not private", "Leaks little beyond the prompt")) and measured in label
    exact = privacy_label("conv_in", "full")
    assert exact.startswith("Not private: this server can rebuild your images (measured exactly vs ")
    assert privacy_label("u9", "full").endswith("treat it as not private")


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
