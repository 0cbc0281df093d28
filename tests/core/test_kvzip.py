"""KVzip: its reconstruction passes, its scores re-derived from the model, its choice by hand, its refusals.

The matrix (families, quantizers, Quest, the next step from scratch) runs KVzip through ``tiny.fill_and_generate``
and ``lacache_core.prefill``, like every method; this file checks what is KVzip's own.
"""
import pytest
import torch
import transformers
from packaging.version import Version

from lacache_core import (ConfigError, KVzip, enable_position_shift, make_cache, make_row_cache, prefill,
                         prompt_passes)
from lacache_core.policies.kvzip import REPEAT_FIRST, REPEAT_NEXT
from lacache_core.versions import with_cache
from tiny import rms_norm, rotate, same_positions, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.skipif(Version(transformers.__version__) < Version("4.36"),
                                reason="cache objects need transformers >= 4.36")
PROMPT = torch.randint(1, 121, (1, 60), generator=torch.Generator().manual_seed(3))  # the tiny tokenizer's words
TEMPLATE = ("<s> w1 w2\n{% for m in messages %}{{ m['content'] }}{% endfor %}"
            "</s>{% if add_generation_prompt %} w3\n{% endif %}")


def scored(model, ids, tokenizer, **settings):
    """The cache after ``prefill``, and the policy's scores ``[layers, kv_heads, n]`` as the passes left them."""
    cache = make_cache("kvzip", model, **settings)
    policy, seen = cache.policy, {}
    end_passes = policy.end_passes

    def keep_scores():
        seen["scores"] = policy._scores.clone()
        end_passes()

    policy.end_passes = keep_scores
    with torch.no_grad():
        prefill(model, ids, cache, tokenizer=tokenizer)
    return cache, seen["scores"]


def test_one_pass_scores_are_the_models_own_attention_to_the_prompt():
    # without a template and with one chunk, a pass's softmax runs over every key (no sink keys apart, the chunk is the
    # whole prompt): the scores are the largest attention probability any repeat query of a KV head's group gives each
    # prompt token, which the unpatched model returns itself
    tok = tiny_tokenizer()
    model = enable_position_shift(tiny_model("llama", "eager"))
    cache, scores = scored(model, PROMPT, tok, cache_size=20)
    request = torch.tensor([tok.encode(REPEAT_FIRST, add_special_tokens=False) + tok.encode("\n", add_special_tokens=False)])
    whole = torch.cat([PROMPT, request, PROMPT], 1)
    reference = tiny_model("llama", "eager")
    with torch.no_grad():
        attentions = reference(whole, output_attentions=True).attentions
    n, kvh = PROMPT.shape[1], reference.config.num_key_value_heads
    for layer, probs in enumerate(attentions):  # [1, heads, T, T]
        repeat = probs[0, :, n:, :n]  # the pass's queries on the prompt
        expected = repeat.reshape(kvh, -1, repeat.shape[-1]).amax(1)  # heads of one KV head are consecutive
        torch.testing.assert_close(scores[layer], expected, atol=1e-5, rtol=1e-4)


