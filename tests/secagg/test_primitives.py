"""Quantisation, Shamir sharing, the graph, and the crypto primitives, each on small checkable cases."""

import numpy as np
import pytest

from fedfleet.secagg import SecAggRefused, crypto, graph, shamir
from fedfleet.secagg.masks import add_masks, keystream
from fedfleet.secagg.quantize import dequantize, quantize, quantize_weight, step


def test_quantize_maps_the_clip_range_onto_the_levels_and_clips_outside():
    rng = np.random.default_rng(0)
    q = quantize(np.array([-1.0, 0.0, 1.0, -5.0, 5.0]), 1.0, 4, np.uint32, rng)
    assert q.dtype == np.uint32
    assert q[[0, 2, 3, 4]].tolist() == [0, 15, 0, 15]
    assert q[1] in (7, 8)  # 7.5 rounds either way


def test_stochastic_rounding_is_unbiased_and_within_one_step():
    rng = np.random.default_rng(1)
    x = np.full(200_000, 0.123)
    q = quantize(x, 1.0, 8, np.uint32, rng)
    back = dequantize(q, 1, 1.0, 8)
    assert np.abs(back - x).max() < step(1.0, 8)
    assert abs(back.mean() - 0.123) < 0.1 * step(1.0, 8)


@pytest.mark.parametrize("bits", [20, 21, 40, 48])
def test_fine_levels_round_up_no_further_than_the_top_level(bits):
    # from 2**20 levels up float64 cannot hold x + u exactly: the top clip value must still stay on the top level
    top = 2**bits - 1
    q = quantize(np.full(100_000, 1.0), 1.0, bits, np.uint64, np.random.default_rng(4))
    assert q.max() == top and q.min() == top
    x = np.full(100_000, 0.3)
    back = dequantize(quantize(x, 1.0, bits, np.uint64, np.random.default_rng(5)), 1, 1.0, bits)
    assert np.abs(back - x).max() < step(1.0, bits) * 1.01


def test_the_sum_of_many_parties_dequantises_within_count_steps():
    rng = np.random.default_rng(2)
    xs = rng.uniform(-2, 2, size=(30, 5000))
    scale = 0.7
    total = sum(quantize(x, 1.5, 12, np.uint64, rng, scale=scale) for x in xs)
    true = (np.clip(xs, -1.5, 1.5) * scale).sum(axis=0)
    assert np.abs(dequantize(total, 30, 1.5, 12) - true).max() < 30 * step(1.5, 12)


def test_weight_quantisation_is_fine_and_unbiased():
    rng = np.random.default_rng(3)
    levels = (2**32 - 1) // 1000
    w = [int(quantize_weight(0.0371, levels, np.uint32, rng)[0]) for _ in range(1000)]
    assert max(abs(v / levels - 0.0371) for v in w) <= 1 / levels


def test_shamir_any_threshold_shares_rebuild_and_fewer_fail():
    secret = bytes(range(32))
    shares = shamir.split(secret, 3, [1, 2, 5, 9, 12])
    assert shamir.combine({x: shares[x] for x in (2, 9, 12)}, 3) == secret
    assert shamir.combine({x: shares[x] for x in (1, 5, 12, 9)}, 3) == secret
    with pytest.raises(ValueError, match="2 shares cannot rebuild a secret that needs 3"):
        shamir.combine({x: shares[x] for x in (1, 2)}, 3)
    # two shares of a degree-2 polynomial interpolate to a random field element: almost never 32 bytes long
    with pytest.raises(ValueError, match="inconsistent"):
        shamir.combine({x: shares[x] for x in (1, 2)}, 2)


def test_shamir_polynomials_are_fresh_and_bad_arguments_are_refused():
    secret = b"\xff" * 32
    assert shamir.split(secret, 2, [1, 2]) != shamir.split(secret, 2, [1, 2])
    assert shamir.combine(shamir.split(secret, 1, [4]), 1) == secret
    for xs, t in (([1, 1], 1), ([0, 2], 1), ([1, 2], 3)):
        with pytest.raises(ValueError):
            shamir.split(secret, t, xs)
    with pytest.raises(ValueError, match="32 bytes"):
        shamir.split(b"short", 1, [1])
    assert shamir.decode(shamir.encode(shamir.PRIME - 1)) == shamir.PRIME - 1


