"""harness/loop.py: the one prediction loop of longbench/, ruler/ and niah/.

A toy benchmark shows the loop's own rules (longest first, resume, sharding, per-row budget); then each of
the three benchmarks, through the loop, gives records equal to values worked out without it (a direct
answer of each prompt), and the same records when killed and resumed, sharded over two ranks and batched.
"""
import json
import random
import types

import pytest
import torch
import transformers
from packaging.version import Version

from lacache_core import enable_position_shift
from lacache_core.versions import HAS_CACHE_CLASSES
from tiny import TINY_WORDS, killed_after, tiny_model

pytestmark = pytest.mark.skipif(not HAS_CACHE_CLASSES, reason="prompt harnesses need transformers >= 4.36")
BATCHES = Version(transformers.__version__) >= Version("4.48")  # left-padded batches of a compressing method
needs_batches = pytest.mark.skipif(not BATCHES, reason="padded batches need transformers >= 4.48")


# ----------------------------------------------------------------------------------------- toy benchmark
class IdTokenizer:
    pad_token_id, eos_token_id = None, 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


LENGTHS = [20, 41, 12, 33, 27]  # rows 1, 3, 4, 0, 2 longest first


class FakeRun:
    def __init__(self, folder):
        self.folder, self.finished = folder, None

    def start(self, **info):
        self.folder.mkdir(parents=True, exist_ok=True)

    def finish(self, **results):
        self.finished = results


def toy(tmp_path, model, batch_size=1, rank=0, world=1, longest_first=True):
    """A toy benchmark (rows with ids ``r0..r4``, prompts of random token ids, half-prompt budgets), the calls
    the loop made to it, and its run."""
    from harness.generation import BudgetSpec
    from harness.loop import Benchmark, JsonlStore, Part

    g = torch.Generator().manual_seed(5)
    prompts = {f"r{i}": torch.randperm(120, generator=g)[:n][None] + 1 for i, n in enumerate(LENGTHS)}
    rows = [{"id": key, "n": ids.shape[-1]} for key, ids in prompts.items()]
    seen = types.SimpleNamespace(prompted=[], recorded=[], budgets=[])

    def budget(n):
        seen.budgets.append(n)
        return BudgetSpec("streamingllm", cache_size=n // 2, start_size=2)

    def prompt(row):
        seen.prompted.append(row["id"])
        return prompts[row["id"]], 5

    def record(row, answer):
        seen.recorded.append(row["id"])
        return {"id": row["id"], "pred": answer.text, "prompt_tokens": answer.prompt_tokens}

    part = Part("toy", rows, JsonlStore("id"), prompt, record, budget, longest_first=longest_first)
    run = FakeRun(tmp_path / "run")
    args = types.SimpleNamespace(methods=["streamingllm"], rank=rank, world=world, batch_size=batch_size,
                                 prefill_chunk_size=None)
    return args, Benchmark(lambda method: (run, {"method": method}), lambda method: [part], "score.py"), seen, run


def alone(model, n_row):
    """Row ``n_row``'s answer worked out without the loop: its prompt alone under half its length as budget."""
    from harness.generation import BudgetSpec, answer

    g = torch.Generator().manual_seed(5)
    ids = [torch.randperm(120, generator=g)[:n][None] + 1 for n in LENGTHS][n_row]
    return answer(model, IdTokenizer(), ids, BudgetSpec("streamingllm", cache_size=LENGTHS[n_row] // 2, start_size=2),
                  5).text


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def model():
    return enable_position_shift(tiny_model("llama", "sdpa", layers=2))


@needs_batches
def test_toy_batches_longest_first_and_writes_rows_in_order_each_under_its_budget(tmp_path, model):
    from harness.loop import run_benchmark

    args, bench, seen, run = toy(tmp_path, model, batch_size=2)
    run_benchmark(args, bench, model, IdTokenizer())
    assert seen.recorded == ["r1", "r3", "r4", "r0", "r2"]  # answered longest prompt first
    assert sorted(seen.budgets) == sorted(LENGTHS)  # one budget per row, of its own prompt's length
    rows = read(run.folder / "toy.jsonl")
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(5)]  # the file in row order
    assert [r["prompt_tokens"] for r in rows] == LENGTHS
    assert [r["pred"] for r in rows] == [alone(model, i) for i in range(5)]
    assert run.finished == {"method": "streamingllm", "skipped_rows": {}}


def test_toy_in_row_order_when_not_longest_first(tmp_path, model):
    from harness.loop import run_benchmark

    args, bench, seen, run = toy(tmp_path, model, batch_size=2 if BATCHES else 1, longest_first=False)
    run_benchmark(args, bench, model, IdTokenizer())
    assert seen.recorded == seen.prompted == [f"r{i}" for i in range(5)]


def test_toy_resume_skips_the_rows_already_recorded(tmp_path, model):
    from harness.loop import run_benchmark

    args, bench, seen, run = toy(tmp_path, model)
    run.folder.mkdir(parents=True)
    done = [{"id": "r3", "pred": "old", "prompt_tokens": 0}, {"id": "r0", "pred": "old", "prompt_tokens": 0}]
    (run.folder / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in done) + '{"id": "r2", "pr')
    run_benchmark(args, bench, model, IdTokenizer())
    assert seen.prompted == ["r1", "r2", "r4"]  # r2's line was cut short by a kill: redone
    rows = read(run.folder / "toy.jsonl")
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(5)]
    assert [r["pred"] for r in rows] == ["old", alone(model, 1), alone(model, 2), "old", alone(model, 4)]


