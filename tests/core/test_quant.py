"""KIVI quantization (lacache_core/quant.py): the rule on known tensors, eviction on the codes, and the next
step of a quantized cache against a from-scratch decoder step with KIVI's rule re-derived here."""
import json

import pytest
import torch
import transformers
from packaging.version import Version

from lacache_core import METHODS, CompressedCache, ConfigError, build_policy, enable_position_shift
from lacache_core import KIVI
from lacache_core.quant import KIVIStore, pack, quantize, unpack
from lacache_core.versions import with_cache
from references import TOKENS, evicted_next_step, kivi_reference, per_head_gather
from tiny import fill_and_generate, method_files, manual_next_logits, ppl_killed_then_resumed, tiny_model

pytestmark = pytest.mark.skipif(Version(transformers.__version__) < Version("4.36"),
                                reason="cache objects need transformers >= 4.36")


def test_quantize_is_exact_on_a_grid_and_within_half_a_step_elsewhere():
    x = torch.tensor([[0.5, 1.0, 1.5, 2.0]])  # min 0.5, max 2.0: a 2-bit grid of step 0.5
    codes, low, scale = quantize(x, 2, dim=-1)
    assert codes.tolist() == [[0, 1, 2, 3]] and low.item() == 0.5 and scale.item() == 0.5
    y = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    for bits in (2, 4, 8):
        codes, low, scale = quantize(y, bits, dim=0)
        assert int(codes.max()) <= 2 ** bits - 1
        assert bool(((low + codes * scale - y).abs() <= scale / 2 + 1e-6).all())
        assert torch.equal(unpack(pack(codes, bits), bits), codes)
        assert pack(codes, bits).numel() == codes.numel() * bits // 8


def test_eviction_keeps_the_codes_and_quantizes_only_residual_tokens():
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(1, 2, 70, 16, generator=g), torch.randn(1, 2, 70, 16, generator=g)
    store = KIVIStore(KIVI(bits=4, group=8, residual=16), k[:, :, :50], v[:, :, :50])
    store.compress()
    for t in range(50, 70):
        store.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        store.compress()
    assert store.key_codes.shape[2] == 56 and store.key.shape[2] == 14  # 7 blocks of 8; 14 newest whole
    expect_k, expect_v = per_head_gather(store)
    after_k, after_v = store.view()
    # head 0 keeps 20 quantized tokens, head 1 24: head 0's first 4 kept residual tokens are quantized now
    assert store.key_codes.shape[2] == 24 and store.key.shape[2] == 10
    assert torch.equal(after_k[:, 1], expect_k[:, 1]) and torch.equal(after_v[:, 1], expect_v[:, 1])
    assert torch.equal(after_k[:, 0, :20], expect_k[:, 0, :20]) and torch.equal(after_k[:, 0, 24:], expect_k[:, 0, 24:])
    fresh = k[:, 0, 56:60]  # those 4 tokens, quantized per channel as one block: within half a step
    step = (fresh.amax(1) - fresh.amin(1)) / 15
    assert bool(((after_k[:, 0, 20:24] - fresh).abs() <= step / 2 + 1e-6).all())
    # blocks no kept token uses are gone: head 0 uses blocks 0-4 and the new one, head 1 blocks 0-2
    assert store.key_low.shape[2] == 6
    # bytes: packed codes (8 bytes per 16 4-bit codes) for keys and values, int32 block ids, key blocks' min
    # and scale, value groups' (2 per token), the residual in float32
    assert store.nbytes() == (2 * 2 * 24 * 8 + 2 * 24 * 4 + 2 * 2 * 6 * 16 * 4 + 2 * 2 * 24 * 2 * 4
                              + 2 * 2 * 10 * 16 * 4)


