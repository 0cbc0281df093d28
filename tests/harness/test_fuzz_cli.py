"""Bad input to every CLI: a clean one-line ``error:`` and a non-zero exit, never a traceback or a hang.

The cases are generated: every numeric flag of every CLI with a value that is not a number, every
flag with choices with a value outside them, every method hyper-parameter just outside its declared
range, and bad paths and files (a missing model, a corrupt or empty model folder, an output folder
that is a file, garbage, binary and empty data files). Each case runs in a child forked from this
warmed-up process (imports done once), so hundreds of cases take seconds.
"""
import importlib
import importlib.util
import json
import os
import select
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from harness.flags import ArgumentParser, method_flags
from harness.runner import run_main
from lacache_core.versions import HAS_CACHE_CLASSES
from tiny import TINY_WORDS

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the fuzz cases fork")

CLIS = ["ppl.run", "longbench.pred", "longbench.eval", "longbench.synthetic", "niah.pred", "niah.plot",
        "ruler.prepare", "ruler.pred", "ruler.eval"]
SCRIPTS = ["bench_decode", "bench_prefill", "generate_forever", "check_numerics", "collect_ppl", "make_tables",
           "bench_kv_bytes", "bench_batch", "memory_frontier", "head_scores"]
ROOT = Path(__file__).resolve().parents[2]


def load(name: str):
    if name in SCRIPTS:
        key = f"script_{name}"
        if key not in sys.modules:
            spec = importlib.util.spec_from_file_location(key, ROOT / "scripts" / f"{name}.py")
            sys.modules[key] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(sys.modules[key])
        return sys.modules[key]
    return importlib.import_module(name)


class _Parser(BaseException):
    def __init__(self, parser):
        self.parser = parser


def parser_of(module, monkeypatch):
    """The argparse parser a CLI builds (captured when it parses)."""
    def capture(self, *a, **k):
        raise _Parser(self)
    with monkeypatch.context() as m:
        m.setattr(ArgumentParser, "parse_args", capture)
        try:
            module.main([])
        except _Parser as got:
            return got.parser
    return None


