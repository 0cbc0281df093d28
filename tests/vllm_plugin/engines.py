"""A tiny Llama saved for vLLM, and the few calls the tests make of an engine."""
import gc

import torch
import transformers

BLOCK = 32  # the CPU attention kernel's smallest block size


def save_tiny_llama(path, layers=6):
    """A random Llama vLLM's CPU kernel accepts (head_dim 32), with no end-of-sequence token, so that both engines
    generate every requested token. Its matrices are scaled up: peaked logits keep greedy choices clear of the
    float rounding by which two attention kernels differ."""
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.mul_(4.0)
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    return model


def make_llm(path, kv_compression=None, **engine):
    from vllm import LLM

    settings = dict(skip_tokenizer_init=True, enforce_eager=True, dtype="float32", enable_prefix_caching=False,
                    block_size=BLOCK, max_model_len=2048, seed=0)
    settings.update(engine)
    extra = {"kv_compression": kv_compression} if kv_compression is not None else {}
    return LLM(path, additional_config=extra, **settings)


def close(llm):
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def greedy(llm, prompts, new_tokens):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def engine_core(llm):
    """The in-process engine core (scheduler, executor), for what the plugin counted."""
    return llm.llm_engine.engine_core.engine_core
