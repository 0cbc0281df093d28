"""Tiny random-weight models built from a config in code (CPU, milliseconds per step)."""
import torch
import transformers
from packaging.version import Version

FAMILIES = ["llama", "mistral", "qwen2"] if Version(transformers.__version__) >= Version("4.37") else ["llama"]
ATTN = ["eager", "sdpa"] if Version(transformers.__version__) >= Version("4.36") else ["eager"]


def tiny_model(family="llama", attn="eager", layers=6, seed=0):
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    if family == "llama":
        config = transformers.LlamaConfig(**common)
    elif family == "mistral":
        config = transformers.MistralConfig(sliding_window=None, **common)
    else:
        config = transformers.Qwen2Config(use_sliding_window=False, **common)
    torch.manual_seed(seed)
    kwargs = {"attn_implementation": attn} if Version(transformers.__version__) >= Version("4.36") else {}
    model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
    return model.eval()


def rms_norm(module, x):
    """The model's RMSNorm, recomputed by hand."""
    var = x.float().pow(2).mean(-1, keepdim=True)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    return module.weight * (x.float() * torch.rsqrt(var + eps)).to(x.dtype)


def rotate(x, pos, theta, dim):
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    ang = pos.float()[:, None] * inv[None]
    ang = torch.cat([ang, ang], -1)
    half = dim // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * ang.cos() + rot * ang.sin()


def manual_next_logits(model, token, kv_unrotated, query_pos=None, key_positions=None, rotated=False, reads=None):
    """Logits for one new ``token`` given each layer's cached *un-rotated* keys and values
    (``rotated=True``: keys already rotated at their positions; only the new key and the query are rotated).

    A from-scratch re-derivation of a decoder step: keys at their cache slots ``0..n`` (the new
    key at slot ``n``), the query at ``query_pos`` (default: slot ``n``). Independent of the patch.
    With ``key_positions`` (per layer ``[n]`` or per KV head ``[kv_heads, n]``, the cached keys'
    original positions), old keys sit there instead and the new key at ``query_pos``. A layer whose
    heads hold different numbers of slots gives ``(heads, None)``, ``heads`` a list of per-head ``(key, value)``,
    each ``[1, 1, n_h, d]``,
    and per-head ``[n_h]`` positions. ``reads(layer, query, keys)``, if given, says which keys each query head of a
    KV head attends to (bool ``[1, groups, 1, n]``; Quest's page choice), the others masked.
    """
    cfg = model.config
    theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
    heads, kvh = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // heads
    base = model.get_decoder()
    h = base.embed_tokens(torch.tensor([[token]]))
    for i, (layer, (k_old, v_old)) in enumerate(zip(base.layers, kv_unrotated)):
        attn = layer.self_attn
        x = rms_norm(layer.input_layernorm, h)
        q = attn.q_proj(x).view(1, 1, heads, d).transpose(1, 2)
        k = attn.k_proj(x).view(1, 1, kvh, d).transpose(1, 2)
        v = attn.v_proj(x).view(1, 1, kvh, d).transpose(1, 2)
        groups, outs = heads // kvh, []
        ragged = isinstance(k_old, list)
        for g in range(kvh):  # per KV head: heads may hold different numbers of slots (AdaKV)
            old_k, old_v = (k_old[g] if ragged else (k_old[:, g:g + 1], v_old[:, g:g + 1]))
            keys = torch.cat([old_k, k[:, g:g + 1]], 2)
            values = torch.cat([old_v, v[:, g:g + 1]], 2)
            n = keys.shape[2]
            qpos = n - 1 if query_pos is None else query_pos
            if key_positions is None:
                kpos = torch.arange(n)
            else:
                pos = key_positions[i]
                pos = pos[g] if isinstance(pos, list) else (pos if pos.dim() == 1 else pos[g])
                kpos = torch.cat([pos, torch.tensor([qpos])])
            if rotated:
                keys = torch.cat([old_k, rotate(keys[:, :, -1:], kpos[-1:], theta, d)], 2)
            else:
                keys = rotate(keys, kpos, theta, d)
            query = rotate(q[:, g * groups:(g + 1) * groups], torch.tensor([qpos]), theta, d)
            scores = (query @ keys.transpose(2, 3)) / d ** 0.5
            if reads is not None:
                scores = scores.masked_fill(~reads(i, query, keys), float("-inf"))
            w = torch.softmax(scores, -1)
            outs.append(w @ values)
        out = torch.cat(outs, 1).transpose(1, 2).reshape(1, 1, -1)
        h = h + attn.o_proj(out)
        h = h + layer.mlp(rms_norm(layer.post_attention_layernorm, h))
    return model.lm_head(rms_norm(base.norm, h))[0, -1]


TINY_WORDS = [f"w{i}" for i in range(120)]


def char_tokenizer(chars=None, bos=False, chat_template=None):
    """One token per character of ``chars`` (default: ``string.printable``; others are ``<unk>``), so digits
    and wrapper text survive, unlike the tiny word-level tokenizer. Decoding joins the characters. With
    ``bos``, encoding adds ``<s>`` and decoding with ``skip_special_tokens`` drops it, as Llama's tokenizer does."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    chars = sorted(set(string.printable if chars is None else chars))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")
    if chat_template:
        fast.chat_template = chat_template
    return fast


def save_tiny_model(folder, tokenizer, layers=4, seed=0):
    """``folder`` holding ``tokenizer`` and a tiny sdpa Llama: what the harnesses load by path."""
    tokenizer.save_pretrained(folder)
    tiny_model("llama", "sdpa", layers=layers, seed=seed).save_pretrained(folder)
    return folder


def tiny_tokenizer(chat_template=None):
    """A whitespace word-level tokenizer over ``w0 .. w119`` plus ``<unk>``, ``<s>``, ``</s>`` and newline
    (vocabulary 124 < the tiny models' 128)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(TINY_WORDS)}, "<s>": 121, "</s>": 122, "\n": 123}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
                                                 pre_tokenizers.Split(Regex("[ \\t]+"), behavior="removed")])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")
    if chat_template:
        fast.chat_template = chat_template
    return fast


