"""GEAR-L (lacache_core/gear.py): KIVI's quantization plus a low-rank approximation of each block's error.

The rule is re-derived here from scratch (fake quantization as KIVI defines it, the error's truncated SVD in
float64 with numpy, and the reference's power iteration as a cross-check), and the cache's next step is checked
against a from-scratch decoder step on keys and values compressed that way."""
import json

import pytest
import torch
import transformers
from packaging.version import Version

from lacache_core import METHODS, CompressedCache, ConfigError, build_policy, enable_position_shift
from lacache_core import GEAR
from lacache_core.gear import GEARStore
from lacache_core import KIVI
from lacache_core.versions import with_cache
from references import evicted_next_step, fake_quant, gear_block, gear_reference, per_head_gather
from tiny import fill_and_generate, method_files, manual_next_logits, ppl_killed_then_resumed, tiny_model

pytestmark = pytest.mark.skipif(Version(transformers.__version__) < Version("4.36"),
                                reason="cache objects need transformers >= 4.36")
TOKENS = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(3))


def power_iteration(error, rank, loops, seed=0):
    """The reference's (``headwise_lrap``) power iteration, seeded: ``Q`` orthonormal over tokens, ``P = E^T Q``."""
    e = error.double()
    p = torch.rand(*e.shape[:-2], e.shape[-1], rank, generator=torch.Generator().manual_seed(seed), dtype=e.dtype)
    for _ in range(loops):
        q = torch.linalg.qr(e @ torch.linalg.qr(p).Q).Q
        p = e.transpose(-1, -2) @ q
    return (q @ p.transpose(-1, -2)).to(error.dtype)


def filled(config, key, value):
    store = config.store_class(config, key, value)
    store.compress()
    return store


def test_a_rank_one_error_is_corrected_exactly():
    # 2 bits over [0, 3]: step 1, so integer entries are exact. Keys: tokens 0 and 1 pin each channel's min 0 and
    # max 3; the others are 1 or 2 plus u_t * w_j (|u_t w_j| < 0.5, so inside (0, 3) and rounding back to the
    # integer), so the key error is exactly outer(u, w). Values: in each group of 8 channels, channels 0 and 1 pin
    # min 0 and max 3 per token, the others are 1 or 2 plus s_t * z_j; the error is outer(s, z).
    g = torch.Generator().manual_seed(0)
    n, d = 8, 16
    ints = torch.randint(1, 3, (n, d), generator=g).float()
    u = torch.rand(n, generator=g) * 1.2 - 0.6
    w = torch.rand(d, generator=g) * 1.2 - 0.6
    u[:2] = 0
    ints[0], ints[1] = 0.0, 3.0
    key = (ints + torch.outer(u, w))[None, None]
    s = torch.rand(n, generator=g) * 1.2 - 0.6
    z = torch.rand(d, generator=g) * 1.2 - 0.6
    z[[0, 1, 8, 9]] = 0
    vints = torch.randint(1, 3, (n, d), generator=g).float()
    vints[:, [0, 8]], vints[:, [1, 9]] = 0.0, 3.0
    value = (vints + torch.outer(s, z))[None, None]
    assert torch.allclose(key[0, 0] - fake_quant(key, 2, 2)[0, 0], torch.outer(u, w), atol=1e-6)  # rank 1 by build
    gear = filled(GEAR(bits=2, group=8, residual=0, rank=1), key, value)
    kivi = filled(KIVI(bits=2, group=8, residual=0), key, value)
    assert gear.key.shape[2] == 0 and gear.key_codes.shape[2] == n  # the whole block is quantized
    gk, gv = gear.view()
    kk, kv = kivi.view()
    assert torch.allclose(gk, key, atol=1e-5) and torch.allclose(gv, value, atol=1e-5)
    assert (kk - key).abs().max() > 0.1 and (kv - value).abs().max() > 0.1
    assert torch.equal(gear.key_codes, kivi.key_codes) and torch.equal(gear.value_codes, kivi.value_codes)


