"""harness.records: resumable JSONL results and data-parallel shards."""
import json

from harness.records import JsonlResults, merge_shards, read_jsonl, shard, shard_path


def test_results_resume_and_drop_a_cut_off_line(tmp_path):
    path = tmp_path / "x.jsonl"
    with JsonlResults(path) as out:
        out.append({"_id": "a", "pred": "1"})
        out.append({"_id": "b", "pred": "2"})
    with open(path, "a") as f:
        f.write('{"_id": "c", "pr')  # killed mid-write
    again = JsonlResults(path)
    assert again.done == {"a", "b"}
    again.append({"_id": "c", "pred": "3"})
    again.close()
    assert [r["_id"] for r in read_jsonl(path)] == ["a", "b", "c"]
    assert path.read_text().count("\n") == 3


def test_shards_cover_every_item_once_and_merge_in_order(tmp_path):
    items = list(range(11))
    parts = [shard(items, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == items and parts[1] == [1, 4, 7, 10]
    final = tmp_path / "d.jsonl"
    for r, part in enumerate(parts):
        assert shard_path(final, r, 3).name == f"d.rank{r}-of-3.jsonl"
        with JsonlResults(shard_path(final, r, 3)) as out:
            for i in part:
                out.append({"_id": i})
    assert merge_shards(final, 3, order=items) == 11
    assert [json.loads(line)["_id"] for line in final.read_text().splitlines()] == items
    assert not list(tmp_path.glob("*.rank*"))
    assert merge_shards(final, 3, order=items) == 11  # idempotent
    assert shard_path(final, 0, 1) == final