def run_forked(main, argv, env=None, timeout=120.0):
    """``(exit code, stderr)`` of ``main(argv)`` in a forked child (99: it raised; -9: killed after ``timeout``)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 99
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(write, 2)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # pytest's capture object is not fd 2
            os.environ.update(env or {})
            torch.set_num_threads(1)  # no OpenMP pool in a forked child
            code = run_main(main, argv)
            code = code if isinstance(code, int) else 0
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 99
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    chunks, deadline = [], time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([read], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            break
        data = os.read(read, 65536)
        if not data:
            break
        chunks.append(data)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return code, b"".join(chunks).decode("utf-8", "replace")


def check(case, main, argv, needle=None, env=None):
    code, err = run_forked(main, argv, env)
    lines = [line.split("\r")[-1] for line in err.splitlines()]
    errors = [line for line in lines if line.startswith("error:")]
    problem = None
    if "Traceback" in err or code == 99:
        problem = "traceback"
    elif code == -9:
        problem = "hang"
    elif code == 0:
        problem = "exit 0"
    elif len(errors) != 1:
        problem = f"{len(errors)} error lines"
    elif needle is not None and needle not in errors[0]:
        problem = f"error does not name {needle!r}"
    return None if problem is None else f"{case} {argv}: {problem}\n{err[-600:]}"


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("fuzz")
    out = {"tiny": str(tiny_dir), "root": root}
    (root / "a_file").write_text("x")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (root / "garbage.jsonl").write_text('{"text": "w1"}\n{oops\n{"text": "w2"}\n')
    (root / "empty.jsonl").write_text("")
    truncated = root / "truncated_model"
    truncated.mkdir()
    for f in Path(tiny_dir).iterdir():
        data = f.read_bytes()
        (truncated / f.name).write_bytes(data[:len(data) // 3] if f.suffix in (".safetensors", ".bin") else data)
    corrupt = root / "corrupt_model"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    (root / "empty_model").mkdir()
    lb = root / "lb"
    lb.mkdir()
    (lb / "hotpotqa.jsonl").write_text('{"_id": "a"}\n{oops\n')
    ruler = root / "ruler" / "256"
    ruler.mkdir(parents=True)
    (ruler / "vt.jsonl").write_text("\x00\x01binary")
    preds = root / "preds"
    preds.mkdir()
    (preds / "vt.jsonl").write_text("{oops\n")
    (preds / "hotpotqa.jsonl").write_text("{oops\n")
    (preds / "run.json").write_text("{oops")
    text = root / "words.txt"
    text.write_text(" ".join(TINY_WORDS[i % 100] for i in range(300)))
    bad_kinds(root, tiny_dir)
    return out


def bad_kinds(root: Path, tiny_dir) -> None:
    """Files whose contents do not match their kind, and folders where files belong (and back)."""
    (root / "nul.txt").write_bytes(b"\0" * 500)  # decodes as UTF-8: only the byte check catches it
    (root / "controls.txt").write_bytes(bytes(range(1, 32)) * 20)
    (root / "blank.txt").write_text("  \n\n \t\n")
    (root / "one_token.txt").write_text("w1")
    (root / "empty_text.jsonl").write_text('{"text": ""}\n')
    (root / "not.parquet").write_text("not parquet at all")
    (root / "folder.txt").mkdir()
    (root / "plain_folder").mkdir()
    (root / "plain_folder" / "a.txt").write_text("w1 w2")
    (root / "damaged_dataset").mkdir()
    (root / "damaged_dataset" / "state.json").write_text("{oops")
    (root / "squad.json").mkdir()
    for name, member in (("lb_folders", "hotpotqa.jsonl"), ("ruler_folders", "vt.jsonl"), ("preds_folders", "vt.jsonl")):
        (root / name / member).mkdir(parents=True)
    (root / "preds_folders" / "hotpotqa.jsonl").mkdir()
    for name, member in (("binary_preds", "vt.jsonl"), ("binary_preds", "hotpotqa.jsonl"), ("binary_run", "run.json")):
        (root / name).mkdir(exist_ok=True)
        (root / name / member).write_bytes(bytes(range(256)))
    (root / "binary_run" / "hotpotqa.jsonl").write_text('{"pred": "a", "answers": ["a"]}\n')
    (root / "empty_dir").mkdir()
    overflowing_model(tiny_dir, root / "overflow_model")


def overflowing_model(tiny_dir, folder: Path) -> None:
    """The tiny model with an infinite final norm: every logit, and so every loss, is NaN (as a float16 overflow)."""
    import shutil

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("inf"))
    model.save_pretrained(folder)
    for f in Path(tiny_dir).iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, folder / f.name)


def generated_cases(monkeypatch):
    """``(case, module name, argv, needle)`` for every numeric and choice flag of every CLI."""
    cases = []
    for name in CLIS + SCRIPTS:
        module = load(name)
        parser = parser_of(module, monkeypatch)
        if parser is None:
            continue
        for action in parser._actions:
            flag = next((o for o in action.option_strings if o.startswith("--")), None)
            if flag is None:
                continue
            if action.type in (int, float):
                cases += [("not a number", name, [flag, "abc"], flag), ("empty", name, [flag, ""], flag)]
            if action.choices:
                cases.append(("not a choice", name, [flag, "no-such-choice"], flag))
    return cases


def test_every_numeric_and_choice_flag_of_every_cli(monkeypatch):
    cases = generated_cases(monkeypatch)
    assert len(cases) > 150  # every CLI contributed
    failures = [check(case, load(name).main, argv, needle) for case, name, argv, needle in cases]
    failures = [f for f in failures if f]
    assert not failures, "\n\n".join(failures[:10])


def test_every_hyperparameter_just_outside_its_range(files):
    harnesses = {"ppl.run": ["--model_name_or_path", files["tiny"]],
                 "longbench.pred": ["--model_name_or_path", files["tiny"], "--max_length", "100"],
                 "niah.pred": ["--model_name", files["tiny"]],
                 "ruler.pred": ["--model_name_or_path", files["tiny"], "--data_dir", str(files["root"] / "ruler" / "256")]}
    failures = []
    from lacache_core.policies import METHODS
    for flag in method_flags().values():
        method = next(iter(flag.defaults))
        f = next(f for f in __import__("dataclasses").fields(METHODS[method]) if f.name == flag.name)
        low, above = f.metadata.get("low"), f.metadata.get("above")
        bad = (low - 1 if isinstance(low, int) and not callable(low) else None) if above is None else above
        if bad is None or flag.kind not in (int, float):
            continue
        for name, base in harnesses.items():
            argv = base + ["--method", method, f"--{flag.name}", str(bad), "--output_dir", str(files["root"] / "o")]
            failures.append(check("out of range", load(name).main, argv, f"--{flag.name}"))
    failures = [f for f in failures if f]
    assert not failures, "\n\n".join(failures[:10])


#: Flag values out of range that each CLI must refuse (the hyper-parameters are generated above).
OUT_OF_RANGE = {
    "ppl.run": [("--num_eval_tokens", "0"), ("--checkpoint_every", "-1"), ("--cache_size", "0"),
                ("--start_size", "-1")],
    "longbench.pred": [("--budget", "0"), ("--budget", "1.5"), ("--max_length", "1"), ("--max_new_tokens", "0"),
                       ("--num_samples", "0"), ("--prefill_chunk_size", "0"), ("--cache_size", "0"),
                       ("--start_size", "-1"), ("--datasets", "nope")],
    "niah.pred": [("--max_tokens", "0"), ("--interval", "0"), ("--num_tests", "0"), ("--max_new_tokens", "0"),
                  ("--depths", "200"), ("--budget", "2"), ("--method", "nope")],
    "ruler.pred": [("--num_samples", "0"), ("--budget", "0"), ("--tasks", "nope")],
    "ruler.prepare": [("--max_length", "0"), ("--num_samples", "0"), ("--tasks", "nope")],
    "longbench.synthetic": [("--num_samples", "0")],
}


def test_harness_flags_out_of_range(files):
    base = {"ruler.pred": ["--data_dir", str(files["root"] / "ruler" / "256")]}
    failures = []
    for name, cases in OUT_OF_RANGE.items():
        for flag, value in cases:
            argv = base.get(name, []) + [flag, value, "--output_dir", str(files["root"] / "o")]
            failures.append(check("out of range", load(name).main, argv, flag))
    failures = [f for f in failures if f]
    assert not failures, "\n\n".join(failures[:10])


def test_bad_paths_and_files(files):
    root, tiny = files["root"], files["tiny"]
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    model_cases = []
    for model in (str(root / "no_such_model"), str(root / "corrupt_model"), str(root / "empty_model"),
                  str(root / "truncated_model"), str(root / "a_file")):
        model_cases += [("ppl.run", ["--model_name_or_path", model, "--dataset_name", str(root / "words.txt")],
                         "--model_name_or_path")]
        if HAS_CACHE_CLASSES:
            model_cases += [("niah.pred", ["--model_name", model, "--max_tokens", "100", "--interval", "100"],
                             "--model_name_or_path"),
                            ("longbench.pred", ["--model_name_or_path", model, "--max_length", "100",
                                                "--data_dir", str(root / "lb")], "--model_name_or_path")]
    data_cases = [
        ("ppl.run", ["--model_name_or_path", tiny, "--dataset_name", str(root / "binary.txt")], "binary.txt"),
        ("ppl.run", ["--model_name_or_path", tiny, "--dataset_name", str(root / "garbage.jsonl")], "garbage.jsonl"),
        ("ppl.run", ["--model_name_or_path", tiny, "--dataset_name", str(root / "empty.jsonl")], "empty.jsonl"),
        ("ppl.run", ["--model_name_or_path", tiny, "--dataset_name", str(root / "missing.jsonl")], "missing.jsonl"),
        ("longbench.eval", ["--path", str(root / "preds")], "preds"),
        ("longbench.eval", ["--path", str(root / "nowhere")], "--path"),
        ("ruler.eval", ["--pred_dir", str(root / "preds")], "preds"),
        ("niah.plot", [str(root / "nowhere.csv")], None),
        ("scripts.collect", [str(root / "nowhere")], None),
    ]
    if HAS_CACHE_CLASSES:
        data_cases += [
            ("longbench.pred", ["--model_name_or_path", tiny, "--max_length", "100", "--data_dir", str(root / "lb"),
                                "--datasets", "hotpotqa", "--method", "full", "--output_dir", str(root / "o")], "hotpotqa.jsonl:2"),
            ("longbench.pred", ["--model_name_or_path", tiny, "--max_length", "100", "--data_dir", str(root / "nope"),
                                "--datasets", "hotpotqa", "--method", "full", "--output_dir", str(root / "o")], "--data_dir"),
            ("ruler.pred", ["--model_name_or_path", tiny, "--data_dir", str(root / "ruler" / "256"), "--method", "full",
                            "--output_dir", str(root / "o")], "vt.jsonl"),
            ("ruler.pred", ["--model_name_or_path", tiny, "--data_dir", str(root / "nope")], "--data_dir"),
        ]
    output_cases = [(name, base + ["--output_dir", str(root / "a_file")], "--output_dir") for name, base in (
        ("ppl.run", ["--model_name_or_path", tiny, "--dataset_name", str(root / "words.txt")]),
        ("longbench.pred", ["--model_name_or_path", tiny, "--max_length", "100", "--data_dir", str(root / "lb")]),
        ("niah.pred", ["--model_name", tiny]),
        ("ruler.pred", ["--model_name_or_path", tiny, "--data_dir", str(root / "ruler" / "256")]),
        ("ruler.prepare", ["--tokenizer", tiny]))]
    failures = []
    for name, argv, needle in model_cases + data_cases + output_cases:
        module = load("collect_ppl") if name == "scripts.collect" else load(name)
        failures.append(check("bad path", module.main, argv, needle, env=offline))
    failures = [f for f in failures if f]
    assert not failures, "\n\n".join(failures[:10])


def test_bash_scripts_reject_bad_flags(tmp_path):
    """The table scripts (scripts/lib.sh parses their flags) and setup.sh: one error line, exit 2."""
    import subprocess

    (tmp_path / "a_file").write_text("x")
    tables = ["table1_ppl", "table2_ppl_80", "pg19", "table3_longbench", "table4_longbench_smollm2",
              "ablation_overlap", "niah", "table5_ruler"]
    cases = [(f"{name}.sh", argv) for name in tables
             for argv in (["--bogus"], ["--gpus", "0"], ["--gpus", "x"], ["--out", str(tmp_path / "a_file")])]
    cases += [("setup.sh", ["--bogus"]), ("smoke_all.sh", ["--gpus", "0"])]
    failures = []
    for script, argv in cases:
        done = subprocess.run(["bash", str(ROOT / "scripts" / script), *argv], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "PYTHON": sys.executable})
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        if done.returncode != 2 or len(errors) != 1:
            failures.append(f"{script} {argv}: rc {done.returncode}\n{done.stderr[-400:]}")
    assert not failures, "\n\n".join(failures)


#: Device strings that torch parses, or not, but that no run can use on this machine (none has 8 GPUs or a
#: device called ``cpux``); each CLI must refuse them while parsing, naming ``--device``.
BAD_DEVICES = ["cuda:7", "cpux", "", "meta", "cpu:1", "cuda:x", "CUDA"]
if not torch.cuda.is_available():
    BAD_DEVICES.append("cuda")
if not torch.backends.mps.is_available():
    BAD_DEVICES.append("mps")


def device_clis(monkeypatch):
    """``(name, main)`` of every CLI whose parser has ``--device`` (the legacy perplexity CLI included)."""
    found = []
    for name in CLIS + SCRIPTS:
        module = load(name)
        parser = parser_of(module, monkeypatch)
        if parser is not None and any("--device" in a.option_strings for a in parser._actions):
            found.append((name, module.main))
    return found + [("ppl_legacy", load("ppl.run").legacy_main)]


def test_every_device_flag_refuses_devices_not_on_this_machine(monkeypatch, files):
    clis = device_clis(monkeypatch)
    assert len(clis) >= 10  # the four harnesses, head_scores, the benchmarks, generate_forever, check_numerics
    failures = [check("bad device", main, ["--device", device], "--device") for _, main in clis
                for device in BAD_DEVICES]
    failures = [f for f in failures if f]
    assert not failures, "\n\n".join(failures[:10])


def test_device_check_accepts_what_is_here():
    from harness.models import check_device, present_devices

    for device in present_devices():
        assert check_device(device) == device
    assert "cpu" in present_devices() and "auto" in present_devices()


def test_official_flag_that_contradicts_method(files):
    tiny, text = files["tiny"], str(files["root"] / "words.txt")
    cases = [(name, base + ["--enable_lacache", "--method", method, "--output_dir", str(files["root"] / "o")])
             for name, base in (("ppl.run", ["--model_name_or_path", tiny, "--dataset_name", text,
                                             "--num_eval_tokens", "4"]),
                                ("niah.pred", ["--model_name", tiny, "--max_tokens", "64", "--interval", "64"]))
             for method in ("streamingllm", "full", "h2o,full")]
    cases += [("niah.pred", ["--model_name", tiny, "--model_name_or_path", text]),
              ("ppl.run", ["--model", tiny, "--model_name_or_path", text]),
              ("ruler.pred", ["--model", tiny, "--model_name", text, "--data_dir", str(files["root"])])]
    failures = [check("contradiction", load(name).main, argv, "--enable_lacache" if "--enable_lacache" in argv
                      else "--model") for name, argv in cases]
    failures = [f for f in failures if f]
    assert not failures, "\n\n".join(failures[:10])


def bad_kind_cases(root: Path, tiny: str) -> list:
    """``(module, argv, needle)``: data, prediction and output paths whose kind or contents are wrong."""
    ppl = lambda data, model=tiny: ("ppl.run", ["--model_name_or_path", model, "--dataset_name", str(root / data),
                                                "--num_eval_tokens", "4", "--output_dir", str(root / "o")])
    cases = [ppl("not.parquet") + ("not.parquet",), ppl("plain_folder") + ("plain_folder",),
             ppl("damaged_dataset") + ("damaged_dataset",), ppl("folder.txt") + ("folder.txt",),
             ppl("empty_dir") + ("empty_dir",), ppl("nul.txt") + ("non-text bytes",),
             ppl("controls.txt") + ("non-text bytes",), ppl("blank.txt") + ("no text",),
             ppl("one_token.txt") + ("no scoreable tokens",), ppl("empty_text.jsonl") + ("empty_text.jsonl",),
             ppl("words.txt", str(root / "overflow_model")) + ("not finite",),
             ("ruler.prepare", ["--tokenizer", tiny, "--tasks", "qa_1", "--squad", str(root / "squad.json"),
                                "--max_length", "64", "--num_samples", "1", "--output_dir", str(root / "o")], "--squad"),
             ("longbench.eval", ["--path", str(root / "preds_folders")], "hotpotqa.jsonl"),
             ("longbench.eval", ["--path", str(root / "binary_preds")], "hotpotqa.jsonl"),
             ("longbench.eval", ["--path", str(root / "binary_run")], "run.json"),
             ("ruler.eval", ["--pred_dir", str(root / "preds_folders")], "vt.jsonl"),
             ("ruler.eval", ["--pred_dir", str(root / "binary_preds")], "vt.jsonl")]
    if HAS_CACHE_CLASSES:  # before 4.36 these CLIs stop earlier, at their sdpa kernel or CompressedCache
        cases += [("bench_kv_bytes", ["--model", tiny, "--dataset_name", str(root / "nul.txt")], "nul.txt"),
                  ("bench_prefill", ["--model", tiny, "--dataset_name", str(root / "words.txt"), "--chunks", "0",
                                     "--output", str(root / "p.json")], "--prompt_tokens"),
                  ("longbench.pred", ["--model_name_or_path", tiny, "--max_length", "100", "--data_dir",
                                      str(root / "lb_folders"), "--datasets", "hotpotqa", "--method", "full",
                                      "--output_dir", str(root / "o")], "hotpotqa.jsonl"),
                  ("ruler.pred", ["--model_name_or_path", tiny, "--data_dir", str(root / "ruler_folders"),
                                  "--method", "full", "--output_dir", str(root / "o")], "vt.jsonl")]
    return cases


def bad_output_cases(root: Path, tiny: str) -> list:
    """A file where a CLI writes a folder (or under a file), a folder where it writes a file: refused before any work."""
    under = str(root / "a_file" / "sub")
    folders = [("ppl.run", ["--model_name_or_path", tiny, "--output_dir", under], "--output_dir"),
               ("niah.pred", ["--model_name", tiny, "--output_dir", under], "--output_dir"),
               ("ruler.prepare", ["--tokenizer", tiny, "--output_dir", under], "--output_dir"),
               ("longbench.synthetic", ["--output_dir", str(root / "a_file")], "--output_dir"),
               ("longbench.eval", ["--path", str(root / "empty_dir"), "--output_dir", str(root / "a_file")],
                "--output_dir"),
               ("ruler.eval", ["--pred_dir", str(root / "empty_dir"), "--output_dir", str(root / "a_file")],
                "--output_dir"),
               ("make_tables", ["--root", str(root / "empty_dir"), "--out", str(root / "t.md"), "--assets",
                                str(root / "a_file")], "--assets")]
    files_ = [(name, argv + [flag, path], flag) for name, argv in (
        ("bench_decode", ["--model", "tiny"]), ("bench_prefill", ["--model", tiny]), ("bench_kv_bytes", ["--model", tiny]),
        ("bench_batch", ["--model", tiny]), ("generate_forever", ["--model", "tiny"]),
        ("head_scores", ["--model_name_or_path", tiny]), ("memory_frontier", [str(root / "empty_dir")]))
        for flag in (("--markdown",) if name == "memory_frontier" else ("--output",))
        for path in (str(root / "empty_dir"), under)]
    files_ += [("make_tables", ["--root", str(root / "empty_dir"), "--out", str(root / "empty_dir")], "--out"),
               ("make_tables", ["--root", str(root / "nowhere"), "--out", str(root / "t.md")], "--root")]
    return folders + files_


def test_bad_kinds_of_data_and_output(files):
    """Each case fails today on the code before these checks: a traceback, a hang, or ``ppl: nan`` and exit 0."""
    root, tiny = files["root"], files["tiny"]
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cases = bad_kind_cases(root, tiny) + bad_output_cases(root, tiny)
    failures = [check("bad kind", load(name).main, argv, needle, env=offline) for name, argv, needle in cases]
    failures = [f for f in failures if f]
    assert not failures, "\n\n".join(failures[:10])


def test_perplexity_past_float_range_is_not_a_crash():
    from harness.streaming import perplexity_problem, running_ppl

    assert running_ppl([800.0, 800.0], 2) == float("inf")  # math.exp raised OverflowError here
    assert "past float range" in perplexity_problem([800.0, 800.0])
    assert "non-finite loss" in perplexity_problem([1.0, float("nan")])
    assert perplexity_problem([1.0, 2.0]) is None