def result_dir(root, name):
    """The one result folder ``{root}/{name}-{hash of the setting}`` (the harnesses' naming)."""
    import re
    from pathlib import Path

    found = [p for p in Path(root).iterdir() if p.is_dir() and re.fullmatch(re.escape(name) + r"-[0-9a-f]{8}", p.name)]
    assert len(found) == 1, f"{name}-<hash> in {root}: {sorted(p.name for p in Path(root).iterdir())}"
    return found[0]


def head_scores_file(config) -> str:
    """A HeadKV scores file for a model of ``config``: uneven, deterministic scores per (layer, query head),
    in the reference's ``{"layer-head": [scores]}`` format (written once per process and shape)."""
    import json
    import os
    import tempfile
    from pathlib import Path

    layers, heads = config.num_hidden_layers, config.num_attention_heads
    path = Path(tempfile.gettempdir()) / f"lacache-test-head-scores-{os.getpid()}-{layers}x{heads}.json"
    if not path.exists():
        gen = torch.Generator().manual_seed(layers * 1000 + heads)
        table = {f"{l}-{h}": torch.rand(3, generator=gen).tolist() for l in range(layers) for h in range(heads)}
        path.write_text(json.dumps(table))
    return str(path)


def duo_patterns_file(config) -> str:
    """A DuoAttention patterns file for a model of ``config`` (``scripts/duo_patterns.py``'s JSON format): uneven,
    deterministic scores per (layer, KV head), 4 sinks and a recent window of 8."""
    import json
    import os
    import tempfile
    from pathlib import Path

    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    path = Path(tempfile.gettempdir()) / f"lacache-test-duo-{os.getpid()}-{layers}x{kv_heads}.json"
    if not path.exists():
        gen = torch.Generator().manual_seed(layers * 100 + kv_heads)
        path.write_text(json.dumps({"sink_size": 4, "recent_size": 8,
                                    "scores": torch.rand(layers, kv_heads, generator=gen).tolist()}))
    return str(path)


def method_files(config) -> dict:
    """The files the methods that need one read (HeadKV's head scores, DuoAttention's patterns) for ``config``."""
    return {"head_scores": head_scores_file(config), "duo_patterns": duo_patterns_file(config)}


def killed_after(answer_all, n: int):
    """``answer_all`` (a harness's answer generator) raising ``KeyboardInterrupt`` after ``n`` answers over all its
    calls, as if the run were killed between two samples."""
    done = [0]

    def answers(*args, **kwargs):
        for item in answer_all(*args, **kwargs):
            done[0] += 1
            if done[0] > n:
                raise KeyboardInterrupt
            yield item
    return answers


def stream_killed_after(stream, n: int, callback: str = "on_token"):
    """``stream`` (``ppl.run.stream_perplexity``, or ``stream_perplexity_batched`` with ``callback="on_step"``)
    raising ``KeyboardInterrupt`` once token (step) ``n`` is scored and logged, as if the run were killed mid-stream."""
    def interrupted(*args, **kwargs):
        logged = kwargs.pop(callback)

        def boom(i, nll):
            logged(i, nll)
            if i == n:
                raise KeyboardInterrupt
        return stream(*args, **{callback: boom}, **kwargs)
    return interrupted


def ppl_killed_then_resumed(argv, folder, monkeypatch, after: int = 97, batched: bool = False):
    """Run ``ppl/run.py`` with ``argv`` into ``folder``, killed once token ``after`` is scored (step ``after`` of a
    ``--batch_size`` run with ``batched``), then again to the end; the result folder of the resumed run (its
    ``run.json`` says it resumed)."""
    import json

    import pytest

    import ppl.run as run_module

    name = "stream_perplexity_batched" if batched else "stream_perplexity"
    real = getattr(run_module, name)
    monkeypatch.setattr(run_module, name, stream_killed_after(real, after, "on_step" if batched else "on_token"))
    with pytest.raises(KeyboardInterrupt):
        run_module.main(argv + ["--output_dir", str(folder)])
    monkeypatch.setattr(run_module, name, real)
    assert run_module.main(argv + ["--output_dir", str(folder)]) == 0
    cut = next(folder.iterdir())
    assert json.loads((cut / "run.json").read_text())["results"]["resumed"] is True
    return cut


def generate_with_passes(model, input_ids, **kwargs):
    """``model.generate`` inside ``lacache_core.prompt_passes`` with the tiny tokenizer, which runs the passes of a
    method that scores its prompt by passes of its own (KVzip; each row's own in a batch) after the prompt's forward
    pass, and does nothing for the others."""
    from lacache_core import prompt_passes

    with prompt_passes(model, tiny_tokenizer()):
        return model.generate(input_ids, **kwargs)


def fill_and_generate(model, input_ids, cache, new_tokens: int):
    """:func:`generate_with_passes` of ``new_tokens`` greedy tokens (no stopping) with ``cache``, for every method."""
    from lacache_core.versions import with_cache

    return generate_with_passes(model, input_ids, **with_cache(cache), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False)


def same_positions(a, b) -> bool:
    """One layer's kept positions, equal: tensors, or per-head lists of them (heads of different lengths)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.equal(a, b)
    return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(map(torch.equal, a, b))
