"""BENCHMARKS.md's tables and README.md's headline table, generated from benchmarks/summaries/*.json.

    python benchmarks/tables.py            # rewrite the generated blocks in place
    python benchmarks/tables.py --check    # exit 1, naming the block, when a file differs from its JSON

BENCHMARKS.md holds one block per summary, between `<!-- BEGIN summary NAME -->` and `<!-- END summary NAME -->`,
NAME being benchmarks/summaries/NAME.json. README.md's block between `<!-- BEGIN headlines -->` and
`<!-- END headlines -->` lists every summary's `headlines`, in the order the summaries appear in BENCHMARKS.md.
Text outside the markers is kept as it is.

A summary (one per benchmark and card):
    {"benchmark": "decode_attention", "card": "H200", "section": "decode-attention-kernels",
     "tables": [{"title", "date", "commit", "environment", "command", "source",
                 "columns": ["name" or {"name": ..., "fmt": "{:.1f} ({:.2f}x)"}, ...],
                 "rows": [[cell, ...], ...], "notes": ["...", ...] (optional)}],
     "headlines": [{"measure", "result", "date"}] (optional)}
A cell is a string (as is), a number (the column's fmt, or as JSON writes it), a list (the column's fmt applied to
its items) or null ("-"). `section` is the anchor of the BENCHMARKS.md heading the README links to; `source` says
where the numbers were copied from and is not rendered.
"""
import argparse
import difflib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- BEGIN summary (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- END summary (?P=name) -->)", re.S)
HEADLINES = re.compile(r"(<!-- BEGIN headlines -->\n)(?P<body>.*?)(<!-- END headlines -->)", re.S)
FILE_KEYS = ("benchmark", "card", "section", "tables")
TABLE_KEYS = ("title", "date", "commit", "environment", "command", "source", "columns", "rows")
HEADLINE_KEYS = ("measure", "result", "date")


class SummaryError(ValueError):
    pass


def _require(obj, keys, where):
    if not isinstance(obj, dict):
        raise SummaryError(f"{where} must be an object")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise SummaryError(f"{where} lacks {', '.join(missing)} (needs {', '.join(keys)})")


def load_summary(path):
    """The summary at path, checked: every key present, every row as wide as its columns, no '|' in a cell."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SummaryError(f"{path.name}: not JSON ({e})") from None
    _require(data, FILE_KEYS, path.name)
    for i, t in enumerate(data["tables"]):
        where = f"{path.name}: tables[{i}]"
        _require(t, TABLE_KEYS, where)
        width = len(t["columns"])
        for j, row in enumerate(t["rows"]):
            if not isinstance(row, list) or len(row) != width:
                raise SummaryError(f"{where}.rows[{j}] has {len(row) if isinstance(row, list) else 'no'} cells, "
                                   f"columns has {width}")
            for c, col in zip(row, t["columns"]):
                if isinstance(c, list) and not (isinstance(col, dict) and "fmt" in col):
                    raise SummaryError(f"{where}.rows[{j}]: a list cell needs a column with a fmt")
    for i, h in enumerate(data.get("headlines", [])):
        _require(h, HEADLINE_KEYS, f"{path.name}: headlines[{i}]")
    return data


def _cell(value, col):
    fmt = col.get("fmt") if isinstance(col, dict) else None
    if value is None:
        text = "-"
    elif isinstance(value, str):
        text = value
    elif isinstance(value, list):
        text = fmt.format(*value)
    else:
        text = fmt.format(value) if fmt else json.dumps(value)
    if "|" in text or "\n" in text:
        raise SummaryError(f"cell {text!r} holds '|' or a line break")
    return text


def _row(cells):
    return "| " + " | ".join(cells) + " |"


def render_table(card, t):
    names = [c["name"] if isinstance(c, dict) else c for c in t["columns"]]
    lines = [f"**{card}, {t['title']}.** {t['date']}, commit `{t['commit']}`, {t['environment']}:",
             f"`{t['command']}`", "", _row(names), _row(["---"] * len(names))]
    lines += [_row([_cell(v, c) for v, c in zip(row, t["columns"])]) for row in t["rows"]]
    if t.get("notes"):
        lines += ["", " ".join(t["notes"])]
    return "\n".join(lines) + "\n"


def render_summary(data):
    return "\n".join(render_table(data["card"], t) for t in data["tables"])


def render_headlines(summaries):
    lines = [_row(["measure", "result", "card", "date"]), _row(["---"] * 4)]
    for data in summaries:
        for h in data.get("headlines", []):
            link = f"[{h['measure']}](BENCHMARKS.md#{data['section']})"
            lines.append(_row([link, h["result"], h.get("card", data["card"]), h["date"]]))
    return "\n".join(lines) + "\n"


def regenerate(root):
    """{path: (current text, generated text)} for BENCHMARKS.md and README.md under root."""
    bench_path, readme_path, folder = root / "BENCHMARKS.md", root / "README.md", root / "benchmarks" / "summaries"
    bench = bench_path.read_text()
    names = [m["name"] for m in BLOCK.finditer(bench)]
    on_disk = sorted(p.stem for p in folder.glob("*.json"))
    if sorted(set(names)) != on_disk or len(names) != len(set(names)):
        unplaced = sorted(set(on_disk) - set(names))
        missing = sorted(set(names) - set(on_disk))
        raise SummaryError(f"BENCHMARKS.md blocks and benchmarks/summaries/*.json differ: no block for {unplaced}, "
                           f"no JSON for {missing}, or a block placed twice")
    summaries = {n: load_summary(folder / f"{n}.json") for n in names}
    new_bench = BLOCK.sub(lambda m: m.group(1) + render_summary(summaries[m["name"]]) + m.group(4), bench)
    readme = readme_path.read_text()
    if not HEADLINES.search(readme):
        raise SummaryError("README.md has no <!-- BEGIN headlines --> ... <!-- END headlines --> block")
    table = render_headlines([summaries[n] for n in names])
    new_readme = HEADLINES.sub(lambda m: m.group(1) + table + m.group(3), readme)
    return {bench_path: (bench, new_bench), readme_path: (readme, new_readme)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when a generated block is stale")
    ap.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = ap.parse_args(argv)
    try:
        files = regenerate(args.root)
    except (SummaryError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stale = [p for p, (old, new) in files.items() if old != new]
    for p in stale:
        old, new = files[p]
        if args.check:
            blocks = {m["name"]: m["body"] for m in BLOCK.finditer(new)}
            names = [m["name"] for m in BLOCK.finditer(old) if blocks.get(m["name"]) != m["body"]]
            where = f" (blocks: {', '.join(names)})" if names else ""
            diff = difflib.unified_diff(old.splitlines(), new.splitlines(), str(p.name), "from the summaries",
                                        lineterm="", n=0)
            print(f"{p.name} differs from benchmarks/summaries{where}; run python benchmarks/tables.py",
                  file=sys.stderr)
            print("\n".join(list(diff)[:20]), file=sys.stderr)
        else:
            p.write_text(new)
            print(f"rewrote {p.name}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
