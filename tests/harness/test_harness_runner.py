"""The shared runner: flags generated from the policies' fields, result identity, refusals, library apart."""
import json
import re
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar, Optional

import pytest
import torch

from lacache_core.errors import ConfigError
from lacache_core.policies import METHODS
from lacache_core.policies.base import CachePolicy, param
from lacache_core.quantizers import KIVI, QUANTIZERS, Quantizer
from lacache_core.versions import HAS_CACHE_CLASSES
from tiny import TINY_WORDS, result_dir, save_tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
needs_cache_classes = pytest.mark.skipif(not HAS_CACHE_CLASSES, reason="prompt harnesses need transformers >= 4.36")


@dataclass
class NewestOnly(CachePolicy):
    """Keep the sinks and the newest tokens (a method added by a test, at run time).

    Parameters
    ----------
    cache_size : int
        Slots per layer.
    start_size : int
        Sinks.
    knob : int
        A hyper-parameter that only this method has.
    """

    name: ClassVar[str] = "newest_only"
    default_positions: ClassVar[str] = "slot"

    cache_size: int = param(64, low=lambda p: p.start_size + 1)
    start_size: int = param(4, low=0)
    knob: int = param(3, low=1, high=9)

    def max_cache_len(self, num_layers: int) -> int:
        return self.cache_size

    def select(self, n: int, num_layers: int) -> Optional[torch.Tensor]:
        if n <= self.cache_size:
            return None
        row = torch.cat([torch.arange(self.start_size), torch.arange(n - self.cache_size + self.start_size, n)])
        return row.expand(num_layers, row.shape[0])


@pytest.fixture
def new_method(monkeypatch):
    monkeypatch.setitem(METHODS, NewestOnly.name, NewestOnly)
    return NewestOnly


def parsers():
    import longbench.pred
    import niah.pred
    import ppl.run
    import ruler.pred
    return {"ppl": ppl.run.parse_args, "longbench": longbench.pred.parse_args, "niah": niah.pred.parse_args,
            "ruler": lambda argv: ruler.pred.parse_args(["--data_dir", "x", *argv])}


def help_text(parse, capsys) -> str:
    with pytest.raises(SystemExit):
        parse(["--help"])
    return capsys.readouterr().out


# ----------------------------------------------------------------------------------------- flags
def test_every_hyperparameter_has_a_flag_with_help_in_every_harness(capsys):
    from harness.flags import field_docs

    for harness, parse in parsers().items():
        text = help_text(parse, capsys)
        for method, cls in METHODS.items():
            docs = field_docs(cls)
            for name in cls.hyperparameters():
                assert f"--{name}" in text, (harness, name)
                assert docs.get(name), f"{cls.__name__}.{name} has no Parameters entry in its docstring"