@pytest.mark.parametrize("bits", [2, 4])
def test_next_step_matches_a_from_scratch_step_on_kivi_dequantized_keys(bits):
    model = enable_position_shift(tiny_model("llama", "eager"))
    config = KIVI(bits=bits, group=8, residual=16)
    plain = CompressedCache(build_policy("lacache", cache_size=1000, span=2), 6, key_rotation="every_step")
    quantized = CompressedCache(build_policy("lacache", cache_size=1000, span=2), 6, quant=config)
    with torch.no_grad():
        model(TOKENS[:, :90], use_cache=True, **with_cache(plain))
        model(TOKENS[:, :90], use_cache=True, **with_cache(quantized))
        kv = [kivi_reference(*plain._layer(i), config) for i in range(6)]  # un-rotated keys
        expected = manual_next_logits(model, int(TOKENS[0, 90]), kv)
        got = model(TOKENS[:, 90:91], use_cache=True, **with_cache(quantized)).logits[0, -1]
    assert torch.allclose(got, expected, atol=1e-5)
    # head_dim 16 here: per-token value scales weigh more than at 64
    assert quantized.kv_bytes() < plain.kv_bytes() * (0.5 if bits == 2 else 0.6)


@pytest.mark.parametrize("method", ["lacache", "streamingllm", "h2o", "snapkv"])
def test_an_evicting_quantized_cache_attends_to_its_dequantized_slots(method):
    # after evictions, the next step equals a from-scratch step over what the store holds, at its slots
    # (slot methods) or original positions
    cache, got, expected = evicted_next_step(method, KIVI(bits=4, group=8, residual=16))
    assert cache._stores[0].shape()[2] < 60  # evicted
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("method", sorted(m for m in METHODS if m != "full"))
def test_quant_composes_with_every_method_in_generate(method):
    model = enable_position_shift(tiny_model("llama", "sdpa"))
    settings = dict(cache_size=48, start_size=4, span=2, recent_window=4, window_size=4, **method_files(model.config))
    policy = build_policy(method, **{k: v for k, v in settings.items() if k in METHODS[method].hyperparameters()})
    # ThinK prunes channels of rotated keys: they are quantized after RoPE (test_think_quant.py)
    quantized = CompressedCache(policy, 6, quant=KIVI(4, 8, 16, "post_rope" if policy.prunes_channels else "pre_rope"))
    out = fill_and_generate(model, TOKENS[:, :60], quantized, 40)
    assert out.shape[1] == 100
    plain = CompressedCache(build_policy(method, **{k: v for k, v in settings.items()
                                                    if k in METHODS[method].hyperparameters()}), 6)
    fill_and_generate(model, TOKENS[:, :60], plain, 40)
    assert quantized.get_seq_length() == plain.get_seq_length()  # the same slots, held in fewer bytes
    assert quantized.kv_bytes() < plain.kv_bytes()
    if policy.prunes_channels:  # and its quantized keys hold the chosen channels only
        assert quantized._stores[0].channels.shape[-1] < quantized._stores[0].key.shape[-1]


def test_bad_quant_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="KIVI.bits must be 2, 4 or 8, got 3"):
        KIVI(bits=3)
    with pytest.raises(ConfigError, match="KIVI.residual must be a multiple of KIVI.group 32"):
        KIVI(group=32, residual=40)
    with pytest.raises(ConfigError, match="make_cache.key_rotation incremental cannot be used"):
        CompressedCache(build_policy("lacache", cache_size=40, span=2), 6, key_rotation="incremental", quant=KIVI())


@pytest.mark.parametrize("method", ["lacache", "h2o", "cam"])
def test_ppl_quant_resumes_to_the_same_numbers(tiny_dir, text_file, tmp_path, monkeypatch, method):  # noqa: F811
    # the checkpoint holds the quantized stores as they are: a resumed run scores what an uninterrupted one does
    from ppl.run import main

    common = ["--model_name_or_path", str(tiny_dir), "--dataset_name", str(text_file), "--device", "cpu",
              "--method", method, "--cache_size", "48", "--span", "2", "--num_eval_tokens", "150",
              "--quant", "kivi", "--quant_bits", "2", "--quant_group", "8", "--quant_residual", "16",
              "--checkpoint_every", "40"]
    assert main(common + ["--output_dir", str(tmp_path / "clean")]) == 0
    clean = next((tmp_path / "clean").iterdir())
    assert "_kivi2g8r16" in clean.name
    record = json.loads((clean / "run.json").read_text())
    assert record["setting"]["cache"]["quant"] == {"method": "kivi", "bits": 2, "group": 8, "residual": 16}
    cut = ppl_killed_then_resumed(common, tmp_path / "cut", monkeypatch)
    assert (cut / "nlls.txt").read_text() == (clean / "nlls.txt").read_text()
    unquantized = main(common[:-10] + ["--output_dir", str(tmp_path / "plain")])
    assert unquantized == 0
    plain = json.loads(next((tmp_path / "plain").iterdir()).joinpath("run.json").read_text())
    assert record["results"]["peak_kv_bytes"] < plain["results"]["peak_kv_bytes"]