@pytest.mark.parametrize(("n", "k"), [(10, 4), (10, 3), (11, 4), (11, 3), (11, 10), (12, 11), (7, 1), (2, 1)])
def test_the_graph_is_regular_symmetric_and_the_same_for_everyone(n, k):
    ids = list(range(3, 3 + 2 * n, 2))
    g = graph.neighbours(ids, k, seed=42)
    d = graph.degree(n, k)
    assert d == (k + 1 if n % 2 and k % 2 else k)
    assert set(g) == set(ids)
    for i, near in g.items():
        assert len(near) == d and i not in near
        assert all(i in g[j] for j in near)
    assert g == graph.neighbours(reversed(ids), k, seed=42)
    assert all(graph.neighbours_of(ids, k, 42, i) == g[i] for i in ids)
    if d < n - 1:
        assert g != graph.neighbours(ids, k, seed=43)


def test_agreement_is_symmetric_and_keys_depend_on_every_field():
    a, b = crypto.generate(), crypto.generate()
    s = crypto.agree(a, crypto.public_bytes(b))
    assert s == crypto.agree(b, crypto.public_bytes(a)) and len(s) == 32
    base = crypto.derive(s, "s", 0, (1, 2), crypto.PAIR_MASK)
    others = [
        crypto.derive(s, "t", 0, (1, 2), crypto.PAIR_MASK),
        crypto.derive(s, "s", 1, (1, 2), crypto.PAIR_MASK),
        crypto.derive(s, "s", 0, (1, 3), crypto.PAIR_MASK),
        crypto.derive(s, "s", 0, (2, 1), crypto.PAIR_MASK),
        crypto.derive(s, "s", 0, (1, 2), crypto.SHARE),
    ]
    assert len({base, *others}) == 6


def test_a_small_order_public_key_is_refused():
    with pytest.raises(SecAggRefused, match="unusable"):
        crypto.agree(crypto.generate(), bytes(32))


def test_seal_opens_only_with_the_same_key_and_aad():
    key = crypto.derive(b"k" * 32, "s", 0, (1, 2), crypto.SHARE)
    aad = crypto.share_aad("s", 0, 1, 2)
    sealed = crypto.seal(key, b"payload", aad)
    assert crypto.unseal(key, sealed, aad) == b"payload"
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    for k, c, a in ((key, tampered, aad), (key, sealed, crypto.share_aad("s", 1, 1, 2)), (b"x" * 32, sealed, aad)):
        with pytest.raises(SecAggRefused, match="tag"):
            crypto.unseal(k, c, a)


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_masks_wrap_in_the_ring_and_cancel_across_chunks(dtype):
    k1, k2 = b"a" * 32, b"b" * 32
    n = 100_003  # not a multiple of the chunk
    acc = np.arange(n, dtype=dtype)
    add_masks(acc, [(k1, 1), (k2, -1)], chunk_bytes=4096)
    expected = np.arange(n, dtype=dtype) + keystream(k1, n, dtype) - keystream(k2, n, dtype)
    assert np.array_equal(acc, expected)
    add_masks(acc, [(k2, 1), (k1, -1)])
    assert np.array_equal(acc, np.arange(n, dtype=dtype))


def test_the_keystream_is_aes_256_ctr_from_a_zero_counter():
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = bytes(range(32))
    raw = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(80))
    assert keystream(key, 20, np.uint32).tobytes() == raw


def test_shamir_with_many_shares_any_subset_of_the_threshold_rebuilds():
    import secrets as sec

    rng = np.random.default_rng(5)
    secret = sec.token_bytes(32)
    xs = sorted(rng.choice(np.arange(1, 10_000), size=20, replace=False).tolist())
    shares = shamir.split(secret, 11, xs)
    for _ in range(5):
        pick = rng.choice(xs, size=11, replace=False).tolist()
        assert shamir.combine({x: shares[x] for x in pick}, 11) == secret
