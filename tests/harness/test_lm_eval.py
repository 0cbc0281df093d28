"""The lm-evaluation-harness model ``kvcache`` (harness/lm_eval/), run through lm-eval itself on three local tasks
(one per request type) against lm-eval's own ``hf`` model. Runs where lm-eval is installed (``.venv-lmeval``)."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

from lacache_core.errors import ConfigError  # noqa: E402
from lacache_core.build import prefill  # noqa: E402
from lacache_core.versions import with_cache  # noqa: E402
from harness.lm_eval.model import KVCacheLM  # noqa: E402
from tiny import TINY_WORDS  # noqa: E402

TASKS = ["tiny_gen", "tiny_mc", "tiny_roll"]
ROOT = Path(__file__).resolve().parents[2]
YAML = {
    "tiny_gen": """output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
""",
    "tiny_mc": """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
""",
    "tiny_roll": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
""",
}


def _words(rng, n):
    return " ".join(rng.choice(TINY_WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Three tasks over local jsonl files: prompts of 40-90 words, so that a 16-slot cache compresses them."""
    folder, rng = tmp_path_factory.mktemp("lm_eval_tasks"), random.Random(0)
    docs = {
        "tiny_gen": [{"question": _words(rng, rng.randint(40, 90)), "answer": "w1"} for _ in range(4)],
        "tiny_mc": [{"question": _words(rng, rng.randint(40, 90)), "choices": ["w3", "w5 w6", "w7", "w9"],
                     "label": 0} for _ in range(4)],
        "tiny_roll": [{"text": _words(rng, rng.randint(60, 90))} for _ in range(3)],
    }
    for task, rows in docs.items():
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        (folder / f"{task}.yaml").write_text(f"task: {task}\ndataset_path: json\ndataset_kwargs:\n"
                                              f"  data_files: {data}\ntest_split: train\n" + YAML[task])
    return folder


def evaluate(task_dir, model, model_args, batch_size=1, tasks=TASKS):
    """Each task's responses per document (``resps``, in document order), from lm-eval's ``simple_evaluate``."""
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, device="cpu",
                                  batch_size=batch_size, max_batch_size=4, log_samples=True,
                                  task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    return {task: [s["resps"] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])] for task in tasks}


def scores(responses, task):
    """The numbers of a task's responses: log-likelihoods (multiple choice, per choice) or rolling totals."""
    if task == "tiny_mc":
        return torch.tensor([[choice[0][0] for choice in doc] for doc in responses[task]], dtype=torch.float64)
    return torch.tensor([doc[0][0] for doc in responses[task]], dtype=torch.float64)


@pytest.fixture(scope="module")
def hf(task_dir, tiny_dir):
    return evaluate(task_dir, "hf", {"pretrained": str(tiny_dir)})


def test_method_full_is_hf_exactly(task_dir, tiny_dir, hf):
    assert evaluate(task_dir, "kvcache", {"pretrained": str(tiny_dir), "method": "full"}) == hf


def test_a_budget_above_every_context_gives_hf_scores(task_dir, tiny_dir, hf):
    """Through the compressed path (prefill, copy, stream), with nothing to evict: hf's answers, and its scores up
    to the rounding of reading a sequence in parts."""
    ours = evaluate(task_dir, "kvcache", {"pretrained": str(tiny_dir), "method": "lacache", "cache_size": 4096, "span": 2})
    assert ours["tiny_gen"] == hf["tiny_gen"]
    for task in ("tiny_mc", "tiny_roll"):
        torch.testing.assert_close(scores(ours, task), scores(hf, task), rtol=1e-5, atol=1e-4)


def test_a_small_cache_changes_every_request_type(task_dir, tiny_dir, hf):
    ours = evaluate(task_dir, "kvcache", {"pretrained": str(tiny_dir), "method": "lacache", "cache_size": 16, "span": 2})
    assert ours["tiny_gen"] != hf["tiny_gen"]
    for task in ("tiny_mc", "tiny_roll"):
        assert (scores(ours, task) - scores(hf, task)).abs().min() > 1e-3  # every document's scores moved


@pytest.mark.parametrize("batch_size", [3, "auto"])  # auto: lm-eval probes up to max_batch_size 4 here
def test_a_batch_equals_batch_of_one(task_dir, tiny_dir, batch_size):
    """Generation in a batch left-pads prompts of different lengths, each row compressed as alone."""
    args = {"pretrained": str(tiny_dir), "method": "lacache", "cache_size": 16, "span": 2, "max_length": 256}
    alone = evaluate(task_dir, "kvcache", args, batch_size=1)
    batch = evaluate(task_dir, "kvcache", args, batch_size=batch_size)
    assert batch["tiny_gen"] == alone["tiny_gen"]
    for task in ("tiny_mc", "tiny_roll"):
        torch.testing.assert_close(scores(batch, task), scores(alone, task), rtol=0, atol=0)


@pytest.fixture(scope="module")
def compressed(tiny_dir):
    return KVCacheLM(pretrained=str(tiny_dir), method="snapkv", cache_size=40, device="cpu")


def requests_of(lm, context, continuations):
    ids = lm.tok_encode(context)
    return [((context, c), ids, lm.tok_encode(c)) for c in continuations]


def test_one_prefill_serves_every_continuation_of_a_context(compressed, monkeypatch):
    context, continuations = _words(random.Random(3), 60), [" w4", " w8 w9", " w10"]
    requests = requests_of(compressed, context, continuations)
    fresh = [compressed._loglikelihood_tokens([r], disable_tqdm=True)[0] for r in requests]
    prefills = []
    real = compressed._prefill
    monkeypatch.setattr(compressed, "_prefill", lambda ctx: prefills.append(ctx) or real(ctx))
    shared = compressed._loglikelihood_tokens(requests, disable_tqdm=True)
    assert len(prefills) == 1 and shared == fresh  # exactly: each continuation reads its own copy of one prefill
    assert len({score for score, _ in shared}) == 3


def test_compress_before_says_where_scoring_meets_the_compressed_cache(tiny_dir):
    """0: the whole context is prefilled, then compressed, so a one-token answer is scored from the whole context
    (full's score); 1 (the default): the last context token reads the compressed cache, and the score moves."""
    context, continuation = _words(random.Random(4), 60), [" w4"]
    full = KVCacheLM(pretrained=str(tiny_dir), method="lacache", cache_size=4096, span=2, device="cpu")
    reference = full._loglikelihood_tokens(requests_of(full, context, continuation), disable_tqdm=True)[0][0]
    got = {}
    for before in (0, 1):
        lm = KVCacheLM(pretrained=str(tiny_dir), method="lacache", cache_size=16, span=2, compress_before=before,
                       device="cpu")
        got[before] = lm._loglikelihood_tokens(requests_of(lm, context, continuation), disable_tqdm=True)[0][0]
    assert got[0] == pytest.approx(reference, rel=1e-6, abs=1e-5)
    assert abs(got[1] - reference) > 1e-3


@pytest.mark.parametrize("bad, says", [
    ({"method": "lacache"}, "method=lacache needs cache_size=N"),
    ({"method": "nope"}, "method must be one of"),
    ({"method": "lacache", "cache_size": 0}, "cache_size must be >= 1, got 0"),
    ({"method": "lacache", "cache_size": 16, "span": 0}, "span must be >= 1"),
    ({"method": "lacache", "cache_size": 16, "spna": 2}, "unknown argument 'spna' (did you mean span?)"),
    ({"method": "lacache", "cache_size": 16, "quant_bits": 4}, "quant_bits 4 needs quant kivi or gear"),
    ({"method": "lacache", "cache_size": 16, "compress_before": -1.0}, "compress_before must be an integer >= 0"),
    ({"method": "lacache", "cache_size": 16, "rolling_chunk": 0}, "rolling_chunk must be an integer >= 1"),
])
def test_bad_model_args_are_one_line_naming_the_setting(tiny_dir, bad, says):
    with pytest.raises(ConfigError) as error:
        KVCacheLM(pretrained=str(tiny_dir), device="cpu", **bad)
    message = str(error.value)
    assert message.startswith("model_args: ") and says in message and "\n" not in message


def test_the_command_line_is_lm_evals_with_kvcache_registered(task_dir, tiny_dir, tmp_path):
    common = [sys.executable, "-m", "harness.lm_eval", "run", "--model", "kvcache", "--tasks", "tiny_mc",
              "--include_path", str(task_dir), "--device", "cpu", "--limit", "2"]
    good = subprocess.run(common + ["--model_args", f"pretrained={tiny_dir},method=streamingllm,cache_size=16",
                                    "--output_path", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert good.returncode == 0, good.stderr[-2000:]
    results = json.loads(next(tmp_path.rglob("results_*.json")).read_text())
    assert results["config"]["model"] == "kvcache" and "acc,none" in results["results"]["tiny_mc"]
    bad = subprocess.run(common + ["--model_args", f"pretrained={tiny_dir},method=streamingllm,cache_size=0"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == "error: model_args: cache_size must be >= 1, got 0"


@pytest.mark.parametrize("settings, holds", [
    ({"method": "full", "quant": "kivi", "quant_bits": 2, "quant_group": 8, "quant_residual": 8},
     lambda cache: cache.quant.bits == 2 and cache.quant.residual == 8 and cache.policy.name == "full"),
    ({"method": "lacache", "cache_size": 16, "span": 2, "read": "quest", "quest_budget": 8},
     lambda cache: cache.read.token_budget == 8 and cache.policy.name == "lacache"),
    ({"method": "snapkv", "cache_size": 40, "key_positions": "slot"},
     lambda cache: cache.policy.position_mode == "slot" and cache.policy.cache_size == 40),
])
def test_quantizers_readers_and_key_positions_reach_the_cache(tiny_dir, settings, holds):
    lm = KVCacheLM(pretrained=str(tiny_dir), device="cpu", **settings)
    assert holds(lm._new_cache([60]))
    if "read" not in settings:  # a sparse read narrows decode steps, not the multi-token reads of scoring
        full = KVCacheLM(pretrained=str(tiny_dir), device="cpu")
        context, continuation = _words(random.Random(5), 60), [" w4 w5"]
        ours, plain = (model._loglikelihood_tokens(requests_of(model, context, continuation), disable_tqdm=True)[0][0]
                       for model in (lm, full))
        assert abs(ours - plain) > 1e-4


def test_the_shipped_example_tasks_run(tiny_dir, monkeypatch):
    """harness/lm_eval/tasks/ (what docs/lm_eval.md runs): one task per request type, data paths from the root."""
    monkeypatch.chdir(ROOT)
    tasks = ["kvcache_passkey", "kvcache_stories", "kvcache_prose"]
    out = evaluate(ROOT / "harness" / "lm_eval" / "tasks", "kvcache",
                   {"pretrained": str(tiny_dir), "method": "streamingllm", "cache_size": 16}, tasks=tasks)
    assert [len(out[task]) for task in tasks] == [6, 4, 3]
    assert torch.isfinite(scores(out, "kvcache_prose")).all()


def test_kvzip_runs_its_passes_in_both_request_types(task_dir, tiny_dir):
    # loglikelihood prefills through lacache_core.prefill with the model's tokenizer, which runs KVzip's passes;
    # generate_until runs generate() inside lacache_core.prompt_passes, which runs them after the prompt's forward
    lm = KVCacheLM(pretrained=str(tiny_dir), method="kvzip", cache_size=16, device="cpu")
    context = _words(random.Random(5), 60)
    ids = lm.tok_encode(context)
    cache, last = lm._prefill(ids)
    layers, kv_heads = lm.model.config.num_hidden_layers, lm.model.config.num_key_value_heads
    assert cache.policy.seen == len(ids) - 1  # compress_before 1; the passes' tokens are gone
    assert sum(int(cache.head_lengths(i).sum()) for i in range(layers)) == layers * kv_heads * 16
    full = KVCacheLM(pretrained=str(tiny_dir), method="lacache", cache_size=4096, span=2, device="cpu")
    ours = lm._loglikelihood_tokens(requests_of(lm, context, [" w4"]), disable_tqdm=True)[0][0]
    whole = full._loglikelihood_tokens(requests_of(full, context, [" w4"]), disable_tqdm=True)[0][0]
    assert abs(ours - whole) > 1e-3
    prompt = torch.tensor([ids])
    out = lm._model_generate(prompt, max_length=len(ids) + 6, stop=["w0 w0 w0"])[0, len(ids):].tolist()
    cache, tokens = lm._new_cache([len(ids)]), []
    with torch.no_grad():  # the prompt through lacache_core.prefill, then one greedy forward per token
        logits = prefill(lm.model, prompt, cache, tokenizer=lm.tokenizer)
        for _ in range(len(out)):
            tokens.append(int(logits.argmax(-1)))
            logits = lm.model(torch.tensor([[tokens[-1]]]), use_cache=True, **with_cache(cache)).logits[:, -1]
    assert len(out) == 6 and out == tokens
    # generate_until in a batch: each row scored by its own passes, so the answers of one at a time
    args = {"pretrained": str(tiny_dir), "method": "kvzip", "cache_size": 16, "max_length": 256}
    alone = evaluate(task_dir, "kvcache", args, batch_size=1, tasks=["tiny_gen"])
    assert evaluate(task_dir, "kvcache", args, batch_size=3, tasks=["tiny_gen"]) == alone
