"""The plugin's parts on their own: moving rotated keys with the engine's rotary embeddings, and finding a
backend's KV layout by what its cache-write op does (fake backends stand in for the GPU ones)."""
import pytest
import torch

from lacache_core.errors import ConfigError
from lacache_vllm.kv_layout import CANDIDATES, SlotAccess, probe_layout
from lacache_vllm.rotation import KeyMover


ROTARIES = {  # the engine's classes and their arguments (head size, rotary dims, max positions, base, neox, ...)
    "neox": ("base", "RotaryEmbedding", (64, 64, 4096, 10000.0, True, torch.float32)),
    "gpt-j interleaved": ("base", "RotaryEmbedding", (64, 64, 4096, 10000.0, False, torch.float32)),
    "partial rotary": ("base", "RotaryEmbedding", (64, 32, 4096, 10000.0, True, torch.float32)),
    "llama 3 scaling": ("llama3_rope", "Llama3RotaryEmbedding",
                        (64, 64, 4096, 500000.0, True, torch.float32, 8.0, 1.0, 4.0, 1024)),
}


@pytest.fixture
def vllm_config():
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):  # the engine's ops read it when built and run
        yield


@pytest.mark.parametrize("name", sorted(ROTARIES))
def test_a_moved_key_equals_the_key_rotated_at_its_new_position(name, vllm_config):
    """R(q - p) R(p) k = R(q) k, with R the engine's own rotary forward (not ours)."""
    import importlib

    module, cls, args = ROTARIES[name]
    rotary = getattr(importlib.import_module(f"vllm.model_executor.layers.rotary_embedding.{module}"), cls)(*args)
    torch.manual_seed(0)
    key = torch.randn(5, 2 * 64)  # [tokens, kv_heads * head_dim], as the engine rotates them
    old = torch.tensor([3, 70, 900, 2047, 4000])
    new = torch.tensor([0, 5, 300, 2040, 12])

    def at(positions):
        query = torch.zeros_like(key)
        return rotary.forward_native(positions, query, key.clone())[1].view(5, 2, 64)

    moved = KeyMover(rotary).move(at(old), new - old)
    torch.testing.assert_close(moved, at(new), rtol=1e-4, atol=1e-4)


def test_rotations_without_one_position_per_token_are_refused():
    class MRotaryEmbedding(torch.nn.Module):
        cos_sin_cache = torch.zeros(4, 8)
        rotary_dim, is_neox_style = 8, True

    with pytest.raises(ConfigError, match="cannot move keys rotated by MRotaryEmbedding"):
        KeyMover(MRotaryEmbedding())


class FakeBackend:
    """An attention layer whose cache-write op stores slots in a layout of our choosing."""

    def __init__(self, write):
        self.impl = self
        self.write = write

    def do_kv_cache_update(self, layer, key, value, cache, slots):
        self.write(cache, key, value, slots)


def _flash_attention_write(cache, key, value, slots):  # [2, blocks, block_size, heads, dim]
    cache[0, slots // 32, slots % 32] = key
    cache[1, slots // 32, slots % 32] = value


def _heads_swapped_write(cache, key, value, slots):  # a layout no candidate describes: heads reversed
    key_view, value_view = CANDIDATES["[2, blocks, block_size, heads, dim]"](cache, 2, 32)
    key_view[slots // 32, slots % 32] = key.flip(1)
    value_view[slots // 32, slots % 32] = value.flip(1)


def test_a_flash_attention_layout_is_found_and_read_slot_by_slot():
    cache = torch.zeros(2, 10, 32, 2, 32)
    layout = probe_layout(FakeBackend(_flash_attention_write), cache, 32, 2, 32)
    assert layout == "[2, blocks, block_size, heads, dim]"
    # a request holding blocks 7 and 4: its slot 33 is block 4, offset 1
    key, value = torch.randn(2, 2, 32), torch.randn(2, 2, 32)
    blocks, slots = torch.tensor([7, 4]), torch.tensor([0, 33])
    access = SlotAccess(layout, cache, 2, 32)
    access.write(blocks, slots, key, value)
    assert torch.equal(cache[0, 4, 1], key[1]) and torch.equal(cache[1, 7, 0], value[0])
    got_key, got_value = access.read(blocks, slots)
    assert torch.equal(got_key, key) and torch.equal(got_value, value)


def test_an_unknown_layout_is_refused():
    with pytest.raises(ConfigError, match="does not know the KV cache layout"):
        probe_layout(FakeBackend(_heads_swapped_write), torch.zeros(2, 10, 32, 2, 32), 32, 2, 32)


def test_a_backend_without_a_cache_write_op_is_refused():
    class NoWrite:
        impl = object()

    with pytest.raises(ConfigError, match="has no do_kv_cache_update"):
        probe_layout(NoWrite(), torch.zeros(2, 10, 32, 2, 32), 32, 2, 32)
