"""Key recovery from CKKS decryptions (Li-Micciancio) and the defence: noise-flooded decryption, a bound on
decryptions per key, automatic key rotation (common/he.py, common/flooding.py; docs/key-recovery.md).

The attack runs twice: on real TenSEAL ciphertexts (sealapi exposes the ciphertext's and the secret key's
polynomials in NTT form, where the negacyclic system ``c1 * s = Encode(m') - c0`` is diagonal), and on a small
self-contained CKKS (tests/toy_ckks.py) where the recovered key can also be used to decrypt.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
from tenseal import sealapi

from hediff.common import flooding, he
from hediff.common.latent import decrypt_latent, encrypt_latent, update_latent
from hediff.common.schedulers import SCHEDULER_NAMES, build_plan
from hediff.desktop.core.engine import GenerationParams
from hediff.desktop.core.keystore import CorruptKeyFile, DeviceKeys, MemoryKeyring, SecretStore
from tests.toy_ckks import ToyCKKS, recover_secret

# --- the attack on real TenSEAL ciphertexts ---------------------------------------------------------------------


def _words(dyn_array, start: int, count: int) -> list[int]:
    return [dyn_array[i] for i in range(start, start + count)]


def seal_attack(preset: he.HEPreset, returned: he.Ciphertext, decrypted: np.ndarray) -> list[int]:
    """What the server can do with the ciphertext it returned and the values the client showed it: re-encode them
    (SEAL's own encoder, at the ciphertext's level and scale) and divide out c1, coefficient by coefficient in
    SEAL's NTT domain, where c0 + c1 * s is computed pointwise. Returns s in NTT form modulo the first prime."""
    ctx = he._seal_context(preset)
    n = preset.poly_modulus_degree
    ct = returned.seal
    q = ctx.get_context_data(ct.parms_id()).parms().coeff_modulus()[0].value()
    plain = sealapi.Plaintext()
    half = decrypted.size // 2
    slots = (decrypted[:half] + 1j * decrypted[half:]).tolist()
    sealapi.CKKSEncoder(ctx).encode(slots, ct.parms_id(), ct.scale, plain)
    m_hat = _words(plain.dyn_array(), 0, n)
    data = ct.dyn_array()  # c0 for every prime, then c1 for every prime
    c0_hat, c1_hat = _words(data, 0, n), _words(data, n * ct.coeff_modulus_size(), n)
    return [(m - c0) * pow(c1, -1, q) % q for m, c0, c1 in zip(m_hat, c0_hat, c1_hat)]


def secret_ntt(key: he.ClientKey) -> list[int]:
    """The secret key's first-prime NTT words, read through the exported key (the test knows it; no server does)."""
    ctx = ts.context_from(key.export_secret())  # kept alive while its key's words are read
    secret = ctx.secret_key().data.data()
    return [secret.data(i) for i in range(key.preset.poly_modulus_degree)]


def server_round_trip(key, values: np.ndarray, offset: np.ndarray) -> list[he.Ciphertext]:
    """Encrypt, let a keyless server add ``offset``, hand back what it returns (the server keeps a copy)."""
    server = he.EvaluationContext(key.evaluation_context(), key.preset)
    cts = server.load([c.serialize() for c in key.encrypt(values)])
    return server.affine_update(cts, 1.0, offset)


def test_seal_exposes_what_the_attack_needs():
    key = he.ClientKey("fast", exportable=True)
    ct = key.encrypt(np.ones(8))[0].seal
    n = key.preset.poly_modulus_degree
    assert ct.is_ntt_form() and ct.size() == 2 and ct.dyn_array().size() == 2 * n * ct.coeff_modulus_size()
    assert len(secret_ntt(key)) == n


def test_unflooded_decryption_gives_the_secret_key_away_on_real_tenseal():
    key = he.ClientKey("fast", exportable=True, flooding=False)
    rng = np.random.default_rng(0)
    n_values = key.preset.values_per_ciphertext
    returned = server_round_trip(key, rng.standard_normal(n_values), rng.standard_normal(n_values) * 0.1)
    shown = key.decrypt(key.deserialize([returned[0].serialize()]), n_values)
    recovered = seal_attack(key.preset, returned[0], shown)
    assert recovered == secret_ntt(key)  # every coefficient, exactly: one decryption is enough


def test_flooded_decryption_does_not_give_the_key_away_on_real_tenseal():
    key = he.ClientKey("fast", exportable=True)  # the product's default: flooded
    assert key.flood_sigma > 0
    rng = np.random.default_rng(0)
    n_values = key.preset.values_per_ciphertext
    returned = server_round_trip(key, rng.standard_normal(n_values), rng.standard_normal(n_values) * 0.1)
    shown = key.decrypt(key.deserialize([returned[0].serialize()]), n_values)
    recovered, secret = seal_attack(key.preset, returned[0], shown), secret_ntt(key)
    assert sum(r == s for r, s in zip(recovered, secret)) < 10  # of 4096: nothing beyond chance