def test_chunked_passes_and_their_scores_by_hand():
    # a chat template's prefix is not repeated; chunks of 20 with a 3-token quote of the previous chunk; sink keys in
    # the softmax; layer 0's scores recomputed from the embeddings
    tok = tiny_tokenizer(chat_template=TEMPLATE)
    prefix = tok.encode("<s> w1 w2\n", add_special_tokens=False)
    suffix = tok.encode("</s> w3\n", add_special_tokens=False)
    assert len(prefix) == 4 and len(suffix) == 3
    ids = torch.cat([torch.tensor([prefix]), PROMPT[:, :50]], 1)  # 54 tokens: the prefix, then chunks 20, 20, 10
    policy = KVzip(cache_size=20, start_size=2, context_chunk=20, chunk_postfix=3)
    policy.bind(6)
    policy.keep(5, 54)  # the prompt's pass ends: 54 > 20 slots, so the passes follow
    passes = policy.scoring_passes(ids, tok)
    first = tok.encode(REPEAT_FIRST, add_special_tokens=False)
    later = tok.encode(REPEAT_NEXT, add_special_tokens=False)
    body = ids[0, 4:].tolist()
    assert [span for span, _ in passes] == [(4, 24), (24, 44), (44, 54)]
    assert passes[0][1][0].tolist() == first + suffix + body[:20]
    assert passes[1][1][0].tolist() == later + body[17:20] + suffix + body[20:40]
    assert passes[2][1][0].tolist() == later + body[37:40] + suffix + body[40:50]

    model = enable_position_shift(tiny_model("llama", "eager"))
    _, scores = scored(model, ids, tok, cache_size=20, start_size=2, context_chunk=20, chunk_postfix=3)
    cfg = model.config
    theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
    heads, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    attn, norm = model.model.layers[0].self_attn, model.model.layers[0].input_layernorm

    def projected(tokens, first_position):
        x = rms_norm(norm, model.model.embed_tokens(tokens))
        pos = torch.arange(first_position, first_position + tokens.shape[1])
        q = rotate(attn.q_proj(x).view(-1, heads, d).transpose(0, 1), pos, theta, d)
        k = rotate(attn.k_proj(x).view(-1, kvh, d).transpose(0, 1), pos, theta, d)
        return q, k  # [heads, t, d], [kv_heads, t, d]

    expected = torch.zeros(kvh, 54)
    expected[:, :2] = 1.0  # sinks start at the top; the template prefix past them at 0
    with torch.no_grad():
        _, prompt_keys = projected(ids, 0)
        for (start, end), pass_ids in passes:
            q, k = projected(pass_ids, 54)  # every pass follows the prompt: earlier passes were dropped
            for g in range(kvh):
                for h in range(g * heads // kvh, (g + 1) * heads // kvh):
                    for i in range(q.shape[1]):  # query i sees the sinks, the chunk, and pass keys 0 .. i
                        keys = torch.cat([prompt_keys[g, :2], prompt_keys[g, start:end], k[g, :i + 1]])
                        p = torch.softmax(keys @ q[h, i] / d ** 0.5, -1)[2:2 + end - start]
                        expected[g, start:end] = torch.maximum(expected[g, start:end], p)
    # a chunk's scores replace what was there (0): the running maximum above starts from 0 for chunks past the sinks
    torch.testing.assert_close(scores[0], expected, atol=1e-5, rtol=1e-4)


def test_the_choice_by_hand():
    scores = torch.tensor([[[1, .9, .1, .2, .8], [1, .05, .3, .7, .6]],
                           [[1, .15, .25, .35, .95], [1, .01, .02, .03, .04]]])
    # 2 layers x 2 heads x 5 tokens, 3 kept per (layer, head) on average: 12 kept, the 8 lowest pruned:
    # .01 .02 .03 .04 .05 .1 .15 .2 -> layer 0 prunes 3, layer 1 prunes 5
    expected = {False: [[[0, 1, 4], [0, 2, 3, 4]], [[0, 2, 3, 4], [0]]],
                # layerwise: 4 per layer. Layer 0: .05 .1 .2 .3; layer 1: .01 .02 .03 .04
                True: [[[0, 1, 4], [0, 3, 4]], [[0, 1, 2, 3, 4], [0]]]}
    for layerwise, kept in expected.items():
        policy = KVzip(cache_size=3, layerwise=layerwise)
        policy.bind(2)
        policy._scores, policy._phase = scores.clone(), "choosing"
        assert [[h.tolist() for h in policy.keep(layer, 5)] for layer in range(2)] == kept
        assert policy._phase == "done" and policy._scores is None


def test_the_cache_after_the_passes():
    tok = tiny_tokenizer()
    model = enable_position_shift(tiny_model("qwen2" if Version(transformers.__version__) >= Version("4.37") else "llama"))
    cache = make_cache("kvzip", model, cache_size=20, context_chunk=25)
    with torch.no_grad():
        prefill(model, PROMPT, cache, tokenizer=tok)
    L, kvh = cache.num_layers, model.config.num_key_value_heads
    lengths = torch.stack([cache.head_lengths(i) for i in range(L)])  # [layers, kv_heads]
    assert int(lengths.sum()) == L * kvh * 20 and int(lengths.min()) < int(lengths.max())  # shared by the scores
    d = model.config.hidden_size // model.config.num_attention_heads
    assert cache.kv_bytes() == int(lengths.sum()) * d * 2 * 4  # heads stored at their own lengths, float32
    # the peak was the prompt and the longest pass (the request, the suffix, 25 tokens), every layer at once
    longest = len(tok.encode(REPEAT_NEXT, add_special_tokens=False)) + 8 + 1 + 25
    assert cache.peak_bytes == L * kvh * (60 + longest) * d * 2 * 4
    assert cache.policy.seen == 60  # the passes' tokens are gone; the next token is at position 60
    for layer in cache.kept_positions():
        for head in layer:
            assert head.tolist() == sorted(set(head.tolist())) and all(0 <= p < 60 for p in head.tolist())


def test_a_prompt_within_the_budget_runs_no_pass():
    model = enable_position_shift(tiny_model("llama"))
    cache = make_cache("kvzip", model, cache_size=64)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    with torch.no_grad():
        prefill(model, PROMPT, cache)  # no tokenizer needed: nothing to score
        model(PROMPT[:, :1], use_cache=True, **with_cache(cache))
    assert len(calls) == 2 and cache.get_seq_length() == 61


def test_refusals_are_one_line():
    model = enable_position_shift(tiny_model("llama"))
    refusals = [
        ("needs the model's tokenizer", lambda: prefill(model, PROMPT, make_cache("kvzip", model, cache_size=20))),
        (r"kvzip scores the prompt by reconstruction passes .* model.generate\(\) inside lacache_core.prompt_passes",
         lambda: model.generate(PROMPT, **with_cache(make_cache("kvzip", model, cache_size=20)), max_new_tokens=2)),
        ("KVzip.context_chunk must be >= 1", lambda: KVzip(context_chunk=0)),
    ]
    for message, call in refusals:
        with pytest.raises(ConfigError, match=message) as error:
            call()
        assert "\n" not in str(error.value)


@pytest.mark.skipif(Version(transformers.__version__) < Version("4.48"),
                    reason="padded batches need the attention-interface path (transformers >= 4.48)")
@pytest.mark.parametrize("quantized", [False, True])
def test_each_row_of_a_left_padded_batch_is_scored_and_kept_as_alone(quantized):
    # rows of 60, 45 and 52 tokens under budgets of their own, and one of 12 within its budget (no pass); each row's
    # passes are its own prompt's, on a copy of its tokens: it keeps what it keeps alone, and answers the same
    from lacache_core import KIVI

    tok = tiny_tokenizer()
    model = enable_position_shift(tiny_model("llama", "sdpa"))
    g = torch.Generator().manual_seed(5)
    lengths, budgets = [60, 45, 52, 12], [20, 15, 26, 20]
    rows = [torch.randint(1, 121, (1, n), generator=g) for n in lengths]
    ids, mask = torch.zeros(4, 60, dtype=torch.long), torch.zeros(4, 60, dtype=torch.long)
    for j, row in enumerate(rows):
        ids[j, 60 - row.shape[1]:], mask[j, 60 - row.shape[1]:] = row[0], 1
    quant = dict(quant=KIVI(bits=4, group=8, residual=16)) if quantized else {}
    cache = make_row_cache("kvzip", model, [dict(cache_size=b, context_chunk=25) for b in budgets], **quant)
    step = torch.randint(1, 121, (4, 1), generator=g)
    with torch.no_grad():
        prefill(model, ids, cache, tokenizer=tok, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
        mask = torch.cat([mask, torch.ones(4, 1, dtype=torch.long)], 1)
        batch_logits = model(step, use_cache=True, **with_cache(cache), attention_mask=mask,
                             position_ids=mask.sum(-1, keepdim=True) - 1).logits[:, -1]
    alone_peak = 0
    for j, (row, budget) in enumerate(zip(rows, budgets)):
        alone = make_cache("kvzip", model, cache_size=budget, context_chunk=25, **quant)
        with torch.no_grad():
            prefill(model, row, alone, tokenizer=tok)
            logits = model(step[j:j + 1], use_cache=True, **with_cache(alone)).logits[:, -1]
        torch.testing.assert_close(batch_logits[j:j + 1], logits, atol=1e-4, rtol=1e-4)
        mine, theirs = cache.row_positions(j), alone.kept_positions()
        assert len(mine) == len(theirs) and all(map(same_positions, mine, theirs)), f"row {j}"
        if lengths[j] > budget:  # scored: its heads share its budget by its own scores
            assert not isinstance(theirs, torch.Tensor) and cache.rows.policies[j].seen == lengths[j] + 1
            alone_peak = max(alone_peak, alone.peak_bytes)  # its prompt and its longest pass
    if not quantized:  # the batch's peak: its padded prompt's keys and values, and one row's copy with its passes
        d = model.config.hidden_size // model.config.num_attention_heads
        per_slot = cache.num_layers * model.config.num_key_value_heads * d * 2 * 4
        assert cache.peak_bytes == 4 * 60 * per_slot + alone_peak


def test_generate_inside_prompt_passes_is_prefill_then_greedy_steps():
    # the hook runs the passes right after generate()'s prompt forward, as prefill does: the same tokens as prefill
    # followed by one greedy forward per token, and the passes' tokens are gone from the cache
    tok = tiny_tokenizer()
    model = enable_position_shift(tiny_model("llama"))
    cache = make_cache("kvzip", model, cache_size=20, context_chunk=25)
    with prompt_passes(model, tok):
        out = model.generate(PROMPT, **with_cache(cache), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    stepped, tokens = make_cache("kvzip", model, cache_size=20, context_chunk=25), []
    with torch.no_grad():
        logits = prefill(model, PROMPT, stepped, tokenizer=tok)
        for _ in range(12):
            tokens.append(int(logits.argmax(-1)))
            logits = model(torch.tensor([[tokens[-1]]]), use_cache=True, **with_cache(stepped)).logits[:, -1]
    assert out[0, 60:].tolist() == tokens
    assert cache.policy.seen == 60 + 11  # the prompt and the 11 tokens fed back
    assert [h.tolist() for h in cache.kept_positions()[2]] == [h.tolist()[:-1] for h in stepped.kept_positions()[2]]
    with prompt_passes(model, tok), pytest.raises(ConfigError, match="got none \\(inputs_embeds\\?\\)"):
        embeds = model.get_input_embeddings()(PROMPT)
        model(inputs_embeds=embeds, use_cache=True, **with_cache(make_cache("kvzip", model, cache_size=20)))
    # outside the block, the hook is gone
    with pytest.raises(ConfigError, match="prompt_passes"):
        model.generate(PROMPT, **with_cache(make_cache("kvzip", model, cache_size=20)), max_new_tokens=2)
