"""BENCHMARKS.md's tables and README.md's headlines are what benchmarks/summaries/*.json give (benchmarks/tables.py)."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_tables", ROOT / "benchmarks" / "tables.py")
tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tables)


@pytest.fixture
def repo(tmp_path):
    """A copy of the files tables.py reads, to change without touching the checkout."""
    for name in ("BENCHMARKS.md", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "benchmarks" / "summaries", tmp_path / "benchmarks" / "summaries")
    return tmp_path


def _edit(repo, name, change):
    path = repo / "benchmarks" / "summaries" / f"{name}.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def test_checked_in_tables_match_their_summaries(capsys):
    assert tables.main(["--check"]) == 0, capsys.readouterr().err


def test_a_changed_number_fails_the_check_until_regenerated(repo, capsys):
    def bump(data):
        row = data["tables"][0]["rows"][3]            # 32K x 8
        assert row[:2] == ["32K", 8] and row[5] == [110.3, 2.25]   # the int4 cell
        row[5] = [109.3, 2.25]
    _edit(repo, "decode_attention_h200", bump)
    assert tables.main(["--check", "--root", str(repo)]) == 1
    assert "decode_attention_h200" in capsys.readouterr().err
    before = (repo / "BENCHMARKS.md").read_text()
    assert tables.main(["--root", str(repo)]) == 0
    after = (repo / "BENCHMARKS.md").read_text()
    assert "| 109.3 (2.25x) |" in after and "| 110.3 (2.25x) |" not in after
    # only the generated block changed: the prose around the markers is kept
    assert ([l for l in before.splitlines() if "110.3 (2.25x)" not in l]
            == [l for l in after.splitlines() if "109.3 (2.25x)" not in l])
    assert tables.main(["--check", "--root", str(repo)]) == 0


def test_a_changed_headline_fails_the_readme_check(repo, capsys):
    _edit(repo, "e2e_h200", lambda d: d["headlines"][0].update(result="int4 950 tokens/s"))
    assert tables.main(["--check", "--root", str(repo)]) == 1
    assert "README.md" in capsys.readouterr().err


def test_a_row_of_the_wrong_width_is_a_one_line_error(repo, capsys):
    _edit(repo, "quantize_h100", lambda d: d["tables"][0]["rows"][0].pop())
    assert tables.main(["--check", "--root", str(repo)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "quantize_h100.json: tables[0].rows[0] has 5 cells, columns has 6" in err


def test_a_summary_without_a_place_in_benchmarks_md_is_an_error(repo, capsys):
    shutil.copy(repo / "benchmarks" / "summaries" / "quantize_h100.json",
                repo / "benchmarks" / "summaries" / "quantize_h200.json")
    assert tables.main(["--check", "--root", str(repo)]) == 2
    assert "quantize_h200" in capsys.readouterr().err