@pytest.mark.parametrize("bits,rank", [(2, 1), (2, 2), (4, 4)])
def test_factors_are_the_errors_truncated_svd_and_never_worse_than_kivi(bits, rank):
    g = torch.Generator().manual_seed(bits + rank)
    key, value = torch.randn(2, 3, 40, 16, generator=g), torch.randn(2, 3, 40, 16, generator=g)
    config = GEAR(bits=bits, group=8, residual=8, rank=rank)
    gear, kivi = filled(config, key, value), filled(KIVI(bits, 8, 8), key, value)
    assert gear.key_codes.shape[2] == 32 and gear.key_lr_b.shape == (2, 3, 4, rank, 16)
    assert gear.key_lr_a.shape == (2, 3, 32, rank)
    gk, gv = gear.view()
    kk, kv = kivi.view()
    ek, ev = gear_reference(key, value, config)
    assert torch.allclose(gk, ek, atol=1e-5) and torch.allclose(gv, ev, atol=1e-5)
    for i in range(0, 32, 8):  # per block and head: the Frobenius error is at most KIVI's, strictly less here
        block = slice(i, i + 8)
        for got, kivi_view, x in ((gk, kk, key), (gv, kv, value)):
            gear_err = (got[:, :, block] - x[:, :, block]).norm(dim=(-2, -1))
            kivi_err = (kivi_view[:, :, block] - x[:, :, block]).norm(dim=(-2, -1))
            assert bool((gear_err < kivi_err).all())
    # the token-side factor is orthonormal per block (U_r), as the reference's QR'd Q
    a = gear.key_lr_a[:, :, :8]
    assert torch.allclose(a.transpose(-1, -2) @ a, torch.eye(rank).expand(2, 3, rank, rank), atol=1e-5)
    # the reference's power iteration converges to the same correction
    error = key[:, :, :8] - fake_quant(key[:, :, :8], bits, 2)
    stored = gear.key_lr_a[:, :, :8] @ gear.key_lr_b[:, :, 0]
    assert torch.allclose(power_iteration(error, rank, loops=200), stored, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 4])
def test_next_step_matches_a_from_scratch_step_on_gear_compressed_keys(bits):
    model = enable_position_shift(tiny_model("llama", "eager"))
    config = GEAR(bits=bits, group=8, residual=16, rank=2)
    plain = CompressedCache(build_policy("lacache", cache_size=1000, span=2), 6, key_rotation="every_step")
    quantized = CompressedCache(build_policy("lacache", cache_size=1000, span=2), 6, quant=config)
    kivi = CompressedCache(build_policy("lacache", cache_size=1000, span=2), 6, quant=KIVI(bits, 8, 16))
    with torch.no_grad():
        for cache in (plain, quantized, kivi):
            model(TOKENS[:, :90], use_cache=True, **with_cache(cache))
        kv = [gear_reference(*plain._layer(i), config) for i in range(6)]  # un-rotated keys
        expected = manual_next_logits(model, int(TOKENS[0, 90]), kv)
        got = model(TOKENS[:, 90:91], use_cache=True, **with_cache(quantized)).logits[0, -1]
        kivi_logits = model(TOKENS[:, 90:91], use_cache=True, **with_cache(kivi)).logits[0, -1]
    assert all(isinstance(s, GEARStore) for s in quantized._stores)
    assert torch.allclose(got, expected, atol=1e-5)
    assert (got - kivi_logits).abs().max() > 1e-4  # the correction matters
    assert kivi.kv_bytes() < quantized.kv_bytes() < plain.kv_bytes()