def test_a_method_added_at_run_time_gets_flags_checks_and_folder_names(new_method, capsys, tiny_dir, tmp_path):
    for harness, parse in parsers().items():
        text = help_text(parse, capsys)
        assert "newest_only" in text and "--knob" in text, harness
        flat = " ".join(text.split())
        assert "--knob KNOB A hyper-parameter that only this method has. [newest_only; default 3; in [1, 9]]" in flat
    from ppl.run import main

    text = tmp_path / "t.txt"
    text.write_text(" ".join(TINY_WORDS[i % 100] for i in range(400)))
    common = ["--model_name_or_path", str(tiny_dir), "--dataset_name", str(text), "--device", "cpu",
              "--method", "newest_only", "--cache_size", "40", "--num_eval_tokens", "60", "--output_dir", str(tmp_path)]
    assert main(common + ["--knob", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --knob must be in [1, 9], got 10"]
    assert main(common + ["--knob", "5"]) == 0
    folder = result_dir(tmp_path, f"{tiny_dir.name}__t.txt__newest_only_c40_knob-5__n60")
    run = json.loads((folder / "run.json").read_text())
    assert run["setting"]["method"] == {"method": "newest_only", "cache_size": 40, "start_size": 4, "knob": 5,
                                        "key_positions": "slot"}
    assert run["results"]["max_cache_len"] == 40


@dataclass(frozen=True)
class HalfPrecision(Quantizer):
    """Codes of a few mantissa bits (a quantizer added by a test, at run time).

    Parameters
    ----------
    mantissa : int
        Mantissa bits each code keeps.
    """

    name: ClassVar[str] = "half"

    mantissa: int = param(10, low=1, high=23)

    def new_store(self, key, value):
        from lacache_core.quant import KIVIStore

        return KIVIStore(KIVI(bits=8, group=4, residual=8), key, value)  # any working store: the flags are the point


@needs_cache_classes  # --quant holds a CompressedCache
def test_a_quantizer_added_at_run_time_gets_flags_checks_and_folder_names(monkeypatch, capsys, tiny_dir, tmp_path):
    harnesses = parsers()  # imported before the registration: nothing is read from the registry at import time
    monkeypatch.setitem(QUANTIZERS, HalfPrecision.name, HalfPrecision)
    for harness, parse in harnesses.items():
        flat = " ".join(help_text(parse, capsys).split())
        assert "--quant {none,kivi,gear,half}" in flat, harness
        assert "--quant_mantissa QUANT_MANTISSA Mantissa bits each code keeps. [--quant half; default 10; in [1, 23]]" \
            in flat, harness
    from ppl.run import main

    text = tmp_path / "t.txt"
    text.write_text(" ".join(TINY_WORDS[i % 100] for i in range(400)))
    common = ["--model_name_or_path", str(tiny_dir), "--dataset_name", str(text), "--device", "cpu",
              "--method", "full", "--num_eval_tokens", "60", "--output_dir", str(tmp_path)]
    assert main(common + ["--quant", "half", "--quant_mantissa", "30"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --quant_mantissa must be in [1, 23], got 30"]
    assert main(common + ["--quant_mantissa", "7"]) == 2  # given without the --quant that reads it
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --quant_mantissa 7 needs --quant half; --quant none does not use it"]
    assert main(common + ["--quant", "kivi", "--quant_mantissa", "7"]) == 2
    assert main(common + ["--quant", "half", "--quant_bits", "4"]) == 2  # KIVI's field: half does not read it
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "error: --quant_bits 4 needs --quant kivi or gear; --quant half does not use it"
    assert main(common + ["--quant", "half", "--quant_mantissa", "7"]) == 0
    folder = result_dir(tmp_path, f"{tiny_dir.name}__t.txt__full_half_mantissa-7__n60")
    run = json.loads((folder / "run.json").read_text())
    assert run["setting"]["cache"]["quant"] == {"method": "half", "mantissa": 7}


@dataclass
class NewestOnlyWithLaterKnob(NewestOnly):
    """NewestOnly after a release added a field whose default reproduces the earlier behaviour.

    Parameters
    ----------
    later : int
        A field added after results were recorded.
    """

    later: int = param(0, low=0, added_later=True)


def test_a_field_added_later_keeps_old_hashes_at_its_default_and_enters_them_otherwise(monkeypatch):
    import longbench.pred
    from harness.flags import method_identity

    def identity_and_settings(cls, argv):
        monkeypatch.setitem(METHODS, "newest_only", cls)
        args = longbench.pred.parse_args(["--method", "newest_only", "--cache_size", "40", *argv])
        later = {"later": args.later} if getattr(args, "later", None) is not None else {}
        return method_identity(args, "newest_only"), cls(cache_size=40, **later).settings()

    before = identity_and_settings(NewestOnly, [])
    assert identity_and_settings(NewestOnlyWithLaterKnob, []) == before
    assert identity_and_settings(NewestOnlyWithLaterKnob, ["--later", "0"]) == before
    identity, settings = identity_and_settings(NewestOnlyWithLaterKnob, ["--later", "2"])
    assert identity == {**before[0], "later": 2} and settings == {**before[1], "later": 2}


def test_docs_flag_table_is_the_generated_one():
    from harness.flags import flags_table

    page = (ROOT / "docs" / "methods.md").read_text()
    block = re.search(r"<!-- method flags: python -m harness.flags -->\n(.*?)\n<!-- end method flags -->", page, re.S)
    assert block is not None and block.group(1) == flags_table()


def test_model_flag_spellings_and_budget_or_cache_size():
    from harness.generation import budget_spec

    for harness, parse in parsers().items():
        names = ("--model_name_or_path", "--model_name") + (() if harness == "longbench" else ("--model",))
        for flag in names:
            assert parse([flag, "some/model"]).model_name_or_path == "some/model", (harness, flag)
    import longbench.pred as pred

    official = pred.parse_args(["--model", "meta-llama/Llama-2-7b-chat-hf", "--method", "lacache", "--budget", "0.5"])
    pred.validate(official)  # the LaCache repository's spelling: the weights as --model
    assert (official.model, official.weights, official.max_length) == (
        "llama2-7b-chat-4k", "meta-llama/Llama-2-7b-chat-hf", 3500)
    args = pred.parse_args(["--cache_size", "40", "--max_length", "100", "--method", "lacache"])
    pred.validate(args)
    assert args.budget is None and budget_spec(args, "lacache", 100).cache_size == 40
    args = pred.parse_args(["--max_length", "100"])
    pred.validate(args)
    assert args.budget == 0.5 and budget_spec(args, "lacache", 100).cache_size == 50
    with pytest.raises(ConfigError, match="--budget .* or --cache_size .* not both"):
        pred.validate(pred.parse_args(["--budget", "0.5", "--cache_size", "40", "--max_length", "100"]))


def test_help_groups_model_data_method_output(capsys):
    for harness, parse in parsers().items():
        text = help_text(parse, capsys)
        starts = [text.index(f"\n{group}:\n") for group in ("model", "data", "method", "output")]
        assert starts == sorted(starts), harness


# ----------------------------------------------------------------------------------------- identity
def test_setting_hash_and_refusal_names_what_differs(tmp_path):
    from harness.identity import differences, digest
    from harness.runner import Run

    args = type("A", (), {})()
    a = {"model": {"name": "m", "fingerprint": "f"}, "method": {"name": "snapkv", "kernel_size": 5}}
    b = {"model": {"name": "m", "fingerprint": "f"}, "method": {"name": "snapkv", "kernel_size": 7}}
    assert digest(a) != digest(b) and digest(a) == digest(json.loads(json.dumps(a)))
    assert differences(a, b) == ["method.kernel_size: 5 -> 7"]
    run = Run(tmp_path, "x", a, args)
    run.start()
    assert Run(tmp_path, "x", a, args).previous["setting"] == a  # the same setting resumes
    record = json.loads(run.path.read_text())
    record["setting"]["method"]["kernel_size"] = 7  # as if two settings had met under one hash
    run.path.write_text(json.dumps(record))
    with pytest.raises(ConfigError) as err:
        Run(tmp_path, "x", a, args)
    assert "method.kernel_size: 7 -> 5" in str(err.value) and "\n" not in str(err.value)
    assert json.loads(run.path.read_text())["git"] is None or "commit" in json.loads(run.path.read_text())["git"]


def test_model_fingerprint_tells_same_named_folders_apart(tmp_path):
    from harness.identity import model_identity

    a = save_tiny_model(tmp_path / "a" / "tiny", tiny_tokenizer())
    b = save_tiny_model(tmp_path / "b" / "tiny", tiny_tokenizer(), seed=1)  # other weights, same name
    c = tmp_path / "c" / "tiny"
    c.mkdir(parents=True)
    for f in a.iterdir():
        (c / f.name).write_bytes(f.read_bytes())
    fa, fb, fc = (model_identity(str(p))["fingerprint"] for p in (a, b, c))
    assert fa != fb and fa == fc


def _lb_data(folder: Path, n=2):
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"_id": f"hotpotqa-{i}", "context": " ".join(TINY_WORDS[(7 * i + j) % 100] for j in range(150)),
             "input": "w1 w2", "answers": ["w3"], "length": 150, "all_classes": None} for i in range(n)]
    (folder / "hotpotqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _records(root: Path):
    """Every results file under ``root``, with its folder and row count."""
    return {p.relative_to(root).as_posix(): len(p.read_text().splitlines())
            for p in root.rglob("*") if p.suffix in (".jsonl", ".csv")}


@needs_cache_classes
@pytest.mark.parametrize("first,second", [
    (["--method", "snapkv", "--kernel_size", "5"],
     ["--method", "snapkv", "--kernel_size", "7", "--pooling", "avg", "--window_size", "16"]),
    (["--method", "pyramidkv", "--window_size", "8", "--beta", "4"],
     ["--method", "pyramidkv", "--window_size", "8", "--beta", "2"]),
    (["--method", "lshe", "--lsh_seed", "0"], ["--method", "lshe", "--lsh_seed", "1"]),
    (["--method", "lacache", "--max_new_tokens", "3"], ["--method", "lacache", "--max_new_tokens", "5"]),
])
def test_longbench_reruns_with_another_setting_never_share_records(tiny_dir, tmp_path, first, second):
    from longbench.pred import main

    data = _lb_data(tmp_path / "data")
    base = ["--model", "tiny", "--model_name_or_path", str(tiny_dir), "--max_length", "160", "--data_dir", str(data),
            "--datasets", "hotpotqa", "--device", "cpu", "--span", "2", "--budget", "0.5", "--start_size", "4",
            "--output_dir",
            str(tmp_path / "out")]
    assert main(base + ["--max_new_tokens", "4"] + first) == 0
    assert main(base + ["--max_new_tokens", "4"] + second) == 0
    files = _records(tmp_path / "out")
    assert len(files) == 2 and set(files.values()) == {2}, files  # two folders of two rows, none of four
    folders = sorted((tmp_path / "out" / "pred").iterdir())
    settings = [json.loads((f / "run.json").read_text())["setting"] for f in folders]
    assert settings[0] != settings[1]
    assert main(base + ["--max_new_tokens", "4"] + second) == 0  # the same setting again: resumes, adds nothing
    assert _records(tmp_path / "out") == files


@needs_cache_classes
def test_niah_rerun_with_another_seed_never_shares_records(tiny_dir, tmp_path):
    from niah.pred import main

    base = ["--model_name", str(tiny_dir), "--max_tokens", "100", "--interval", "100", "--depths", "0,100",
            "--num_tests", "1", "--method", "streamingllm", "--start_size", "4", "--device", "cpu",
            "--output_dir", str(tmp_path)]
    assert main(base + ["--seed", "1"]) == 0 and main(base + ["--seed", "2"]) == 0
    files = _records(tmp_path)
    assert len(files) == 2 and set(files.values()) == {3}, files  # header + two cells each


@needs_cache_classes
def test_ruler_runs_of_same_named_model_folders_never_share_records(tmp_path):
    from ruler.pred import main

    data = tmp_path / "data" / "256"
    data.mkdir(parents=True)
    rows = [{"index": i, "input": " ".join(TINY_WORDS[(3 * i + j) % 100] for j in range(60)), "outputs": ["w5"],
             "length": 61, "max_new_tokens": 3} for i in range(2)]
    (data / "vt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for where in ("a", "b"):
        model = save_tiny_model(tmp_path / where / "tiny", tiny_tokenizer(), seed=len(where) + ord(where))
        assert main(["--model_name_or_path", str(model), "--data_dir", str(data), "--method", "lacache", "--span", "2",
                     "--device", "cpu", "--no_chat", "--output_dir", str(tmp_path / "out")]) == 0
    files = _records(tmp_path / "out")
    assert len(files) == 2 and set(files.values()) == {2}, files


# ----------------------------------------------------------------------------------------- library apart
def test_the_library_imports_no_harness_code_and_needs_only_torch_and_transformers():
    for path in (ROOT / "lacache_core").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(from|import) (harness|ppl|longbench|niah|ruler|scripts)\b", text, re.M), path
    code = ("import sys, lacache_core; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('harness', 'ppl', 'longbench', 'niah', 'ruler', 'datasets', 'matplotlib', 'gguf', 'accelerate')); "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_every_field_range_is_declared_once_and_checked_by_the_policy():
    """Each policy checks its own fields' ranges (``param``): the harness holds no copy of them."""
    flags_source = (ROOT / "harness" / "flags.py").read_text()
    for cls in METHODS.values():
        for f in fields(cls):
            if f.init and f.name not in ("cache_size", "start_size"):
                assert f"--{f.name}" not in flags_source, f"harness/flags.py names --{f.name} itself"
    with pytest.raises(ConfigError, match=r"LaCache.overlap must be in \[0, 3\], got 4"):
        METHODS["lacache"](span=4, overlap=4)


def test_the_official_scripts_flags_still_parse():
    """The flags of the LaCache repository's ppl/run.py, LongBench/pred.py and niah/pred.py @ 0f27c33."""
    import longbench.pred
    import niah.pred
    import ppl.run

    args = ppl.run.parse_args(["--model_name_or_path", "m", "--dataset_name", "wikitext", "--task", "wikitext-2-raw-v1",
                               "--split", "test", "--num_eval_tokens", "100", "--enable_lacache", "--cache_size", "256",
                               "--span", "16", "--overlap", "0"])
    assert (args.methods, args.cache_size, args.span, args.overlap) == (["lacache"], 256, 16, 0)
    args = longbench.pred.parse_args(["--model", "meta-llama/Llama-2-7b-chat-hf", "--e", "--method", "lacache",
                                      "--span", "9", "--overlap", "3", "--budget", "0.25"])
    longbench.pred.validate(args)
    assert (args.e, args.methods, args.span, args.overlap, args.budget) == (True, ["lacache"], 9, 3, 0.25)
    args = niah.pred.parse_args(["--model_name", "m", "--max_tokens", "8192", "--interval", "2948", "--num_tests",
                                 "5", "--enable_lacache", "--span", "14", "--overlap", "0", "--budget", "0.5"])
    niah.pred.validate(args)
    assert (args.methods, args.span, args.budget, args.max_tokens) == (["lacache"], 14, 0.5, 8192)


@pytest.mark.parametrize("name", ["../../../x", "/etc/passwd", "a/../../b", "..", "", "odd name:*?<>|\\x", "é" * 400])
def test_result_folders_stay_inside_the_output_folder(tmp_path, name):
    from harness.runner import Run

    run = Run(tmp_path / "out", name, {"x": 1}, type("A", (), {})())
    run.start()
    assert run.folder.resolve().parent == (tmp_path / "out").resolve()
    assert re.fullmatch(r"[A-Za-z0-9_=+-][A-Za-z0-9._=+-]*-[0-9a-f]{8}", run.folder.name)


def test_no_code_runs_from_files_a_user_is_handed():
    """No pickle loads, eval, remote code or shell in the project's own code."""
    patterns = [r"weights_only\s*=\s*False", r"trust_remote_code\s*=\s*True", r"(?<![\w.])eval\(", r"\bpickle\.load",
                r"shell\s*=\s*True", r"os\.system\("]
    for folder in ("lacache_core", "lacache_vllm", "harness", "ppl", "ppl_legacy", "longbench", "niah", "ruler", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            for pattern in patterns:
                assert not re.search(pattern, text), f"{path}: {pattern}"


@needs_cache_classes
def test_bad_model_folders_and_data_files_are_one_line_errors(tiny_dir, tmp_path, capsys):
    from longbench.pred import main as longbench
    from ruler.pred import main as ruler

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    empty = tmp_path / "empty"
    empty.mkdir()
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_dir / "config.json").read_text())
    data = _lb_data(tmp_path / "data")
    base = ["--max_length", "160", "--data_dir", str(data), "--datasets", "hotpotqa", "--device", "cpu",
            "--output_dir", str(tmp_path / "out"), "--method", "full"]
    cases = [(["--model_name_or_path", str(m)] + base, "--model_name_or_path") for m in (broken, empty, no_weights)]
    garbage = _lb_data(tmp_path / "garbage")
    (garbage / "hotpotqa.jsonl").write_text('{"_id": "a"}\n{oops\n{"_id": "b"}\n')
    cases.append((["--model_name_or_path", str(tiny_dir), *base, "--data_dir", str(garbage)], "hotpotqa.jsonl:2"))
    nocontext = _lb_data(tmp_path / "nocontext")
    (nocontext / "hotpotqa.jsonl").write_text(json.dumps({"_id": "a", "input": "w1", "answers": ["w2"]}) + "\n")
    cases.append((["--model_name_or_path", str(tiny_dir), *base, "--data_dir", str(nocontext)], "'context'"))
    hollow = _lb_data(tmp_path / "hollow")
    (hollow / "hotpotqa.jsonl").write_text("")
    cases.append((["--model_name_or_path", str(tiny_dir), *base, "--data_dir", str(hollow)], "no samples"))
    (tmp_path / "file").write_text("x")
    cases.append((["--model_name_or_path", str(tiny_dir), *base, "--output_dir", str(tmp_path / "file")],
                  "--output_dir"))
    for argv, needle in cases:
        assert longbench(argv) == 2, argv
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and needle in err[0], (needle, err)
    ruler_data = tmp_path / "ruler" / "256"
    ruler_data.mkdir(parents=True)
    (ruler_data / "vt.jsonl").write_text("")
    assert ruler(["--model_name_or_path", str(tiny_dir), "--data_dir", str(ruler_data), "--device", "cpu",
                  "--output_dir", str(tmp_path / "rout")]) == 2
    assert "vt.jsonl has no samples" in capsys.readouterr().err


@needs_cache_classes
def test_skip_bad_rows_goes_on_and_counts_them(tiny_dir, tmp_path, capsys):
    from longbench.pred import main

    data = _lb_data(tmp_path / "data", n=3)
    lines = (data / "hotpotqa.jsonl").read_text().splitlines()
    bad = json.dumps({"_id": "x", "input": "w1", "answers": ["w2"]})  # no context
    (data / "hotpotqa.jsonl").write_text("\n".join([lines[0], "{oops", lines[1], bad, lines[2]]) + "\n")
    base = ["--model", "tiny", "--model_name_or_path", str(tiny_dir), "--max_length", "160", "--data_dir", str(data),
            "--datasets", "hotpotqa", "--device", "cpu", "--method", "full", "--max_new_tokens", "2",
            "--output_dir", str(tmp_path / "out")]
    assert main(base) == 2
    assert "hotpotqa.jsonl:2: not a JSON object (--skip_bad_rows" in capsys.readouterr().err
    assert main(base + ["--skip_bad_rows"]) == 0
    err = capsys.readouterr().err
    assert "left out 2 bad rows" in err and "hotpotqa.jsonl:2" in err
    folder = next((tmp_path / "out" / "pred").iterdir())
    run = json.loads((folder / "run.json").read_text())
    assert run["skipped_rows"] == {"hotpotqa": 2} and run["complete"]
    assert len((folder / "hotpotqa.jsonl").read_text().splitlines()) == 3
