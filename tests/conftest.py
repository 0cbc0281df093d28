import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP threads
# oversubscribe the cores (a 4 ms forward became 500 ms); one thread keeps the suite fast everywhere.
torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A saved 4-layer tiny Llama with the tiny word-level tokenizer: what the prompt harnesses load by path."""
    from tiny import save_tiny_model, tiny_tokenizer

    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama4"), tiny_tokenizer())