# --- the attack on the toy CKKS, where the recovered key can be tried ------------------------------------------


@pytest.fixture
def toy():
    return ToyCKKS(rng=np.random.default_rng(7))


def toy_flood_sigma(toy: ToyCKKS, s: np.ndarray, decryptions: int) -> float:
    """The product's rule (common.flooding.flood_sigma) for the toy: its decryption error measured the same way
    as bench/flooding.py measures the presets', the same margin, and the fast preset's kappa."""
    rng = np.random.default_rng(3)
    rms = []
    for _ in range(5):
        x = rng.standard_normal(toy.p.n)
        rms.append(np.sqrt(np.mean((toy.decrypt(s, toy.add_plain(toy.encrypt(s, x), 0.1 * x)) - 1.1 * x) ** 2)))
    bound = he.ERROR_MARGIN * max(rms) * np.sqrt(toy.p.n)
    return flooding.flood_sigma(bound, decryptions, he.get_preset("fast").flood_kappa)


def test_toy_attack_recovers_the_key_exactly_without_flooding(toy):
    s = toy.keygen()
    x = np.random.default_rng(1).standard_normal(toy.p.n)
    returned = toy.add_plain(toy.encrypt(s, x), np.full(toy.p.n, 0.25))
    shown = toy.decrypt(s, returned)
    assert np.abs(shown - (x + 0.25)).max() < 1e-3  # a correct decryption
    recovered = recover_secret(toy, returned, shown)
    assert list(recovered) == list(s)
    fresh_values = np.random.default_rng(2).standard_normal(toy.p.n)
    fresh = toy.encrypt(s, fresh_values)
    assert np.abs(toy.decrypt(recovered, fresh) - fresh_values).max() < 1e-3  # the server can now read anything


def test_toy_attack_fails_with_the_products_flooding(toy):
    s = toy.keygen()
    sigma = toy_flood_sigma(toy, s, decryptions=2)
    x = np.random.default_rng(1).standard_normal(toy.p.n)
    returned = toy.add_plain(toy.encrypt(s, x), np.full(toy.p.n, 0.25))
    shown = toy.decrypt(s, returned, flood_sigma=sigma)
    assert np.abs(shown - (x + 0.25)).max() < 10 * sigma  # still the right values, to within the flood
    recovered = recover_secret(toy, returned, shown)
    assert list(recovered) != list(s)
    assert np.abs(recovered.astype(float)).max() > 1000  # not even a small (ternary-like) key
    fresh_values = np.random.default_rng(2).standard_normal(toy.p.n)
    garbage = toy.decrypt(recovered, toy.encrypt(s, fresh_values))
    assert np.abs(garbage - fresh_values).max() > 1.0


# --- flooding on the product path ------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(he.PRESETS))
def test_product_decryption_is_flooded_by_default_with_the_documented_spread(preset):
    key = he.ClientKey(preset)
    p = key.preset
    expected = 2 ** (p.flood_kappa / 2) * np.sqrt(p.max_decryptions) * p.decryption_error_norm
    assert key.flood_sigma == pytest.approx(expected) and key.flood_sigma > 10 * p.decryption_error_rms
    x = np.random.default_rng(0).standard_normal(p.values_per_ciphertext)
    ct = key.encrypt(x)
    a, b = key.decrypt(ct, x.size), key.decrypt(ct, x.size)
    diff = a - b  # two independent floods: N(0, 2 sigma^2)
    assert not np.array_equal(a, b)
    assert np.std(diff) / np.sqrt(2) == pytest.approx(key.flood_sigma, rel=0.05)
    assert abs(np.mean(diff)) < 5 * key.flood_sigma * np.sqrt(2 / diff.size)
    assert np.abs(a - x).max() < 7 * key.flood_sigma + 1e-3  # still the values


def test_flooding_can_be_turned_off_for_tests_and_the_attack():
    key = he.ClientKey("fast", flooding=False)
    ct = key.encrypt(np.linspace(-1, 1, 50))
    assert key.flood_sigma == 0 and np.array_equal(key.decrypt(ct, 50), key.decrypt(ct, 50))


