import json

import pytest

from data.loading import DataError, load_dataset


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_with_field_map_and_numeric_answers(tmp_path):
    f = _write(tmp_path / "p.jsonl", [{"question": "1+1?", "final": 2}, {"question": "AMC", "final": 27.0}])
    ds = load_dataset(f, field_map={"problem": "question", "answer": "final"})
    assert ds["problem"] == ["1+1?", "AMC"] and ds["answer"] == ["2", "27"]
    assert ds[0]["prompt"][0]["content"].startswith("1+1?\nPlease reason step by step")


def test_missing_field_names_file_row_and_field(tmp_path):
    f = _write(tmp_path / "bad.jsonl", [{"problem": "a", "answer": "1"}, {"problem": "b"}])
    with pytest.raises(DataError, match=r"bad\.jsonl: row 1 \(line 2\): missing required field 'answer'"):
        load_dataset(f)
    with pytest.raises(DataError, match=r"missing required field 'q' \(mapped to 'problem'\)"):
        load_dataset(f, field_map={"problem": "q"})


def test_bad_json_line_and_missing_file(tmp_path):
    f = tmp_path / "broken.jsonl"
    f.write_text('{"problem": "a", "answer": "1"}\n{oops\n')
    with pytest.raises(DataError, match=r"broken\.jsonl: line 2: invalid JSON"):
        load_dataset(f)
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "nope.jsonl")


def test_parquet(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"problem": "p", "answer": "3"}]).to_parquet(str(tmp_path / "d.parquet"))
    assert load_dataset(tmp_path / "d.parquet")["answer"] == ["3"]


def test_bundled_benchmarks_load(shared_data):
    for name, n in [("math500", 500), ("aime24", 30), ("amc23", 40), ("gsm8k_test", 1319)]:
        path = shared_data / f"{name}.jsonl"
        if not path.exists():
            pytest.skip("shared data not beside the checkout")
        assert len(load_dataset(path)) == n
