"""Position-shift numerics on any device: patched (no eviction) vs unpatched logits, per dtype and kernel.

Without eviction the patched model must reproduce the unpatched one up to the dtype's rounding
(keys are rotated in a different order of operations). Prints one row per setting.

    python scripts/check_numerics.py --device cuda
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.flags import ArgumentParser  # noqa: E402
from harness.models import device_arg  # noqa: E402
from harness.runner import run_main  # noqa: E402
from lacache_core.errors import ConfigError  # noqa: E402

from lacache_core import enable_position_shift, make_cache  # noqa: E402
from lacache_core.versions import output_cache, with_cache  # noqa: E402


def logits_loop(model, tokens, cache):
    out = []
    with torch.inference_mode():
        for t in range(tokens.shape[1]):
            res = model(tokens[:, t:t + 1], use_cache=True, **with_cache(cache))
            cache = output_cache(res)
            out.append(res.logits[0, -1].float())
    return torch.stack(out)


def _run(argv=None) -> int:
    import transformers

    p = ArgumentParser(description=__doc__)
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=200)
    args = p.parse_args(argv)
    if args.tokens < 1:
        raise ConfigError(f"--tokens must be >= 1, got {args.tokens}")
    kernels = ["eager", "sdpa"]
    try:
        import flash_attn  # noqa: F401
        kernels.append("flash_attention_2")
    except ImportError:
        print("flash_attn not installed: flash_attention_2 skipped")
    print("| family | kernel | dtype | max abs diff (patched vs unpatched) | top-1 agreement |\n|---|---|---|---|---|")
    for family, cls in (("llama", transformers.LlamaConfig), ("mistral", transformers.MistralConfig),
                        ("qwen2", transformers.Qwen2Config)):
        cfg = cls(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192)
        for kernel in kernels:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                if kernel == "flash_attention_2" and dtype == torch.float32:
                    continue
                torch.manual_seed(0)
                model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=kernel)
                model = model.to(args.device, dtype).eval()
                tokens = torch.randint(0, 1024, (1, args.tokens), generator=torch.Generator().manual_seed(1))
                tokens = tokens.to(args.device)
                ref = logits_loop(model, tokens, transformers.DynamicCache())
                enable_position_shift(model)
                ours = logits_loop(model, tokens, make_cache("lacache", model, cache_size=10_000, span=2))
                agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
                print(f"| {family} | {kernel} | {str(dtype).split('.')[-1]} | {(ours - ref).abs().max().item():.2e} | "
                      f"{agree:.3f} |", flush=True)


def main(argv=None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