def test_gaussian_sampler_has_the_asked_spread():
    z = flooding.gaussian(200_001, 3.0)
    assert z.shape == (200_001,)
    assert np.std(z) == pytest.approx(3.0, rel=0.01) and abs(np.mean(z)) < 0.03
    assert np.mean(np.abs(z) > 6.0) == pytest.approx(0.0455, abs=0.003)  # two sigma: 4.55 % of a Gaussian
    assert not np.array_equal(flooding.gaussian(16, 1.0), flooding.gaussian(16, 1.0))


def test_flood_size_and_kept_security_follow_the_stated_formulas():
    assert flooding.flood_sigma(1e-8, 64, 6) == pytest.approx(2**3 * 8 * 1e-8)
    assert flooding.key_recovery_bits(300) == pytest.approx(128.0)
    assert flooding.key_recovery_bits(0) == pytest.approx((128**0.5 - (1 / (2 * np.log(2))) ** 0.5) ** 2)
    assert flooding.key_recovery_bits(-20) == 0.0
    assert flooding.key_recovery_bits(he.get_preset("fast").flood_kappa) > 125
    with pytest.raises(ValueError, match="positive"):
        flooding.flood_sigma(0.0, 1, 10)


# --- the decryption bound and rotation -------------------------------------------------------------------------


def test_plain_key_refuses_past_its_bound_naming_it_and_changes_nothing():
    key = he.ClientKey("fast", max_decryptions=3)
    ct = key.encrypt(np.ones(10))
    for _ in range(3):
        key.decrypt(ct, 10)
    with pytest.raises(he.DecryptionLimitError, match="at most 3 ciphertexts"):
        key.decrypt(ct, 10)
    assert key.decryptions == 3
    two = key.encrypt(np.ones(2 * key.preset.values_per_ciphertext))
    fresh = he.ClientKey("fast", max_decryptions=1)
    with pytest.raises(he.DecryptionLimitError, match="at most 1 ciphertexts"):
        fresh.decrypt(fresh.deserialize([c.serialize() for c in two]), 2 * key.preset.values_per_ciphertext)
    assert fresh.decryptions == 0  # all or nothing
    with pytest.raises(ValueError, match="max_decryptions"):
        he.ClientKey("fast", max_decryptions=0)


def test_every_sampler_decrypts_each_ciphertext_at_most_twice_and_only_recent_ones(tiny_model_dir):
    config = json.loads((Path(tiny_model_dir) / "scheduler" / "scheduler_config.json").read_text())
    for name in SCHEDULER_NAMES:
        for steps in (1, 2, 3, 7, 25):
            plan = build_plan(name, config, steps)
            uses = np.bincount([s.pivot for s in plan.steps])
            assert uses.max() <= he.DECRYPTIONS_PER_CIPHERTEXT, (name, steps)
            assert max(s.index - s.pivot for s in plan.steps) < 4, (name, steps)  # RotatingKey keeps 4 calls


@pytest.mark.parametrize("preset", sorted(he.PRESETS))
def test_rotating_key_decrypts_old_and_new_ciphertexts_and_keeps_every_bound(preset):
    key = he.RotatingKey(preset, max_decryptions=4)  # two ciphertexts per key
    p = key.preset
    server = he.EvaluationContext(key.evaluation_context(), preset)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, p.values_per_ciphertext // 2 + 1))  # 2 ciphertexts per latent
    tol = 1e-6 + 8 * key.flood_sigma if preset == "fast" else 0.05
    sent = []
    for step in range(5):
        key.prepare(2)
        latent = encrypt_latent(x + step, None, key)
        latent.ciphertexts = server.load([c.serialize() for c in latent.ciphertexts])
        sent.append(latent)
        for pivot in ([step - 1] if step == 1 else []) + [step]:  # PLMS: the first latent is used twice
            scalar = 0.9 if p.server_multiplies else 1.0
            back = update_latent(sent[pivot], server, scalar, np.ones(x.shape))
            back.ciphertexts = key.deserialize([c.serialize() for c in back.ciphertexts])
            assert np.abs(decrypt_latent(back, key) - (scalar * (x + pivot) + 1)).max() < tol
    assert key.rotations >= 4 and len(set(key.fingerprints)) == key.rotations + 1
    assert key.decryptions == 12
    stranger = he.ClientKey(preset).encrypt(np.ones(3))
    with pytest.raises(he.HEError, match="not made under any key"):
        key.decrypt(stranger, 3)
    with pytest.raises(he.HEError, match="not made under any key"):  # too old: its key was let go
        key.decrypt(key.deserialize([c.serialize() for c in sent[0].ciphertexts]), x.size)