def test_eviction_keeps_codes_and_factor_rows_and_counts_bytes():
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(1, 2, 70, 16, generator=g), torch.randn(1, 2, 70, 16, generator=g)
    config = GEAR(bits=4, group=8, residual=16, rank=2)
    store = GEARStore(config, k[:, :, :50], v[:, :, :50])
    store.compress()
    for t in range(50, 70):
        store.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        store.compress()
    assert store.key_codes.shape[2] == 56 and store.key.shape[2] == 14
    # bytes before eviction: 7 whole blocks of 8 and 14 residual tokens. KIVI's (packed 4-bit codes, int32 block
    # ids, key blocks' min and scale, value groups' min and scale, the float32 residual), plus the float32 factor
    # rows per token (rank 2, keys and values) and factors per block (2 x 16, keys and values)
    kivi_bytes = 2 * 2 * 56 * 8 + 2 * 56 * 4 + 2 * 2 * 7 * 16 * 4 + 2 * 2 * 56 * 2 * 4 + 2 * 2 * 14 * 16 * 4
    assert store.nbytes() == kivi_bytes + 2 * 2 * 56 * 2 * 4 + 2 * 2 * 7 * 2 * 16 * 4
    assert kivi_bytes < store.nbytes() < 2 * 2 * 70 * 16 * 4  # more than KIVI's, less than float32
    rows_k, rows_v = store.key_lr_a.clone(), store.value_lr_a.clone()
    expect_k, expect_v = per_head_gather(store)
    after_k, after_v = store.view()
    assert store.key_codes.shape[2] == 24 and store.key.shape[2] == 10
    # kept quantized tokens: the same codes, factor rows and block factors, so the same numbers, bit for bit
    assert torch.equal(store.key_lr_a[0, 0, :20], rows_k[0, 0, 0:40:2])
    assert torch.equal(store.value_lr_a[0, 1], rows_v[0, 1, :24])
    assert torch.equal(after_k[:, 1], expect_k[:, 1]) and torch.equal(after_v[:, 1], expect_v[:, 1])
    assert torch.equal(after_k[:, 0, :20], expect_k[:, 0, :20]) and torch.equal(after_v[:, 0, :20], expect_v[:, 0, :20])
    assert torch.equal(after_k[:, 0, 24:], expect_k[:, 0, 24:])
    # head 0's first 4 kept residual tokens fill the gap: a block of their own, under the GEAR rule
    fresh_k, fresh_v = gear_block(k[:, :1, 56:60], v[:, :1, 56:60], config)
    assert torch.allclose(after_k[:, :1, 20:24], fresh_k, atol=1e-5)
    assert torch.allclose(after_v[:, :1, 20:24], fresh_v, atol=1e-5)
    assert store.key_low.shape[2] == 6 and store.key_lr_b.shape[2] == 6
    # bytes after: as test_quant.py's KIVI count, plus the factors of the 24 quantized tokens and the 6 blocks they
    # use. (Blocks thinned by eviction keep whole factors: here, at head_dim 16, more than the float32 tokens.)
    kivi_bytes = 2 * 2 * 24 * 8 + 2 * 24 * 4 + 2 * 2 * 6 * 16 * 4 + 2 * 2 * 24 * 2 * 4 + 2 * 2 * 10 * 16 * 4
    assert store.nbytes() == kivi_bytes + 2 * 2 * 24 * 2 * 4 + 2 * 2 * 6 * 2 * 16 * 4


