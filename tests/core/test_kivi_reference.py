"""KIVI against its reference code (jy-yuan/KIVI @ 876b4d2): ``models/llama_kivi.py``'s prefill and decode
branches and ``quant/new_pack.py``'s quantization, re-derived below as the state machine that code runs. The
``--quant_schedule reference`` store must hold what it holds at every step; the default ``block`` store must
hold the same numbers for every token both hold quantized (same blocks, same arithmetic, other timing)."""
import json

import pytest
import torch
import transformers
from packaging.version import Version

from lacache_core import GEAR, KIVI, CompressedCache, ConfigError, build_policy, enable_position_shift
from lacache_core.kivi_reference import KIVIReferenceStore
from lacache_core.quant import KIVIStore
from lacache_core.versions import with_cache
from tiny import manual_next_logits, ppl_killed_then_resumed, tiny_model

pytestmark = pytest.mark.skipif(Version(transformers.__version__) < Version("4.36"),
                                reason="cache objects need transformers >= 4.36")
TOKENS = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(3))


def fake_quant_along_last(x, group, bits):
    """new_pack.py's quantization along the last dim in groups of ``group``, dequantized: min and max per group,
    ``scale = (mx - mn) / (2**bits - 1)``, codes ``clamp((x - mn) / scale).round()``, back as ``codes * scale + mn``."""
    shape = x.shape
    data = x.reshape(*shape[:-1], shape[-1] // group, group)
    mn, mx = data.min(-1, keepdim=True)[0], data.max(-1, keepdim=True)[0]
    scale = (mx - mn) / (2 ** bits - 1)
    codes = ((data - mn) / scale).clamp(0, 2 ** bits - 1).round()
    return (codes * scale + mn).reshape(shape)


class ReferenceKIVI:
    """The reference's per-layer state: quantized and full keys (``key_states_quant_trans``/``key_states_full``),
    quantized and full values, dequantized here; ``None`` where the reference holds ``None``."""

    def __init__(self, key, value, group, bits, residual):
        self.g, self.bits, self.r = group, bits, residual
        n = key.shape[2]
        keep = n % residual  # prefill: keys in whole multiples of the residual length
        self.kq = self.keys(key[:, :, :n - keep]) if n - keep else None
        self.kf = key[:, :, n - keep:] if keep else None
        if n <= residual:
            self.vq, self.vf = None, value
        else:
            self.vq, self.vf = fake_quant_along_last(value[:, :, :-residual], group, bits), value[:, :, -residual:]

    def keys(self, k):  # quantized per channel along tokens: the reference transposes keys to [b, h, d, t]
        return fake_quant_along_last(k.transpose(2, 3), self.g, self.bits).transpose(2, 3)

    def decode(self, key, value):
        self.kf = key if self.kf is None else torch.cat([self.kf, key], 2)
        self.vf = torch.cat([self.vf, value], 2)
        held = self.held()  # what this step attends to; the reference quantizes after its attention
        if self.kf.shape[2] == self.r:
            new = self.keys(self.kf)
            self.kq, self.kf = new if self.kq is None else torch.cat([self.kq, new], 2), None
        if self.vf.shape[2] > self.r:
            new = fake_quant_along_last(self.vf[:, :, :1], self.g, self.bits)
            self.vq, self.vf = new if self.vq is None else torch.cat([self.vq, new], 2), self.vf[:, :, 1:]
        return held

    def held(self):
        keys = [t for t in (self.kq, self.kf) if t is not None]
        values = [t for t in (self.vq, self.vf) if t is not None]
        return torch.cat(keys, 2), torch.cat(values, 2)


def stream(store_class, config, key, value, prompt):
    """``store_class`` and the reference fed a ``prompt``-token prefill and then one token a step: per step, what each
    attends to, and the counts of keys and values the store held quantized then."""
    store = store_class(config, key[:, :, :prompt], value[:, :, :prompt])
    reference = ReferenceKIVI(key[:, :, :prompt], value[:, :, :prompt], config.group, config.bits, config.residual)
    store.compress()
    steps = []
    for t in range(prompt, key.shape[2]):
        store.append(key[:, :, t:t + 1], value[:, :, t:t + 1])
        counts = store.key_codes.shape[2], store.value_codes.shape[2]
        steps.append((store.view(), reference.decode(key[:, :, t:t + 1], value[:, :, t:t + 1]), counts))
        store.compress()
    return steps


@pytest.mark.parametrize("prompt", [5, 16, 24, 37, 40, 48])  # n % R below and above G
@pytest.mark.parametrize("bits", [2, 4])
def test_reference_schedule_holds_what_kivis_code_holds_at_every_step(prompt, bits):
    g = torch.Generator().manual_seed(prompt)
    key, value = torch.randn(1, 2, prompt + 40, 16, generator=g), torch.randn(1, 2, prompt + 40, 16, generator=g)
    config = KIVI(bits=bits, group=8, residual=16, schedule="reference")
    steps = stream(KIVIReferenceStore, config, key, value, prompt)
    for (got_k, got_v), (ref_k, ref_v), _ in steps:
        assert torch.allclose(got_k, ref_k, atol=1e-6, rtol=0) and torch.allclose(got_v, ref_v, atol=1e-6, rtol=0)
    # keys 16 at a time, values one by one past the newest 16, counted over the tokens before each step
    assert [held for _, _, held in steps] == [(n // 16 * 16, max(n - 16, 0)) for n in range(prompt, prompt + 40)]
    assert (got_k - key[:, :, :prompt + 40]).abs().max() > 1e-3  # the older tokens are quantized


def test_a_prompt_in_chunks_ends_as_the_whole_prompt():
    # the reference takes a prompt in one pass; fed in chunks, the store quantizes whole multiples of R as they come
    g = torch.Generator().manual_seed(5)
    key, value = torch.randn(1, 2, 61, 16, generator=g), torch.randn(1, 2, 61, 16, generator=g)
    config = KIVI(bits=2, group=8, residual=16, schedule="reference")
    whole = KIVIReferenceStore(config, key, value)
    whole.compress()
    for chunk in (1, 7, 20, 33):
        store = KIVIReferenceStore(config, key[:, :, :chunk], value[:, :, :chunk])
        store.compress()
        for start in range(chunk, 61, chunk):
            store.append(key[:, :, start:start + chunk], value[:, :, start:start + chunk])
            store.compress()
        assert all(torch.equal(a, b) for a, b in zip(store.view(), whole.view()))
        assert store.nbytes() == whole.nbytes()


@pytest.mark.parametrize("bits", [2, 4])
def test_block_schedule_quantizes_the_same_blocks_with_the_same_numbers(bits):
    # the default store quantizes a block at another step, but the same tokens into the same numbers: where both
    # hold a key (or a value) quantized, they hold the same one
    g = torch.Generator().manual_seed(7)
    key, value = torch.randn(1, 2, 90, 16, generator=g), torch.randn(1, 2, 90, 16, generator=g)
    config = KIVI(bits=bits, group=8, residual=16)
    both = 0
    ref_k = ReferenceKIVI(key, value, 8, bits, 16).kq  # a prefill of all 90: key blocks 0-9 quantized
    ref_v = fake_quant_along_last(value, 8, bits)  # a value is quantized on its own, whenever it is
    for (got_k, got_v), _, (m, _) in stream(KIVIStore, config, key, value, 21):
        assert torch.allclose(got_k[:, :, :m], ref_k[:, :, :m], atol=1e-6, rtol=0)
        assert torch.allclose(got_v[:, :, :m], ref_v[:, :, :m], atol=1e-6, rtol=0)
        both += m
    assert both > 0


def test_reference_store_bytes_by_hand():
    g = torch.Generator().manual_seed(0)
    key, value = torch.randn(1, 2, 61, 16, generator=g), torch.randn(1, 2, 61, 16, generator=g)
    store = KIVIReferenceStore(KIVI(bits=4, group=8, residual=16, schedule="reference"), key, value)
    store.compress()
    assert store.key_codes.shape[2] == 48 and store.value_codes.shape[2] == 45  # 61 // 16 * 16; 61 - 16
    # 4-bit codes: 8 bytes per 16 channels; keys: a min and scale per block of 8 tokens and channel; values: per token
    # and group of 8 channels; whole keys and values in float32; 2 heads
    assert store.nbytes() == 2 * (48 * 8 + 2 * 6 * 16 * 4 + 45 * 8 + 2 * 45 * 2 * 4 + 13 * 16 * 4 + 16 * 16 * 4)


def test_the_next_step_matches_a_from_scratch_step_on_the_reference_cache():
    # KIVI's order: keys quantized after RoPE (post_rope), a full cache, the reference re-derived on rotated keys
    model = enable_position_shift(tiny_model("llama", "eager"))
    config = KIVI(bits=2, group=8, residual=16, key_order="post_rope", schedule="reference")
    plain = CompressedCache(build_policy("full"), 6, key_rotation="incremental")  # keys stored rotated
    quantized = CompressedCache(build_policy("full"), 6, quant=config)
    block = CompressedCache(build_policy("full"), 6, quant=KIVI(bits=2, group=8, residual=16, key_order="post_rope"))
    with torch.no_grad():
        for cache in (plain, quantized, block):
            model(TOKENS[:, :90], use_cache=True, **with_cache(cache))
        kv = [ReferenceKIVI(*plain._layer(i), 8, 2, 16).held() for i in range(6)]
        expected = manual_next_logits(model, int(TOKENS[0, 90]), kv, rotated=True)
        got = model(TOKENS[:, 90:91], use_cache=True, **with_cache(quantized)).logits[0, -1]
        other = model(TOKENS[:, 90:91], use_cache=True, **with_cache(block)).logits[0, -1]
    assert torch.allclose(got, expected, atol=1e-5)
    assert (got - other).abs().max() > 1e-4  # the timings differ: of 90 tokens, 74 values quantized against 80


@pytest.mark.skipif(Version(transformers.__version__) < Version("4.48"),
                    reason="padded batches need the attention-interface path (transformers >= 4.48)")
def test_reference_schedule_in_a_padded_batch_gives_each_row_alone():
    model = enable_position_shift(tiny_model("llama", "eager"))
    prompts = [TOKENS[0, :50].tolist(), TOKENS[0, 10:33].tolist()]
    config = KIVI(bits=4, group=8, residual=16, schedule="reference")
    alone = []
    for p in prompts:
        cache = CompressedCache(build_policy("full"), 6, quant=config)
        out = model.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, past_key_values=cache)
        alone.append(out[0, len(p):].tolist())
    ids = torch.zeros(2, 50, dtype=torch.long)
    mask = torch.zeros(2, 50, dtype=torch.long)
    for j, p in enumerate(prompts):
        ids[j, 50 - len(p):], mask[j, 50 - len(p):] = torch.tensor(p), 1
    cache = CompressedCache(build_policy("full"), 6, quant=config)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, past_key_values=cache)
    assert out[:, 50:].tolist() == alone


def test_reference_schedule_is_refused_where_it_cannot_hold():
    with pytest.raises(ConfigError, match="KIVI.schedule reference splits keys and values .* not lacache"):
        CompressedCache(build_policy("lacache", cache_size=40), 6, quant=KIVI(4, 8, 16, schedule="reference"))
    with pytest.raises(ConfigError, match="KIVI.residual must be at least KIVI.group 8, got 0"):
        KIVI(4, 8, 0, schedule="reference")
    with pytest.raises(ConfigError, match="make_cache.quant gear takes GEAR.schedule block"):
        GEAR(2, 8, 16, schedule="reference")
    with pytest.raises(ConfigError, match=r"KIVI.schedule must be one of \['block', 'reference'\]"):
        KIVI(schedule="kivi")


def test_ppl_reference_schedule_names_its_folder_resumes_and_refuses_eviction(tiny_dir, text_file, tmp_path,  # noqa: F811
                                                                              monkeypatch, capsys):
    from ppl.run import main

    common = ["--model_name_or_path", str(tiny_dir), "--dataset_name", str(text_file), "--device", "cpu",
              "--method", "full", "--num_eval_tokens", "150", "--quant", "kivi", "--quant_bits", "2",
              "--quant_group", "8", "--quant_residual", "16", "--quant_schedule", "reference", "--checkpoint_every", "40"]
    assert main(common + ["--output_dir", str(tmp_path / "clean")]) == 0
    clean = next((tmp_path / "clean").iterdir())
    assert clean.name.split("__")[2] == "full_kivi2g8r16_refschedule"
    record = json.loads((clean / "run.json").read_text())
    assert record["setting"]["cache"]["quant"]["schedule"] == "reference"
    cut = ppl_killed_then_resumed(common, tmp_path / "cut", monkeypatch)
    assert (cut / "nlls.txt").read_text() == (clean / "nlls.txt").read_text()
    block_args = [arg if arg != "reference" else "block" for arg in common]
    assert main(block_args + ["--output_dir", str(tmp_path / "b")]) == 0
    block = next((tmp_path / "b").iterdir())
    assert "schedule" not in json.loads((block / "run.json").read_text())["setting"]["cache"]["quant"]
    assert (block / "nlls.txt").read_text() != (clean / "nlls.txt").read_text()
    capsys.readouterr()
    h2o_args = [arg if arg != "full" else "h2o" for arg in common] + ["--cache_size", "48"]
    assert main(h2o_args + ["--output_dir", str(tmp_path / "h2o")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and err[0].startswith("error: --quant_schedule reference splits keys and values")