def test_toy_ranks_take_their_share_and_rank_0_merges_all(tmp_path, model, monkeypatch):
    import harness.records as records
    from harness.loop import run_benchmark

    monkeypatch.setattr(records, "barrier", lambda: True)  # ranks one after the other, rank 0 last
    shares = {}
    for rank in (1, 0):
        args, bench, seen, run = toy(tmp_path, model, rank=rank, world=2)
        run_benchmark(args, bench, model, IdTokenizer())
        shares[rank] = sorted(seen.prompted)
        if rank == 1:
            assert [r["id"] for r in read(run.folder / "toy.rank1-of-2.jsonl")] == sorted(shares[1])
            assert run.finished == {"method": "streamingllm", "skipped_rows": {}}
    assert shares == {0: ["r0", "r2", "r4"], 1: ["r1", "r3"]}  # every 2nd row from the rank's own
    rows = read(run.folder / "toy.jsonl")
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(5)]
    assert [r["pred"] for r in rows] == [alone(model, i) for i in range(5)]
    assert sorted(p.name for p in run.folder.iterdir()) == ["toy.jsonl"]  # shards merged away


# ----------------------------------------------------------------------------------------- the three benchmarks
def words(rng, n):
    return " ".join(rng.choice(TINY_WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """LongBench rows (two datasets, one with samsum's stop rule) and RULER tasks, in the tiny tokenizer's words."""
    root = tmp_path_factory.mktemp("loop_data")
    (root / "lb").mkdir()
    rng = random.Random(1)
    for name in ("hotpotqa", "samsum"):
        rows = [{"_id": f"{name}-{i}", "context": words(rng, n), "input": words(rng, 4), "answers": [words(rng, 2)],
                 "length": n, "all_classes": None} for i, n in enumerate([70, 240, 40, 150])]
        (root / "lb" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ruler = root / "ruler" / "256"
    ruler.mkdir(parents=True)
    for task in ("niah_single_1", "vt"):
        rows = [{"index": i, "input": " ".join(f"w{(5 * i + j) % 120}" for j in range(n)), "answer_prefix": " w5",
                 "outputs": ["w3"], "length": n + 1, "max_new_tokens": 3} for i, n in enumerate([90, 170, 130, 60])]
        (ruler / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (ruler / "prepare.json").write_text(json.dumps({"args": {"max_length": 256}}))
    return root


def lb_run(tiny_dir, data, out, *extra):
    from longbench.pred import main
    return main(["--model", "tiny", "--model_name_or_path", str(tiny_dir), "--max_length", "200", "--data_dir",
                 str(data / "lb"), "--datasets", "hotpotqa,samsum", "--device", "cpu", "--output_dir", str(out),
                 "--method", "lacache", "--span", "2", "--budget", "0.25", "--max_new_tokens", "5", *extra])


def ruler_run(tiny_dir, data, out, *extra):
    from ruler.pred import main
    return main(["--model_name_or_path", str(tiny_dir), "--data_dir", str(data / "ruler" / "256"), "--device", "cpu",
                 "--output_dir", str(out), "--method", "h2o", "--budget", "0.5", *extra])


def niah_run(tiny_dir, data, out, *extra):
    from niah.pred import main
    return main(["--model_name", str(tiny_dir), "--max_tokens", "200", "--interval", "100", "--num_tests", "2",
                 "--depths", "0,100", "--device", "cpu", "--output_dir", str(out), "--method", "streamingllm",
                 "--start_size", "4", "--max_new_tokens", "4", "--budget", "0.5", *extra])


def jsonl_records(folder, names):
    """The records of each file written so far (a killed run has not reached every one)."""
    return {name: read(folder / f"{name}.jsonl") for name in names if (folder / f"{name}.jsonl").exists()}


def lb_records(folder):
    return jsonl_records(folder, ("hotpotqa", "samsum"))


def ruler_records(folder):
    return jsonl_records(folder, ("niah_single_1", "vt"))


def niah_records(folder):
    import csv

    with open(folder / "results.csv", newline="") as f:
        return {"results": list(csv.DictReader(f))}


BENCHMARKS = {  # run, records, the module whose answer_all to cut short, the folder of one run's results
    "longbench": (lb_run, lb_records, "longbench.pred", lambda out: out / "pred"),
    "ruler": (ruler_run, ruler_records, "ruler.pred", lambda out: out),
    "niah": (niah_run, niah_records, "niah.pred", lambda out: out),
}


def folder_of(root):
    found = [p for p in root.iterdir() if p.is_dir()]
    assert len(found) == 1, found
    return found[0]


def without(records, *fields):
    """The records with ``fields`` left out (``seconds`` is a timing; a batch shares its cost over its rows)."""
    return {name: [{k: v for k, v in r.items() if k not in fields} for r in rows] for name, rows in records.items()}


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_killed_sharded_and_batched_runs_give_the_plain_records(name, tiny_dir, data, tmp_path, monkeypatch):
    import importlib

    import harness.records as records
    import harness.runner as runner

    run, of, module, under = BENCHMARKS[name]
    assert run(tiny_dir, data, tmp_path / "plain") == 0
    plain = of(folder_of(under(tmp_path / "plain")))
    assert sum(map(len, plain.values())) == 8

    pred = importlib.import_module(module)
    real = pred.answer_all
    monkeypatch.setattr(pred, "answer_all", killed_after(real, 3))
    with pytest.raises(KeyboardInterrupt):
        run(tiny_dir, data, tmp_path / "cut")
    monkeypatch.setattr(pred, "answer_all", real)
    assert sum(map(len, of(folder_of(under(tmp_path / "cut"))).values())) == 3
    assert run(tiny_dir, data, tmp_path / "cut") == 0
    assert without(of(folder_of(under(tmp_path / "cut"))), "seconds", "prefill_seconds") == without(plain, "seconds", "prefill_seconds")

    with monkeypatch.context() as m:  # two ranks one after the other, rank 0 last: its barrier means all done
        m.setattr(records, "barrier", lambda: True)
        m.setenv("WORLD_SIZE", "2")
        for rank in (1, 0):
            m.setattr(runner, "init_distributed", lambda: (rank, 2))
            assert run(tiny_dir, data, tmp_path / "two") == 0
            if rank == 1:  # rank 1 answered its half only, into its own shard files
                shards = list(folder_of(under(tmp_path / "two")).glob("*.rank1-of-2.*"))
                assert shards and sum(len(p.read_text().splitlines()) - (p.suffix == ".csv") for p in shards) == 4
    two = folder_of(under(tmp_path / "two"))
    assert not list(two.glob("*rank*"))
    assert without(of(two), "seconds", "prefill_seconds") == without(plain, "seconds", "prefill_seconds")
    assert folder_of(under(tmp_path / "two")).name == folder_of(under(tmp_path / "plain")).name

    if BATCHES:
        assert run(tiny_dir, data, tmp_path / "batch", "--batch_size", "3") == 0
        cost = ("seconds", "prefill_seconds", "peak_kv_bytes", "final_kv_bytes", "batch_rows")
        assert without(of(folder_of(under(tmp_path / "batch"))), *cost) == without(plain, *cost)


def test_longbench_records_are_each_prompt_answered_alone(tiny_dir, data, tmp_path):
    from harness.generation import answer, budget_spec, stop_token_ids
    from harness.models import load_model
    from lacache_core import enable_position_shift as shift
    from longbench.config import PROMPTS
    from longbench.pred import encode, parse_args, validate

    assert lb_run(tiny_dir, data, tmp_path) == 0
    got = lb_records(folder_of(tmp_path / "pred"))
    args = parse_args(["--model", "tiny", "--model_name_or_path", str(tiny_dir), "--max_length", "200",
                       "--device", "cpu", "--method", "lacache", "--span", "2", "--budget", "0.25"])
    validate(args)
    model, tok = load_model(str(tiny_dir), "float32", "cpu", None)
    shift(model)
    spec = budget_spec(args, "lacache", 200)
    assert spec.cache_size == 50  # 0.25 x --max_length, whatever the prompt's length
    for name, rows in got.items():
        samples = [json.loads(line) for line in (data / "lb" / f"{name}.jsonl").read_text().splitlines()]
        assert [r["_id"] for r in rows] == [s["_id"] for s in samples]
        stop = stop_token_ids(tok, model, extra=["\n"] if name == "samsum" else ())
        for sample, row in zip(samples, rows):
            ids = encode(tok, PROMPTS[name].format(**sample), name, args)
            want = answer(model, tok, ids, spec, 5, stop, min_new_tokens=int(name == "samsum"))
            assert (row["pred"], row["prompt_tokens"]) == (want.text, ids.shape[-1])
            assert (row["answers"], row["length"], row["all_classes"]) == (sample["answers"], sample["length"], None)
            assert row["batch_rows"] == 1 and row["peak_kv_bytes"] > 0


def test_ruler_records_carry_the_budget_of_each_prompt(tiny_dir, data, tmp_path):
    from harness.generation import BudgetSpec, answer, stop_token_ids
    from harness.models import load_model
    from lacache_core import enable_position_shift as shift

    assert ruler_run(tiny_dir, data, tmp_path) == 0
    model, tok = load_model(str(tiny_dir), "float32", "cpu", None)
    shift(model)
    for task, rows in ruler_records(folder_of(tmp_path)).items():
        samples = [json.loads(line) for line in (data / "ruler" / "256" / f"{task}.jsonl").read_text().splitlines()]
        assert [r["index"] for r in rows] == [0, 1, 2, 3]
        for sample, row in zip(samples, rows):
            ids = tok(sample["input"] + sample["answer_prefix"], return_tensors="pt").input_ids  # no chat template
            n = ids.shape[-1]
            assert row["prompt_tokens"] == n and row["cache_size"] == int(0.5 * n)  # --budget 0.5 of each prompt
            want = answer(model, tok, ids, BudgetSpec("h2o", int(0.5 * n)), 3, stop_token_ids(tok, model))
            assert row["pred"] == want.text
            assert row["outputs"] == ["w3"] and row["length"] == sample["length"]


def test_niah_records_score_each_cell(tiny_dir, data, tmp_path):
    from niah.haystack import pass_key

    assert niah_run(tiny_dir, data, tmp_path) == 0
    rows = niah_records(folder_of(tmp_path))["results"]
    assert [(r["context_length"], r["depth"], r["test"]) for r in rows] == \
        [(str(n), d, str(t)) for n in (100, 200) for d in ("0", "100") for t in (0, 1)]
    assert all(int(r["prompt_tokens"]) <= int(r["context_length"]) for r in rows)
    for r in rows:  # 100 when the key's digits are in the answer (the tiny vocabulary has no digits: never)
        key = pass_key(1234, int(r["context_length"]), float(r["depth"]), int(r["test"]))
        assert r["score"] == ("100" if str(key) in r["pred"] else "0")
    meta = json.loads((folder_of(tmp_path) / "run.json").read_text())
    assert meta["complete"] and meta["tests"] == 8 and "skipped_rows" not in meta


def test_longbench_runs_kvzip_through_its_scoring_passes(tiny_dir, data, tmp_path):
    # the harness hands the tokenizer to the prefill, which runs KVzip's passes; each record says what the prefill cost
    from harness.generation import answer, budget_spec, stop_token_ids
    from harness.models import load_model
    from lacache_core import enable_position_shift as shift
    from longbench.config import PROMPTS
    from longbench.pred import encode, parse_args, validate

    flags = ["--method", "kvzip", "--context_chunk", "64"]
    assert lb_run(tiny_dir, data, tmp_path / "pred", *flags) == 0
    args = parse_args(["--model", "tiny", "--model_name_or_path", str(tiny_dir), "--max_length", "200", "--device",
                       "cpu", "--budget", "0.25", *flags])
    validate(args)
    model, tok = load_model(str(tiny_dir), "float32", "cpu", None)
    shift(model)
    spec = budget_spec(args, "kvzip", 200)
    assert spec.settings["context_chunk"] == 64
    for name, rows in lb_records(folder_of(tmp_path / "pred")).items():
        samples = [json.loads(line) for line in (data / "lb" / f"{name}.jsonl").read_text().splitlines()]
        stop = stop_token_ids(tok, model, extra=["\n"] if name == "samsum" else ())
        for sample, row in zip(samples, rows):
            ids = encode(tok, PROMPTS[name].format(**sample), name, args)
            want = answer(model, tok, ids, spec, 5, stop, min_new_tokens=int(name == "samsum"))
            assert row["pred"] == want.text
            assert 0 < row["prefill_seconds"] <= row["seconds"]
            if ids.shape[-1] > 64:  # scored: the passes raised the peak above what is kept
                assert row["peak_kv_bytes"] > row["final_kv_bytes"]
    if not BATCHES:
        return
    # --batch_size 2: each prompt scored by its own passes, so the same answers as one at a time
    assert lb_run(tiny_dir, data, tmp_path / "batched", *flags, "--batch_size", "2") == 0
    single, batched = lb_records(folder_of(tmp_path / "pred")), lb_records(folder_of(tmp_path / "batched"))
    assert {name: [r["pred"] for r in rows] for name, rows in batched.items()} == \
        {name: [r["pred"] for r in rows] for name, rows in single.items()}
    assert all(r["batch_rows"] == 2 for rows in batched.values() for r in rows[:2])
