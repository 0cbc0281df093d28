"""Helpers that run the harness CLIs (longbench, ruler, niah) on tiny models and read their outputs, shared by several
test modules; moved here unchanged from test_longbench_pred, test_ruler_pred, test_niah and test_niah_official (the
fixtures they take live in ``conftest.py``), so that no test module imports another."""
import csv
import json
import types

# one dataset per metric family: qa_f1, rouge, classification, count, retrieval, code_sim
DATASETS = ["hotpotqa", "gov_report", "trec", "passage_count", "passage_retrieval_en", "lcc"]


def run_longbench(tiny_dir, data_dir, out, *extra):
    from longbench.pred import main
    return main(["--model", "tiny", "--model_name_or_path", str(tiny_dir), "--max_length", "200",
                 "--data_dir", str(data_dir), "--datasets", ",".join(DATASETS), "--device", "cpu",
                 "--output_dir", str(out), "--span", "2", "--max_new_tokens", "6", *extra])


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_ruler(tiny_dir, data_dir, out, *extra):
    from ruler.pred import main
    return main(["--model_name_or_path", str(tiny_dir), "--data_dir", str(data_dir), "--device", "cpu",
                 "--output_dir", str(out), "--span", "2", *extra])


def run_niah(tiny_dir, out, *extra):
    from niah.pred import main
    return main(["--model_name", str(tiny_dir), "--max_tokens", "200", "--interval", "100", "--num_tests", "2",
                 "--depths", "0,50,100", "--device", "cpu", "--output_dir", str(out), "--span", "2",
                 "--start_size", "4", "--max_new_tokens", "4", *extra])


def rows_of(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_niah_official(folder, out, monkeypatch, *extra):
    import niah.pred as pred

    calls = []

    def record(model, tok, requests, spec_for, batch_size, stop, **kwargs):
        for i, (ids, limit) in enumerate(requests):
            calls.append((ids[0].tolist(), limit, spec_for(ids.shape[1])))
            key = tok.decode(ids[0].tolist()).split("The pass key is ")[1].split(".")[0]
            text = f" {key}" if len(calls) % 2 else " 0"  # every other test answers its key
            yield i, types.SimpleNamespace(text=text, prompt_tokens=ids.shape[1], seconds=0.0, peak_kv_bytes=0,
                                           final_kv_bytes=0, batch_rows=1)

    monkeypatch.setattr(pred, "answer_all", record)
    rc = pred.main(["--model_name", str(folder), "--max_tokens", "1024", "--interval", "300", "--num_tests", "2",
                    "--protocol", "lacache", "--device", "cpu", "--output_dir", str(out), *extra])
    return rc, calls
