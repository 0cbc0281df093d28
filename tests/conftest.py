import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import json  # noqa: E402
import random  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP threads
# oversubscribe the cores (a 4 ms forward became 500 ms); one thread keeps the suite fast everywhere.
torch.set_num_threads(1)


import pytest  # noqa: E402

from runs import DATASETS  # noqa: E402
from tiny import TINY_WORDS, char_tokenizer, save_tiny_model, tiny_model  # noqa: E402


# tests/harness's ``tiny_dir``; tests/core/conftest.py overrides it there with ``ppl_tiny_dir``
@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A saved 4-layer tiny Llama with the tiny word-level tokenizer: what the prompt harnesses load by path."""
    from tiny import save_tiny_model, tiny_tokenizer

    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama4"), tiny_tokenizer())


# -- fixtures several test modules share (pytest hands them to every module of tests/core and tests/harness; no test
# module imports another; the sys.path entries above let both folders import tiny, references and runs)

WORDS = [f"w{i}" for i in range(120)]


# the perplexity harness's 6-layer eager tiny Llama and its own word-level tokenizer (not ``tiny_dir``'s model):
# tests/core/conftest.py names it ``tiny_dir`` for every module in tests/core, and the two modules of tests/harness
# that run ppl/run.py (test_ppl_harness, test_batch_streams) name it their ``tiny_dir`` themselves
@pytest.fixture(scope="module")
def ppl_tiny_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("tiny_llama")
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    fast.save_pretrained(folder)
    tiny_model("llama", "eager", layers=6).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    g = torch.Generator().manual_seed(3)
    words = [WORDS[i] for i in torch.randint(0, len(WORDS), (700,), generator=g)]
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(" ".join(words))
    return path


def words(rng, n):
    return " ".join(rng.choice(TINY_WORDS) for _ in range(n))


# LongBench-format data (``data_dir``) and RULER-format data (``ruler_data``; test_ruler_pred names it ``data_dir``)
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lb_data")
    rng = random.Random(0)
    for name in DATASETS:
        rows = []
        for i in range(3):
            n = rng.randint(60, 260)  # some prompts longer than --max_length 200: middle truncation
            answer = {"passage_retrieval_en": f"Paragraph {i + 1}", "passage_count": str(i + 2)}.get(name, words(rng, 2))
            rows.append({"_id": f"{name}-{i}", "context": words(rng, n), "input": words(rng, 5),
                         "answers": [answer], "length": n,
                         "all_classes": ["w1", "w2"] if name == "trec" else None})
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if name == "hotpotqa":  # LongBench-E files are {dataset}_e.jsonl
            (folder / "hotpotqa_e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    return folder


@pytest.fixture(scope="module")
def ruler_data(tmp_path_factory):
    """Two tasks in ruler/prepare.py's format (word-level prompts the tiny tokenizer knows)."""
    folder = tmp_path_factory.mktemp("ruler_data") / "256"
    folder.mkdir()
    for task in ("niah_single_1", "vt"):
        rows = [{"index": i, "task": task, "input": " ".join(f"w{(7 * i + j) % 120}" for j in range(180)),
                 "answer_prefix": " w5 w6", "outputs": ["w3"], "length": 182, "max_new_tokens": 4, "depth": [50.0]}
                for i in range(3)]
        (folder / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "prepare.json").write_text(json.dumps({"args": {"max_length": 256}}))
    return folder


@pytest.fixture(scope="module")
def char_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_char"), char_tokenizer(bos=True))