@pytest.mark.parametrize("method", ["lacache", "h2o", "streamingllm"])
def test_an_evicting_gear_cache_attends_to_its_own_view(method):
    cache, got, expected = evicted_next_step(method, GEAR(bits=4, group=8, residual=16, rank=2))
    assert cache._stores[0].shape()[2] < 60
    store = cache._stores[0]
    assert store.key_lr_a.shape[2] == store.key_codes.shape[2] and store.key_lr_b.shape[2] == store.key_low.shape[2]
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("method", sorted(m for m in METHODS if m != "full"))
def test_gear_composes_with_every_method_in_generate(method):
    model = enable_position_shift(tiny_model("llama", "sdpa"))
    settings = dict(cache_size=48, start_size=4, span=2, recent_window=4, window_size=4,
                    **method_files(model.config))
    hyper = {k: v for k, v in settings.items() if k in METHODS[method].hyperparameters()}
    policy = build_policy(method, **hyper)
    order = "post_rope" if policy.prunes_channels else "pre_rope"  # ThinK prunes channels of rotated keys
    config = GEAR(bits=4, group=8, residual=16, key_order=order, rank=2)
    quantized = CompressedCache(policy, 6, quant=config)
    out = fill_and_generate(model, TOKENS[:, :60], quantized, 40)
    assert out.shape[1] == 100
    plain = CompressedCache(build_policy(method, **hyper), 6)
    fill_and_generate(model, TOKENS[:, :60], plain, 40)
    kivi = CompressedCache(build_policy(method, **hyper), 6, quant=KIVI(4, 8, 16, order))
    fill_and_generate(model, TOKENS[:, :60], kivi, 40)
    assert quantized.get_seq_length() == plain.get_seq_length()
    stores = getattr(quantized._stores[0], "heads", [quantized._stores[0]])  # per head: AdaKV, HeadKV, DuoAttention
    assert all(isinstance(store, GEARStore) for store in stores)  # the cache's quantized-store paths hold for GEAR
    # KIVI's bytes plus the factors (at head_dim 16 and a 48-slot cache thinned blocks can cost more than float32;
    # the no-eviction comparison with float32 is in the next-step test)
    assert kivi.kv_bytes() < quantized.kv_bytes()


def test_bad_gear_settings_are_one_line_errors():
    for rank in (0, -1, 9):
        with pytest.raises(ConfigError, match=f"GEAR.rank must be between 1 and GEAR.group 8, got {rank}"):
            GEAR(bits=2, group=8, residual=16, rank=rank)
    with pytest.raises(ConfigError, match="GEAR.bits must be 2, 4 or 8, got 3"):
        GEAR(bits=3)
    with pytest.raises(ConfigError, match="make_cache.quant gear stores keys before RoPE"):
        CompressedCache(build_policy("lacache", cache_size=40, span=2), 6, key_rotation="incremental", quant=GEAR())


@pytest.mark.parametrize("method", ["lacache", "h2o"])
def test_ppl_gear_resumes_to_the_same_numbers(tiny_dir, text_file, tmp_path, monkeypatch, capsys, method):  # noqa: F811
    from ppl.run import main

    common = ["--model_name_or_path", str(tiny_dir), "--dataset_name", str(text_file), "--device", "cpu",
              "--method", method, "--cache_size", "48", "--span", "2", "--num_eval_tokens", "150",
              "--quant", "gear", "--quant_bits", "2", "--quant_group", "8", "--quant_residual", "16",
              "--quant_rank", "2", "--checkpoint_every", "40"]
    assert main(common + ["--output_dir", str(tmp_path / "clean")]) == 0
    clean = next((tmp_path / "clean").iterdir())
    assert "_gear2rank2g8r16" in clean.name
    record = json.loads((clean / "run.json").read_text())
    assert record["setting"]["cache"]["quant"] == {"method": "gear", "bits": 2, "group": 8, "residual": 16, "rank": 2}
    cut = ppl_killed_then_resumed(common, tmp_path / "cut", monkeypatch)
    assert (cut / "nlls.txt").read_text() == (clean / "nlls.txt").read_text()
    kivi = common[:common.index("--quant_rank")] + common[common.index("--checkpoint_every"):]
    kivi[kivi.index("gear")] = "kivi"
    assert main(kivi + ["--output_dir", str(tmp_path / "kivi")]) == 0
    kivi_record = json.loads(next((tmp_path / "kivi").iterdir()).joinpath("run.json").read_text())
    assert kivi_record["results"]["peak_kv_bytes"] < record["results"]["peak_kv_bytes"]
    assert kivi_record["results"]["ppl"] != record["results"]["ppl"]
    capsys.readouterr()
    assert main(common[:-4] + ["--quant_rank", "0", "--output_dir", str(tmp_path / "bad")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert err == ["error: --quant_rank must be between 1 and --quant_group 8, got 0"]
