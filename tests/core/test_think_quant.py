"""ThinK under KV quantization (``--method think --quant kivi|gear --quant_key_order post_rope``): as ThinK's own
KIVI code does (SalesforceAIResearch/ThinK @ d200577, ``ThinK_kivi/models/llama_kivi_think.py``), each key keeps
only its layer's chosen channels once it is quantized, and the keys in the full-precision residual keep all."""
import pytest
import torch
import transformers
from packaging.version import Version

from lacache_core import CompressedCache, ConfigError, build_policy, enable_position_shift
from lacache_core import GEAR
from lacache_core.gear import GEARStore
from lacache_core import KIVI
from lacache_core.quant import KIVIStore, pack, unpack
from lacache_core.versions import with_cache
from references import gear_reference, kivi_reference, quantized_count
from tiny import manual_next_logits, tiny_model

pytestmark = pytest.mark.skipif(Version(transformers.__version__) < Version("4.36"),
                                reason="cache objects need transformers >= 4.36")
TOKENS = torch.randint(0, 128, (1, 140), generator=torch.Generator().manual_seed(5))
SETTINGS = dict(cache_size=40, start_size=4, window_size=8, pruning_ratio=0.5)


def test_codes_of_a_width_not_a_multiple_of_a_byte_are_packed_with_a_filled_last_byte():
    codes = torch.randint(0, 4, (3, 39), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert pack(codes, 2).shape == (3, 10)  # 39 2-bit codes: 9 full bytes and one with 3 codes
    assert torch.equal(unpack(pack(codes, 2), 2, 39), codes)
    assert torch.equal(unpack(pack(codes[:, :3] * 5, 4), 4, 3), codes[:, :3] * 5)
    assert pack(codes[:, :3] * 5, 4).shape == (3, 2)


def test_quantized_keys_keep_only_the_chosen_channels_and_the_residual_keeps_all():
    g = torch.Generator().manual_seed(1)
    key, value = torch.randn(1, 2, 40, 16, generator=g), torch.randn(1, 2, 40, 16, generator=g)
    channels = torch.tensor([[0, 2, 3, 5, 8, 9, 11, 14, 15], [1, 2, 4, 6, 7, 10, 12, 13, 15]])
    store = KIVIStore(KIVI(bits=4, group=8, residual=16, key_order="post_rope"), key, value)
    store.prune_channels(channels)
    store.compress()
    assert store.key_codes.shape[2] == 24 and store.key.shape[2] == 16  # 3 blocks of 8 quantized, 16 whole
    keys, _ = store.view()
    dropped = torch.ones(2, 16, dtype=torch.bool).scatter_(-1, channels, False)
    assert bool((keys[:, :, :24][dropped[None, :, None, :].expand(1, 2, 24, 16)] == 0).all())
    assert torch.equal(keys[:, :, 24:], key[:, :, 24:])
    for block in range(3):  # kept channels: within half a step of each block's own per-channel grid
        part = key[:, :, 8 * block:8 * block + 8]
        step = (part.amax(2, keepdim=True) - part.amin(2, keepdim=True)) / 15
        error = (keys[:, :, 8 * block:8 * block + 8] - part).abs()
        assert bool((error <= step / 2 + 1e-6)[~dropped[None, :, None, :].expand(1, 2, 8, 16)].all())
    # bytes: 9 4-bit key codes in 5 bytes, 16 value codes in 8; int32 block ids; each block's min and scale for
    # 9 channels; 2 value groups' min and scale per token; the 16-token residual in float32; the channel indices
    assert store.nbytes() == (2 * 24 * 5 + 2 * 24 * 8 + 2 * 24 * 4 + 2 * 2 * 3 * 9 * 4 + 2 * 2 * 24 * 2 * 4
                              + 2 * 2 * 16 * 16 * 4 + 2 * 9 * 8)
    with pytest.raises(RuntimeError, match="before any key is quantized"):
        store.prune_channels(channels)
    later = torch.randn(1, 2, 8, 16, generator=g)  # generated keys lose the channels too, once quantized
    for t in range(8):
        store.append(later[:, :, t:t + 1], later[:, :, t:t + 1])
        store.compress()
    keys, _ = store.view()
    assert store.key_codes.shape[2] == 32 and bool((keys[:, :, 24:32][dropped[None, :, None, :].expand(1, 2, 8, 16)] == 0).all())
    assert torch.equal(keys[:, :, 32:], torch.cat([key[:, :, 32:], later], 2))


def test_gear_key_factors_are_capped_at_the_channels_kept():
    # two channels kept, rank 4: the key factors hold rank 2, which already gives the kept channels back exactly
    g = torch.Generator().manual_seed(2)
    key, value = torch.randn(1, 2, 24, 16, generator=g), torch.randn(1, 2, 24, 16, generator=g)
    store = GEARStore(GEAR(bits=2, group=8, residual=8, key_order="post_rope", rank=4), key, value)
    store.prune_channels(torch.tensor([[3, 9], [0, 15]]))
    store.compress()
    assert store.key_lr_a.shape[-1] == 2 and store.key_lr_b.shape[-2:] == (2, 2) and store.value_lr_a.shape[-1] == 4
    keys, _ = store.view()
    for h, kept in enumerate(([3, 9], [0, 15])):
        torch.testing.assert_close(keys[0, h, :16, kept], key[0, h, :16, kept], atol=1e-5, rtol=0)


def prompt_then_steps(cache, model, steps=0):
    with torch.no_grad():
        model(TOKENS[:, :120], use_cache=True, **with_cache(cache))
        for t in range(120, 120 + steps):
            model(TOKENS[:, t:t + 1], use_cache=True, **with_cache(cache))


def reference_layer(key, value, channels, config):
    """ThinK-KIVI's rule on rotated keys: the quantized tokens' keys over the kept channels only (dropped ones
    zero), the residual whole; KIVI's (or GEAR-L's) rule re-derived by the tests of quant and gear."""
    b, h, n, d = key.shape
    index = channels[None, :, None, :].expand(b, h, n, -1)
    reference = gear_reference if isinstance(config, GEAR) else kivi_reference
    pruned, values = reference(key.gather(-1, index), value, config)
    m = quantized_count(n, config)
    quantized = key.new_zeros(b, h, m, d).scatter_(-1, index[:, :, :m], pruned[:, :, :m])
    return torch.cat([quantized, key[:, :, m:]], 2), values


@pytest.mark.parametrize("config", [KIVI(bits=2, group=8, residual=16, key_order="post_rope"),
                                    KIVI(bits=4, group=8, residual=16, key_order="post_rope"),
                                    GEAR(bits=2, group=8, residual=16, key_order="post_rope", rank=2)],
                         ids=["kivi2", "kivi4", "gear2"])
def test_next_step_matches_a_from_scratch_step_on_pruned_quantized_keys(config):
    model = enable_position_shift(tiny_model("llama", "eager"))
    L = model.config.num_hidden_layers
    think = CompressedCache(build_policy("think", **SETTINGS), L, quant=config)
    plain_think = CompressedCache(build_policy("think", **SETTINGS), L)  # the channels ThinK alone chooses
    snap = CompressedCache(build_policy("snapkv", **SETTINGS), L, key_rotation="incremental")  # rotated, whole
    snap_quant = CompressedCache(build_policy("snapkv", **SETTINGS), L, quant=config)
    for cache in (think, plain_think, snap, snap_quant):
        prompt_then_steps(cache, model)
    kv = []
    for i in range(L):
        channels = think._stores[i].channels
        assert torch.equal(channels, plain_think._stores[i].channels)
        assert think._stores[i].key_codes.shape[2] > 0  # some keys are quantized, hence pruned
        kv.append(reference_layer(*snap._layer(i), channels, config))
    with torch.no_grad():
        expected = manual_next_logits(model, int(TOKENS[0, 120]), kv, query_pos=120,
                                      key_positions=snap.kept_positions(), rotated=True)
        got = model(TOKENS[:, 120:121], use_cache=True, **with_cache(think)).logits[0, -1]
        unpruned = model(TOKENS[:, 120:121], use_cache=True, **with_cache(snap_quant)).logits[0, -1]
    assert torch.allclose(got, expected, atol=1e-5)
    assert (got - unpruned).abs().max() > 1e-4  # the pruning changes the answer
    assert think.kv_bytes() < snap_quant.kv_bytes()


def test_generated_keys_are_pruned_once_quantized_and_read_at_their_positions():
    # 17 decode steps after 40 kept prompt tokens: 57 held, the oldest 48 quantized, generated ones among them (the
    # full-precision keys they had are gone, so the step is checked against what the store holds)
    model = enable_position_shift(tiny_model("llama", "eager"))
    config = KIVI(bits=4, group=8, residual=16, key_order="post_rope")
    think = CompressedCache(build_policy("think", **SETTINGS), 6, quant=config)
    prompt_then_steps(think, model, steps=17)
    kv = [think._stores[i].view() for i in range(6)]
    for i, (key, _) in enumerate(kv):
        dropped = torch.ones(2, 16, dtype=torch.bool).scatter_(-1, think._stores[i].channels, False)
        assert think._stores[i].key_codes.shape[2] == 48
        assert bool((key[:, :, 40:48][dropped[None, :, None, :].expand(1, 2, 8, 16)] == 0).all())
        assert bool((key[:, :, 48:].abs().sum(-2) > 0).all())  # the residual keeps every channel
    with torch.no_grad():
        expected = manual_next_logits(model, int(TOKENS[0, 137]), kv, query_pos=137,
                                      key_positions=think.kept_positions(), rotated=True)
        got = model(TOKENS[:, 137:138], use_cache=True, **with_cache(think)).logits[0, -1]
    assert torch.allclose(got, expected, atol=1e-5)


def test_think_needs_keys_quantized_after_rope():
    with pytest.raises(ConfigError, match="make_cache.method think prunes channels of rotated keys: with make_cache.quant kivi "
                                          "use KIVI.key_order post_rope"):
        CompressedCache(build_policy("think", **SETTINGS), 6, quant=KIVI(4, 8, 16))


def test_longbench_runs_think_quantized_in_fewer_bytes_and_names_the_flag_when_keys_are_pre_rope(
        tiny_dir, data_dir, tmp_path, capsys):  # noqa: F811
    from runs import read
    from runs import run_longbench as run

    quant = ("--quant", "kivi", "--quant_bits", "2", "--quant_group", "8", "--quant_residual", "16")
    think = ("--method", "think", "--budget", "0.5", "--pruning_ratio", "0.5")
    assert run(tiny_dir, data_dir, tmp_path / "q", *think, *quant, "--quant_key_order", "post_rope",
               "--unpruned_window", "8") == 0
    assert "note: --unpruned_window is ignored with --quant" in capsys.readouterr().err
    assert run(tiny_dir, data_dir, tmp_path / "p", *think) == 0
    quantized, plain = (next((tmp_path / side / "pred").iterdir()) for side in ("q", "p"))
    assert quantized.name.startswith("tiny__think_b0.5_") and "kivi2g8r16_postrope" in quantized.name
    for q, p in zip(read(quantized / "hotpotqa.jsonl"), read(plain / "hotpotqa.jsonl")):
        assert q["_id"] == p["_id"] and q["final_kv_bytes"] < p["final_kv_bytes"]
    capsys.readouterr()
    assert run(tiny_dir, data_dir, tmp_path / "bad", *think, *quant) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert err == ["error: --method think prunes channels of rotated keys: with --quant kivi use --quant_key_order "
                   "post_rope"]
