"""The docs stay true to the code and to the stored results: the generated reference pages are current, every
result log the docs cite exists, and the results ledger indexes every log and records runs as it says."""

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
# the pages that cite result logs (docs/assets.md names the texts' own files, not results)
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *(p for p in (ROOT / "docs").glob("*.md") if p.name != "assets.md"),
        *(ROOT / "docs" / "design").glob("*.md")]


def test_generated_reference_pages_are_current():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_docs.py"), "--check"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def _expand(name: str) -> list[str]:
    """`a_{x,y}_b*.txt` -> the glob patterns it stands for."""
    parts = re.split(r"\{([^}]*)\}", name)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def test_every_result_log_the_docs_cite_exists():
    cited = set()
    for doc in DOCS:
        for m in re.finditer(r"`(?:docs/results/)?([A-Za-z0-9_{},*-][A-Za-z0-9_{},.*-]*\.(?:txt|json))`",
                             doc.read_text(encoding="utf-8")):
            cited.add((doc.name, m.group(1)))
    assert len(cited) > 30
    missing = [(doc, name) for doc, name in sorted(cited)
               if name not in ("result.json", "partial.json", "results.json", "headalloc.json", "config.json",
                               "tokenizer.json", "tokenizer_config.json")
               and not all(list(RESULTS.glob(p)) for p in _expand(name))]
    assert not missing, missing


def test_the_ledger_indexes_every_log_and_every_row_is_whole():
    from headalloc.reports import ledger

    rows = ledger.rows(RESULTS / "ledger.jsonl")
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert {"id", "kind", "name", "commit", "command", "settings", "machine", "metrics"} <= set(r), r["id"]
    logs = {r["metrics"]["file"] for r in rows if r["kind"] == "log"}
    on_disk = {str(p.relative_to(ROOT)) for p in RESULTS.iterdir() if p.name != "ledger.jsonl"}
    assert on_disk <= logs, sorted(on_disk - logs)[:5]
    assert all((ROOT / f).is_file() for f in logs)


def test_a_run_appends_one_row_with_its_commit_command_and_output(tmp_path, monkeypatch, capsys):
    from headalloc.reports import ledger

    where = tmp_path / "ledger.jsonl"
    monkeypatch.setenv("HEADALLOC_LEDGER", str(where))
    monkeypatch.setattr(sys, "argv", ["bench_x.py", "--budget", "0.5"])
    with ledger.recorded("benchmark", "bench_x", settings={"budget": 0.5}):
        print("ratio 1.10x")
    assert "ratio 1.10x" in capsys.readouterr().out  # still printed
    with pytest.raises(RuntimeError):
        with ledger.recorded("benchmark", "bench_x"):
            print("half a result")
            raise RuntimeError("failed")
    ledger.append("study", "s", {"nan": float("nan"), "x": 1.5})
    rows = [json.loads(line) for line in where.read_text().splitlines()]
    assert [r["name"] for r in rows] == ["bench_x", "s"]  # nothing from the failed run
    first = rows[0]
    assert first["command"] == "bench_x.py --budget 0.5" and first["settings"] == {"budget": 0.5}
    assert first["metrics"]["output"] == "ratio 1.10x\n"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert first["commit"] == (head or None) and first["machine"]["cpus"] >= 1
    assert rows[1]["metrics"] == {"nan": None, "x": 1.5}  # JSON has no NaN
    monkeypatch.setenv("HEADALLOC_LEDGER", "off")
    assert ledger.append("study", "s", {}) is None and len(where.read_text().splitlines()) == 2
