import numpy as np
import pytest
import tenseal as ts

from hediff.common import he
from hediff.common.latent import (
    decrypt_latent,
    encrypt_latent,
    merge_values,
    pack_mask,
    split_values,
    unpack_mask,
    update_latent,
)
from hediff.common.selection import min_distortion_mask


def context_with_secret_key(preset: he.HEPreset) -> bytes:
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS, preset.poly_modulus_degree, coeff_mod_bit_sizes=list(preset.coeff_mod_bit_sizes)
    )
    ctx.global_scale = preset.scale
    return ctx.serialize(save_secret_key=True)


@pytest.fixture(scope="module", params=sorted(he.PRESETS))
def key(request):
    # CKKS itself, exactly: flooding and the decryption bound are tested in test_key_recovery.py
    return he.ClientKey(request.param, flooding=False, max_decryptions=1000)


def test_presets_are_within_128_bit_security():
    max_log_q = {4096: 109, 8192: 218, 16384: 438}
    for p in he.PRESETS.values():
        assert sum(p.coeff_mod_bit_sizes) <= max_log_q[p.poly_modulus_degree], p.name


def test_evaluation_context_carries_no_keys(key):
    data = key.evaluation_context()
    ctx = ts.context_from(data)
    assert not ctx.is_private()
    assert not ctx.has_public_key() and not ctx.has_relin_keys() and not ctx.has_galois_keys()
    assert len(data) < 1024  # parameters only


def test_server_refuses_context_with_secret_key(key):
    with_secret = context_with_secret_key(key.preset)
    with pytest.raises(he.SecretKeyInContextError, match="secret key"):
        he.EvaluationContext(with_secret, key.preset)


def test_server_refuses_mismatched_or_garbage_context():
    fast, paper = he.ClientKey("fast"), he.ClientKey("paper")
    with pytest.raises(he.HEError, match="do not match preset 'paper'"):
        he.EvaluationContext(fast.evaluation_context(), "paper")
    with pytest.raises(he.HEError, match="could not be read"):
        he.EvaluationContext(b"\x00garbage" * 10, "fast")
    ev = he.EvaluationContext(fast.evaluation_context(), "fast")
    with pytest.raises(he.HEError, match="not a ciphertext"):
        ev.load([paper.encrypt(np.ones(3))[0].serialize()])


def test_encrypt_decrypt_roundtrip_uses_as_few_ciphertexts_as_possible(key):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(2 * key.preset.values_per_ciphertext + 5) * 3
    cts = key.encrypt(x)
    assert len(cts) == 3  # two values per complex slot: N values per ciphertext
    out = key.decrypt(key.deserialize([c.serialize() for c in cts]), x.size)
    tol = 1e-6 if key.preset.name == "fast" else 1e-2
    assert np.abs(out - x).max() < tol


def test_precomputed_zero_encryptions_give_the_same_values_and_are_used_once():
    key = he.ClientKey("fast", flooding=False)
    key.prepare(2)
    assert len(key._zeros) == 2
    x = np.linspace(-4, 4, key.preset.values_per_ciphertext)
    a, b = key.encrypt(x)[0], key.encrypt(x)[0]
    assert len(key._zeros) == 0
    assert a.serialize() != b.serialize()  # distinct randomness
    assert np.abs(key.decrypt([a], x.size) - x).max() < 1e-6
    assert np.abs(key.decrypt(key.deserialize([b.serialize()]), x.size) - x).max() < 1e-6


def test_refuses_to_encrypt_nan():
    with pytest.raises(he.HEError, match="NaN"):
        he.ClientKey("fast").encrypt(np.array([1.0, np.nan]))


@pytest.mark.parametrize("mode", ["full", "min-distortion"])
def test_server_update_on_encrypted_latent_matches_plaintext(key, mode):
    """The server's update through a keyless context, decrypted by the client (TenSEAL is the oracle)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 16, 16))
    offset = rng.standard_normal(x.shape) * 0.1
    mask = None if mode == "full" else min_distortion_mask(x, 0.1)
    latent = encrypt_latent(x, mask, key)
    server = he.EvaluationContext(key.evaluation_context(), key.preset)
    wire = [c.serialize() for c in latent.ciphertexts]
    latent.ciphertexts = server.load(wire)
    scalar = 0.97 if key.preset.server_multiplies else 1.0
    updated = update_latent(latent, server, scalar, offset)
    updated.ciphertexts = key.deserialize([c.serialize() for c in updated.ciphertexts])
    got = decrypt_latent(updated, key)
    tol = 1e-6 if key.preset.name == "fast" else 1e-2
    assert np.abs(got - (scalar * x + offset)).max() < tol


def test_fast_preset_refuses_server_multiplication():
    key = he.ClientKey("fast")
    server = he.EvaluationContext(key.evaluation_context(), "fast")
    cts = server.load([c.serialize() for c in key.encrypt(np.ones(4))])
    with pytest.raises(he.HEError, match="only supports additions"):
        server.affine_update(cts, 0.5, np.ones(4))


def test_mask_packing_and_value_merge_roundtrip():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 9, 7))
    mask = rng.random(x.shape) < 0.8
    bits = pack_mask(mask)
    assert bits.nbytes == (x.size + 7) // 8
    assert np.array_equal(unpack_mask(bits, x.shape), mask)
    enc, plain = split_values(x, mask)
    assert np.array_equal(merge_values(x.shape, mask, enc, plain), x)
    with pytest.raises(ValueError, match="needs"):
        unpack_mask(bits[:-1], x.shape)


def test_server_refuses_context_with_unneeded_public_keys():
    preset = he.get_preset("fast")
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS, preset.poly_modulus_degree, coeff_mod_bit_sizes=list(preset.coeff_mod_bit_sizes)
    )
    ctx.global_scale = preset.scale
    ctx.make_context_public()
    with pytest.raises(he.HEError, match="keys the server does not use"):
        he.EvaluationContext(ctx.serialize(), preset)


def test_exportable_key_roundtrips_in_memory_and_keeps_its_fingerprint():
    key = he.ClientKey("fast", exportable=True)
    blob = key.export_secret()
    again = he.ClientKey("fast", secret=blob)
    assert again.fingerprint == key.fingerprint and len(key.fingerprint) == 20
    x = np.linspace(-3, 3, 100)
    got = again.decrypt(again.deserialize([c.serialize() for c in key.encrypt(x)]), x.size)
    assert np.abs(got - x).max() < 1e-6 + 8 * again.flood_sigma  # flooded by default
    other = he.ClientKey("fast", exportable=True)
    assert other.fingerprint != key.fingerprint
    with pytest.raises(he.HEError, match="not for preset 'paper'"):
        he.ClientKey("paper", secret=blob)
    with pytest.raises(he.HEError, match="could not be read"):
        he.ClientKey("fast", secret=b"\x00" * 64)
    with pytest.raises(he.HEError, match="no secret key"):
        he.ClientKey("fast", secret=he.preset_parameter_bytes(he.get_preset("fast")))
    throwaway = he.ClientKey("fast")
    assert throwaway.fingerprint.startswith("ephemeral-")
    with pytest.raises(he.HEError, match="throwaway"):
        throwaway.export_secret()
