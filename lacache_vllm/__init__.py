"""LaCache and StreamingLLM inside vLLM: a ``vllm.general_plugins`` entry point (``register``).

Installed with this project (``pip install -e .[vllm]``), the plugin is loaded by every vLLM process and changes
nothing unless the engine is started with ``additional_config={"kv_compression": {...}}`` (see
docs/vllm.md). It then keeps each request's KV cache at the method's budget: the workers compact the cache in place
(:mod:`lacache_vllm.worker`) and the scheduler returns the freed blocks to the pool (:mod:`lacache_vllm.scheduler`),
both by one rule (:mod:`lacache_vllm.ledger`).
"""
from __future__ import annotations

from .settings import CONFIG_KEY, SUPPORTED, CompressionSettings

__all__ = ["register", "check_engine", "CONFIG_KEY", "SUPPORTED", "CompressionSettings"]

#: The vLLM release whose internals the hooks were written and tested against (requirements/lock-vllm.txt).
TESTED_VLLM = "0.32.0"


def check_engine(vllm_config) -> None:
    """Refuse, in one line, engine modes the plugin does not handle (called when the engine's config is built)."""
    from lacache_core.errors import ConfigError

    settings = CompressionSettings.from_config(vllm_config.additional_config)
    if settings is None:
        return
    refused = {
        "enable_prefix_caching": (vllm_config.cache_config.enable_prefix_caching,
                                  "shared prefix blocks would be rewritten by one request's compaction; pass "
                                  "enable_prefix_caching=False (--no-enable-prefix-caching)"),
        "speculative_config": (vllm_config.speculative_config is not None,
                               "draft tokens would be written past a compaction the scheduler has not counted"),
        "async_scheduling": (bool(vllm_config.scheduler_config.async_scheduling),
                             "the scheduler would plan a step before the previous one's compaction is counted; pass "
                             "async_scheduling=False (--no-async-scheduling)"),
        "cache_dtype": (str(vllm_config.cache_config.cache_dtype) != "auto",
                        "quantized KV caches keep scales that moving keys would not update"),
        "decode_context_parallel_size": (getattr(vllm_config.parallel_config, "decode_context_parallel_size", 1) > 1,
                                         "a request's slots are spread over ranks"),
    }
    for name, (bad, why) in refused.items():
        if bad:
            raise ConfigError(f"{CONFIG_KEY} cannot run with {name} set: {why}")
    layers = vllm_config.model_config.hf_text_config.num_hidden_layers
    settings.policy(layers)  # the budget against the model's layer count (LaCache's minimum cache_size)
    import vllm

    if vllm.__version__ != TESTED_VLLM:
        import logging

        logging.getLogger("vllm").warning(
            "%s wraps vLLM internals and was tested with vLLM %s only; this is %s (requirements/lock-vllm.txt)",
            CONFIG_KEY, TESTED_VLLM, vllm.__version__)


def register() -> None:
    """The entry point: wrap vLLM's scheduler, model runner and config check (idempotent, cheap when unused)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from . import scheduler, worker

    scheduler.install(Scheduler)
    worker.install(GPUModelRunner)
    if not getattr(EngineArgs, "_kv_compression_installed", False):
        create = EngineArgs.create_engine_config

        def create_engine_config(self, *args, **kwargs):
            config = create(self, *args, **kwargs)
            check_engine(config)  # here, not in the config's validator, so the error stays one line
            return config

        EngineArgs.create_engine_config = create_engine_config
        EngineArgs._kv_compression_installed = True