def test_prompt_harness_quantizes_full_and_budgeted_caches(tiny_dir, tmp_path, capsys):  # noqa: F811
    from runs import rows_of
    from runs import run_niah

    quant = ("--quant", "kivi", "--quant_bits", "4", "--quant_group", "8", "--quant_residual", "16")
    assert run_niah(tiny_dir, tmp_path / "q", "--method", "full,lacache", *quant) == 0
    assert run_niah(tiny_dir, tmp_path / "p", "--method", "full,lacache") == 0
    quantized = sorted((tmp_path / "q").iterdir())
    assert [p.name.split("__")[-1].rsplit("-", 1)[0] for p in quantized if p.is_dir()] == \
        ["full_kivi4g8r16", "lacache_b0.5_S2_O0_s4_kivi4g8r16"]
    for folder in (p for p in quantized if p.is_dir()):
        assert len(rows_of(folder / "results.csv")) == 12
    assert run_niah(tiny_dir, tmp_path / "bad", *quant[:2], "--quant_bits", "3") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert err == ["error: --quant_bits must be 2, 4 or 8, got 3"]


@pytest.mark.parametrize("bits", [2, 4])
def test_post_rope_keys_are_quantized_as_rotated(bits):
    # KIVI's own order: keys quantized after RoPE, at their original positions; the rule re-derived on rotated keys
    model = enable_position_shift(tiny_model("llama", "eager"))
    post = KIVI(bits=bits, group=8, residual=16, key_order="post_rope")
    plain = CompressedCache(build_policy("full"), 6, key_rotation="incremental")  # keys stored rotated
    quantized = CompressedCache(build_policy("full"), 6, quant=post)
    pre = CompressedCache(build_policy("full"), 6, quant=KIVI(bits=bits, group=8, residual=16))
    with torch.no_grad():
        for cache in (plain, quantized, pre):
            model(TOKENS[:, :90], use_cache=True, **with_cache(cache))
        kv = [kivi_reference(*plain._layer(i), post) for i in range(6)]
        expected = manual_next_logits(model, int(TOKENS[0, 90]), kv, rotated=True)
        got = model(TOKENS[:, 90:91], use_cache=True, **with_cache(quantized)).logits[0, -1]
        before_rope = model(TOKENS[:, 90:91], use_cache=True, **with_cache(pre)).logits[0, -1]
    assert torch.allclose(got, expected, atol=1e-5)
    assert (got - before_rope).abs().max() > 1e-5  # the two orders quantize different numbers (float noise: ~1e-7)


def test_post_rope_keys_survive_eviction_at_original_positions():
    model = enable_position_shift(tiny_model("llama", "eager"))
    cache = CompressedCache(build_policy("h2o", cache_size=40, start_size=4), 6,
                            quant=KIVI(bits=4, group=8, residual=16, key_order="post_rope"))
    with torch.no_grad():
        model(TOKENS[:, :70], use_cache=True, **with_cache(cache))
        for t in range(70, 80):
            model(TOKENS[:, t:t + 1], use_cache=True, **with_cache(cache))
        kv = [cache._stores[i].view() for i in range(6)]  # rotated keys, as held
        expected = manual_next_logits(model, int(TOKENS[0, 80]), kv, query_pos=80, key_positions=cache.kept_positions(),
                                      rotated=True)
        got = model(TOKENS[:, 80:81], use_cache=True, **with_cache(cache)).logits[0, -1]
    assert kv[0][0].shape[2] < 60
    assert torch.allclose(got, expected, atol=1e-5)


def test_post_rope_order_is_refused_where_keys_move():
    for method in ("lacache", "streamingllm"):
        with pytest.raises(ConfigError, match=f"KIVI.key_order post_rope cannot be used with make_cache.method {method}"):
            CompressedCache(build_policy(method, cache_size=40), 6, quant=KIVI(4, 8, 16, "post_rope"))
    with pytest.raises(ConfigError, match=r"KIVI.key_order must be one of \['pre_rope', 'post_rope'\], got 'after'"):
        KIVI(4, 8, 16, "after")


