"""The vLLM plugin's tests run where vLLM is installed (.venv-vllm); engines start in this process."""
import importlib.util
import os

import pytest

if importlib.util.find_spec("vllm") is None:  # every other environment: nothing here to collect
    collect_ignore_glob = ["*.py"]

# Before vLLM reads its settings: the engine in this process (2-10 s to start instead of 30 s), 1 GiB of KV space,
# and no thread pinning on a shared CI machine.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")



@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny Llama on disk (for vLLM) and in memory (for our cache)."""
    from engines import save_tiny_llama

    path = tmp_path_factory.mktemp("tiny_llama")
    model = save_tiny_llama(path)
    return str(path), model
