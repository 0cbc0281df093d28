"""ppl/run.py end to end on a tiny local model: flags, outputs, protocol, errors."""
import json
import math

import pytest
import torch
import transformers

from lacache_core import LaCache
from lacache_core.versions import HAS_CACHE_CLASSES, with_cache
from harness.data import load_texts
from lacache_core.errors import ConfigError
from harness.streaming import next_query_position
from ppl.run import main


@pytest.fixture(scope="module")
def tiny_dir(ppl_tiny_dir):
    """This module's runs use the perplexity harness's tiny model (conftest's ``ppl_tiny_dir``)."""
    return ppl_tiny_dir


def test_run_writes_outputs_and_scores_num_eval_tokens_plus_one(tiny_dir, text_file, tmp_path, capsys):
    rc = main(["--model_name_or_path", str(tiny_dir), "--dataset_name", str(text_file), "--device", "cpu",
               "--method", "full,streamingllm,lacache", "--cache_size", "48", "--span", "2",
               "--num_eval_tokens", "300", "--output_dir", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.count("ppl: ") == 3
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(runs) == 3
    for run in runs:
        summary = json.loads((run / "run.json").read_text())
        nlls = [float(x) for x in (run / "nlls.txt").read_text().split()]
        assert summary["complete"] and len(nlls) == 301 == summary["results"]["tokens_scored"]
        assert math.isclose(summary["results"]["ppl"], math.exp(sum(nlls) / len(nlls)), rel_tol=1e-5)
        assert "transformers" in summary["versions"] and summary["args"]["cache_size"] == 48
        if "matplotlib" in summary["versions"] or _has_matplotlib():
            assert (run / "running_ppl.png").exists()
    full = json.loads(next(r for r in runs if "__full__" in r.name).joinpath("run.json").read_text())
    lac = json.loads(next(r for r in runs if "__lacache" in r.name).joinpath("run.json").read_text())
    assert lac["results"]["peak_kv_bytes"] < full["results"]["peak_kv_bytes"]
    assert (tmp_path / "comparison.md").read_text().count("| lacache |") == 1
    # a rerun finds the finished runs and does not redo them
    rc = main(["--model_name_or_path", str(tiny_dir), "--dataset_name", str(text_file), "--device", "cpu",
               "--method", "full", "--num_eval_tokens", "300", "--output_dir", str(tmp_path)])
    assert rc == 0 and "already done" in capsys.readouterr().out


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def test_full_method_matches_plain_hf_loop(tiny_dir, text_file, tmp_path):
    """Protocol check: same NLLs as a plain transformers token-by-token loop without any patch."""
    main(["--model_name_or_path", str(tiny_dir), "--dataset_name", str(text_file), "--device", "cpu",
          "--num_eval_tokens", "120", "--output_dir", str(tmp_path)])
    run = next(p for p in tmp_path.iterdir() if p.is_dir())
    ours = [float(x) for x in (run / "nlls.txt").read_text().split()]
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ids = tok(text_file.read_text(), return_tensors="pt").input_ids
    past, ref = None, []
    with torch.no_grad():
        for i in range(121):
            res = model(ids[:, i:i + 1], **with_cache(past), use_cache=True)
            past = res.past_key_values
            ref.append(torch.nn.functional.cross_entropy(res.logits[0, -1], ids[0, i + 1]).item())
    assert ours == pytest.approx(ref, abs=1e-5)


def test_official_query_position_drift():
    """Spec: S8 O4 on 32 layers, the cache length cycles 254..258 and the official query sticks at 258."""
    policy, held, pos, official, ours = LaCache(256, 8, 4, 4), 0, -1, [], []
    for t in range(600):
        pos = next_query_position(pos, held, "official")
        official.append(pos)
        ours.append(next_query_position(pos, held, "slot"))
        policy.compact(held + 1, 32)
        held = policy.positions.shape[1]
    assert official[:259] == list(range(259)) and set(official[300:]) == {258}
    assert set(ours[300:]) == {254, 255, 256, 257, 258}
    assert max(o - s for o, s in zip(official, ours)) == 4  # R - 1


@pytest.mark.parametrize("argv,flag", [
    (["--span", "0", "--enable_lacache"], "--span"),
    (["--overlap", "16", "--span", "16", "--enable_lacache"], "--overlap"),
    (["--cache_size", "10", "--span", "2", "--enable_lacache"], "--cache_size"),
    (["--span", "6", "--enable_lacache"], "--span"),
    (["--dtype", "float8", "--method", "full"], "--dtype"),
    (["--dataset_name", "missing_file.jsonl", "--method", "full"], "--dataset_name"),
])
def test_bad_settings_give_one_line_errors(tiny_dir, text_file, tmp_path, capsys, argv, flag):
    base = ["--model_name_or_path", str(tiny_dir), "--dataset_name", str(text_file), "--device", "cpu",
            "--output_dir", str(tmp_path)]
    assert main(base + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1].split("\r")[-1]
    assert err.startswith("error: ") and flag in err


def test_bad_method_and_token_count_rejected_by_parser(capsys):
    for argv, flag in ((["--method", "h2o_typo"], "--method"), (["--num_eval_tokens", "0"], "--num_eval_tokens"),
                       (["--span", "x"], "--span")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and flag in err[0]


def test_local_dataset_formats(tmp_path):
    (tmp_path / "a.txt").write_text("one two three")
    assert load_texts(str(tmp_path / "a.txt")) == ["one two three"]
    datasets = pytest.importorskip("datasets")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x y"}) + "\n" + json.dumps({"text": "z"}) + "\n")
    assert load_texts(str(tmp_path / "b.jsonl")) == ["x y", "z"]
    ds = datasets.Dataset.from_dict({"text": ["p", "q"]})
    ds.to_parquet(str(tmp_path / "c.parquet"))
    assert load_texts(str(tmp_path / "c.parquet")) == ["p", "q"]
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "saved"))
    assert load_texts(str(tmp_path / "saved"), split="test") == ["p", "q"]
    with pytest.raises(ConfigError, match="--split"):
        load_texts(str(tmp_path / "saved"), split="validation")
    with pytest.raises(ConfigError, match="no 'text' field"):
        (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
        load_texts(str(tmp_path / "d.jsonl"))


def test_hub_name_offline_gives_one_line_message(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError) as err:
        load_texts("no-such-org/no-such-dataset-xyz", None, "test")
    assert "local .txt" in str(err.value) and "\n" not in str(err.value)


def test_interrupted_run_resumes_with_identical_results(tiny_dir, text_file, tmp_path, monkeypatch):
    import ppl.run as run_module

    common = ["--model_name_or_path", str(tiny_dir), "--dataset_name", str(text_file), "--device", "cpu",
              "--method", "lacache", "--cache_size", "48", "--span", "2", "--overlap", "0", "--num_eval_tokens", "300",
              "--checkpoint_every", "50"]
    assert main(common + ["--output_dir", str(tmp_path / "clean")]) == 0
    clean_dir = next((tmp_path / "clean").iterdir())
    clean = (clean_dir / "nlls.txt").read_text()
    assert not (clean_dir / "resume.pt").exists()

    real = run_module.stream_perplexity

    def interrupted(*a, on_token=None, **kw):
        def boom(i, nll):
            on_token(i, nll)
            if i == 222:
                raise KeyboardInterrupt
        return real(*a, on_token=boom, **kw)

    monkeypatch.setattr(run_module, "stream_perplexity", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(common + ["--output_dir", str(tmp_path / "cut")])
    cut_dir = next((tmp_path / "cut").iterdir())
    assert len((cut_dir / "nlls.txt").read_text().split()) == 223  # nothing scored was lost
    assert (cut_dir / "resume.pt").exists()
    monkeypatch.setattr(run_module, "stream_perplexity", real)
    assert main(common + ["--output_dir", str(tmp_path / "cut")]) == 0
    summary = json.loads((cut_dir / "run.json").read_text())
    assert summary["results"]["resumed"] is True and summary["complete"]
    assert (cut_dir / "nlls.txt").read_text() == clean  # resumed from the token-200 checkpoint, same numbers


class _Planted:
    """A pickle that would write a file when loaded."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_a_planted_checkpoint_is_refused_and_runs_nothing(tmp_path, capsys):
    import torch

    from harness.streaming import load_checkpoint

    planted, target = tmp_path / "resume.pt", tmp_path / "pwned"
    torch.save({"nlls": [], "policy": _Planted(target)}, planted)
    with pytest.raises(ConfigError, match="not a checkpoint this harness wrote"):
        load_checkpoint(planted)
    assert not target.exists()
    planted.write_bytes(b"\x00garbage")
    with pytest.raises(ConfigError):
        load_checkpoint(planted)


@pytest.mark.skipif(not HAS_CACHE_CLASSES, reason="drives a CompressedCache (transformers >= 4.36)")
def test_policy_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import torch

    from lacache_core import enable_position_shift, make_cache
    from lacache_core.policies import policy_from_state
    from lacache_core.versions import with_cache
    from tiny import tiny_model

    model = tiny_model("llama", "eager", layers=4)
    enable_position_shift(model)
    for method, settings in (("lacache", dict(span=2)), ("h2o", {}), ("lshe", dict(recent_window=4)), ("tova", {})):
        cache = make_cache(method, model, cache_size=24, start_size=2, **settings)
        with torch.no_grad():
            model(torch.arange(30)[None] % 100, use_cache=True, **with_cache(cache))
            for t in range(12):
                model(torch.tensor([[t + 3]]), use_cache=True, **with_cache(cache))
        policy = cache.policy
        path = tmp_path / f"{method}.pt"
        torch.save({"policy": policy.state_dict()}, path)
        restored = policy_from_state(torch.load(path, weights_only=True)["policy"])
        assert restored.settings() == policy.settings() and restored.seen == policy.seen == 42
        assert restored.positions_per_layer() == policy.positions_per_layer()
        assert max(len(row) for row in restored.positions_per_layer()) <= restored.max_cache_len(4)


def test_local_model_and_data_never_touch_the_network(tiny_dir, tmp_path, monkeypatch):
    """With the HF offline variables unset, a local folder and local files load with every socket blocked."""
    import socket

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    tried = []

    def blocked(self, address, *a, **k):
        tried.append(address)
        raise OSError(f"network blocked in this test: {address}")

    monkeypatch.setattr(socket.socket, "connect", blocked)
    monkeypatch.setattr(socket.socket, "connect_ex", blocked)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: blocked(None, address))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": " ".join(["w1", "w2", "w3"] * 30)}) + "\n"
                                              for _ in range(2)))
    (tmp_path / "b.json").write_text(json.dumps([{"text": "w4 w5 " * 40}]))
    for data in ("a.jsonl", "b.json"):
        assert main(["--model_name_or_path", str(tiny_dir), "--dataset_name", str(tmp_path / data), "--device", "cpu",
                     "--method", "streamingllm", "--cache_size", "32", "--num_eval_tokens", "40",
                     "--output_dir", str(tmp_path / "out")]) == 0
    assert tried == []
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "w1"}) + "\n{not json\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl: line 2 is not JSON"):
        load_texts(str(tmp_path / "bad.jsonl"))


def test_skip_bad_rows_in_a_local_corpus(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "w1 w2"}\n{oops\n{"body": "w3"}\n{"text": "w4"}\n')
    with pytest.raises(ConfigError, match=r"c.jsonl: line 2 is not JSON \(--skip_bad_rows"):
        load_texts(str(tmp_path / "c.jsonl"))
    skipped = []
    assert load_texts(str(tmp_path / "c.jsonl"), skipped=skipped) == ["w1 w2", "w4"]
    assert skipped == ["c.jsonl:2", "c.jsonl row 2"]