def test_ppl_post_rope_names_its_folder_and_refuses_moving_keys(tiny_dir, text_file, tmp_path, capsys):  # noqa: F811
    from ppl.run import main

    common = ["--model_name_or_path", str(tiny_dir), "--dataset_name", str(text_file), "--device", "cpu",
              "--num_eval_tokens", "40", "--quant", "kivi", "--quant_bits", "4", "--quant_group", "8",
              "--quant_residual", "16", "--quant_key_order", "post_rope", "--output_dir", str(tmp_path)]
    assert main(common + ["--method", "full"]) == 0
    folder = next(tmp_path.iterdir())
    assert folder.name.split("__")[2] == "full_kivi4g8r16_postrope"
    record = json.loads((folder / "run.json").read_text())
    assert record["setting"]["cache"]["quant"]["key_order"] == "post_rope"
    assert main(common + ["--method", "lacache", "--cache_size", "24", "--span", "2"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and err[0].startswith("error: --quant_key_order post_rope cannot be used with --method lacache")


@pytest.mark.parametrize("method", ["adakv", "headkv"])
@pytest.mark.parametrize("key_order", ["pre_rope", "post_rope"])
def test_per_head_methods_hold_each_head_quantized(method, key_order):
    # AdaKV and HeadKV keep heads at their own lengths: each head becomes a quantized store of its own after the
    # prompt, and the next step equals a from-scratch step over the heads' dequantized views at their positions
    model = enable_position_shift(tiny_model("llama", "eager"))
    settings = dict(cache_size=40, start_size=4, window_size=8, **method_files(model.config))
    config = KIVI(bits=4, group=8, residual=16, key_order=key_order)
    policy = build_policy(method, **{k: v for k, v in settings.items() if k in METHODS[method].hyperparameters()})
    cache = CompressedCache(policy, 6, quant=config)
    plain = CompressedCache(build_policy(method, **{k: v for k, v in settings.items()
                                                    if k in METHODS[method].hyperparameters()}), 6)
    with torch.no_grad():
        for c in (cache, plain):
            model(TOKENS[:, :90], use_cache=True, **with_cache(c))
        for t in range(90, 94):
            model(TOKENS[:, t:t + 1], use_cache=True, **with_cache(cache))
        layers = [([head.view() for head in cache._stores[i].heads], None) for i in range(6)]
        expected = manual_next_logits(model, int(TOKENS[0, 94]), layers, query_pos=94, key_positions=cache.kept_positions(),
                                      rotated=key_order == "post_rope")
        got = model(TOKENS[:, 94:95], use_cache=True, **with_cache(cache)).logits[0, -1]
    assert cache.head_lengths(3) is not None and len(set(cache.head_lengths(3).tolist())) > 1  # heads differ
    assert any(head.key_codes.shape[2] for head in cache._stores[3].heads)  # and hold quantized tokens
    assert torch.allclose(got, expected, atol=1e-5)
    assert cache.kv_bytes() < plain.kv_bytes()


def test_storage_flags_their_option_does_not_read_are_one_line_errors(tiny_dir, text_file, tmp_path, capsys):  # noqa: F811
    # a --quant_* or --quest_* value without the option that reads it would run silently unquantized or dense
    from ppl.run import main

    common = ["--model_name_or_path", str(tiny_dir), "--dataset_name", str(text_file), "--device", "cpu",
              "--method", "full", "--num_eval_tokens", "20", "--output_dir", str(tmp_path)]
    cases = [(["--quant_bits", "4"], "error: --quant_bits 4 needs --quant kivi or gear; --quant none does not use it"),
             (["--quant", "kivi", "--quant_rank", "4"], "error: --quant_rank 4 needs --quant gear; --quant kivi does not use it"),
             (["--quant_schedule", "reference"], "error: --quant_schedule reference needs --quant kivi or gear; --quant none "
                                                 "does not use it"),
             (["--quest_budget", "64"], "error: --quest_budget 64 needs --read quest; --read none does not use it")]
    for flags, message in cases:
        capsys.readouterr()
        assert main(common + flags) == 2
        assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")] == [message]
    assert not any(tmp_path.iterdir())
    assert main(common + ["--quant", "gear", "--quant_rank", "4", "--quant_group", "8", "--quant_residual", "16"]) == 0