def test_rotating_key_refuses_a_bound_below_two_and_decrypts_an_empty_part():
    with pytest.raises(ValueError, match="at least 2"):
        he.RotatingKey("fast", max_decryptions=1)
    key = he.RotatingKey("fast")
    assert key.encrypt(np.zeros(0)) == [] and key.decrypt([], 0).size == 0  # min-distortion, all in plaintext
    assert he.ClientKey("fast").decrypt([], 0).size == 0


@pytest.mark.parametrize("preset", sorted(he.PRESETS))
def test_generation_past_the_bound_rotates_and_gives_the_right_latent(generator, preset):
    base = dict(prompt="a red circle", steps=6, seed=3, scheduler="plms", he_preset=preset)
    plain = generator.generate(GenerationParams(**base, encryption="none"))
    key = he.RotatingKey(preset, max_decryptions=4)
    result = generator.generate(GenerationParams(**base), key=key)
    assert key.decryptions == 7 > 4 and key.rotations >= 2  # PLMS: 7 UNet calls, one ciphertext each
    tol = 1e-3 if preset == "fast" else 0.25  # paper: scale 2^26 plus its flood, amplified by the model
    assert np.abs(result.latent - plain.latent).max() < tol


def test_engine_floods_by_default(generator):
    params = GenerationParams(prompt="a red circle", steps=3, seed=1, scheduler="ddim")
    a, b = generator.generate(params), generator.generate(params)
    assert a.key_fingerprint.startswith("ephemeral-")
    # unflooded, two runs differ only by fresh CKKS noise (~1e-9 at the fast preset); flooded, by far more
    assert 1e-7 < np.abs(a.latent - b.latent).max() < 1e-3


# --- the stored device key -------------------------------------------------------------------------------------


@pytest.fixture
def device_keys(tmp_path) -> DeviceKeys:
    return DeviceKeys(tmp_path, SecretStore(MemoryKeyring()))


def test_device_key_count_survives_restarts_and_the_bound_holds(tmp_path, device_keys):
    key = device_keys.get_or_create("paper")  # bound 2
    x = np.ones(10)
    ct = key.encrypt(x)  # reserves 2 decryptions, recorded before the ciphertext leaves
    path = device_keys.path("paper")
    header = json.loads(path.read_text())
    assert header["spent"] == 2 and header["fingerprint"] == key.fingerprint  # kept in the wrapped key's file
    assert not device_keys.uses_path("paper").exists()  # no separate file to delete
    again = DeviceKeys(tmp_path, device_keys.secrets).load("paper")  # a new session
    assert again.fingerprint == key.fingerprint and again.decryptions == 2
    with pytest.raises(he.DecryptionLimitError, match="at most 2"):
        again.decrypt(again.deserialize([c.serialize() for c in ct]), x.size)
    device_keys.delete("paper")
    assert not path.exists()


def test_device_key_count_reset_is_detected_and_the_key_rotated(tmp_path, device_keys):
    key = device_keys.get_or_create("fast")
    key.encrypt(np.ones(10))
    path = device_keys.path("fast")
    header = json.loads(path.read_text())
    assert header["spent"] == 2
    path.write_text(json.dumps({**header, "spent": 0}))  # the attack: reset the count
    with pytest.raises(CorruptKeyFile, match="authentication failed"):
        DeviceKeys(tmp_path, device_keys.secrets).load("fast")
    stripped = {k: v for k, v in header.items() if k != "spent"}  # or drop it, posing as the old format
    path.write_text(json.dumps(stripped))
    with pytest.raises(CorruptKeyFile, match="authentication failed"):
        DeviceKeys(tmp_path, device_keys.secrets).load("fast")
    rotating = DeviceKeys(tmp_path, device_keys.secrets).rotating("fast")  # what generation uses: a new key
    assert rotating.fingerprint != key.fingerprint
    replaced = json.loads(path.read_text())
    assert replaced["fingerprint"] == rotating.fingerprint and replaced["spent"] == 0


def test_rotating_device_key_replaces_the_stored_key_at_the_bound(tmp_path, device_keys):
    first = device_keys.get_or_create("fast").fingerprint
    key = device_keys.rotating("fast")
    assert key.fingerprint == first
    x = np.random.default_rng(0).standard_normal(100)
    for _ in range(40):  # 40 ciphertexts, 2 decryptions reserved each: past the bound of 64
        ct = key.encrypt(x)
        assert np.abs(key.decrypt(ct, x.size) - x).max() < 1e-6 + 8 * key.flood_sigma
    assert key.rotations == 1 and key.fingerprints == [first, device_keys.info("fast").fingerprint]
    stored = DeviceKeys(tmp_path, device_keys.secrets).load("fast")
    assert stored.fingerprint == key.fingerprint != first and stored.spent == 2 * 8  # 32 on the first key, 8 here
