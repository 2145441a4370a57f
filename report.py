"""One self-contained HTML page per run folder, and an index page for a results root.

    uv run report.py results/router_metrics/demo/demo/20261125-101500     # one run: writes report.html in it
    uv run report.py results                                              # every run below: + results/index.html

A page holds the run's metadata (script, model, data, command, date, git commit, packages, tokens per domain), every
figure (PNG embedded, so the page needs no network and can be mailed), every CSV as a sortable table (the first
`--rows` rows, a click on a column header sorts it, with a link to the full file and the description of each column
from the registry of `common/run/outputs.py`), and the JSON and npy files with their descriptions. The index lists the
runs by script, model, data, tokens and date. A comparison folder (compare.py, `<out>/compare/...`) gets the same
page, headed by the script whose runs it compared and the list of those runs (label, model, revision, folder, linked
to their pages where they are found), and its own "Comparisons" table in the index. Nothing heavy is imported:
pandas only.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from common.cli import ArgumentParser, at_least, run_main
from common.errors import InputError

SCRIPT = "report"
STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}h3{font-size:1em}
table{border-collapse:collapse;font-size:.8em;margin:.5em 0}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
th{background:#f4f4f4;cursor:pointer;position:sticky;top:0}td.t,th.t{text-align:left}
.meta td{text-align:left}.scroll{max-height:420px;overflow:auto;border:1px solid #eee}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
.desc{color:#555;font-size:.85em}details{margin:.3em 0}code{background:#f6f6f6;padding:0 3px}
"""
# Sorting by a click on a header; the page also reports, for tests and readers, how many images loaded.
SCRIPT_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th,col){th.addEventListener('click',function(){
 var body=th.closest('table').tBodies[0],rows=Array.from(body.rows),asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
 rows.sort(function(a,b){var x=a.cells[col].textContent,y=b.cells[col].textContent,p=parseFloat(x.replace(/,/g,'')),q=parseFloat(y.replace(/,/g,''));
  var c=(!isNaN(p)&&!isNaN(q))?p-q:x.localeCompare(y);return asc?c:-c});rows.forEach(function(r){body.appendChild(r)})})});
window.addEventListener('load',function(){var imgs=Array.from(document.images);
 document.body.dataset.images=imgs.length;document.body.dataset.imagesLoaded=imgs.filter(function(i){return i.complete&&i.naturalWidth>0}).length;
 var tables=Array.from(document.querySelectorAll('table.data'));document.body.dataset.tables=tables.length;
 document.body.dataset.tablesWithRows=tables.filter(function(t){return t.tBodies[0].rows.length>0}).length});
"""


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="a run folder (holding run.json) or a results root with runs below it")
    parser.add_argument("--rows", type=at_least(1), default=200, help="rows shown per CSV table (the file has them all)")
    return parser


def _esc(value) -> str:
    return html.escape(str(value))


def _natural(path: Path) -> list:
    """Sort key that puts expert2 before expert10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _cell(value) -> str:
    """A table cell: floats to 6 significant digits (the CSV has them all), everything else as written."""
    return _esc(f"{value:.6g}" if isinstance(value, float) else value)


def _run_record(run: Path) -> dict:
    """The run's run.json; a file that is not a JSON object is an InputError naming it."""
    path = run / "run.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not a readable run record ({error})") from None
    if not isinstance(info, dict):
        raise InputError(f"{path}: not a readable run record (a JSON {type(info).__name__}, not an object)")
    return info


def _describe(relative: str):
    from common.run import outputs

    return outputs.lookup(relative)


def _domain_tokens(info: dict) -> dict:
    """run.json's per-domain token counts ({} for a run that reads no data)."""
    tokens = info.get("tokens")
    return tokens.get("domains", {}) if isinstance(tokens, dict) else {}


def _counted_total(info: dict) -> int | None:
    """Counted tokens read from the data, summed over the domains (None for a run that reads no data)."""
    counted = [d.get("counted") for d in _domain_tokens(info).values() if isinstance(d, dict)]
    return sum(c for c in counted if isinstance(c, int)) if counted else None


def _sample(info: dict) -> dict | None:
    """run.json's `sample` of a script that analyses a token sample drawn from what it read (sim.py), else None."""
    sample = info.get("sample")
    return sample if isinstance(sample, dict) and isinstance(sample.get("num_tokens"), int) else None


def _sample_text(info: dict) -> str | None:
    """'10,000 of the 10,002 tokens read (code: 1667, …)': a sample is drawn per domain from a read rounded up to
    the largest domain quota, so more tokens are read than sampled."""
    sample = _sample(info)
    if sample is None:
        return None
    read = _counted_total(info)
    per_domain = sample.get("per_domain") if isinstance(sample.get("per_domain"), dict) else {}
    text = f"{sample['num_tokens']:,}" + (f" of the {read:,} tokens read" if read is not None else " tokens")
    return text + (" (" + ", ".join(f"{d}: {n}" for d, n in per_domain.items()) + ")" if per_domain else "")


def _metadata(info: dict) -> str:
    tokens = _domain_tokens(info)
    rows = [
        ("script", info.get("script")), ("model", info.get("model")), ("command", info.get("command")),
        ("started", info.get("started")), ("wall time", f"{info.get('wall_time_s', '?')} s"),
        ("git commit", info.get("git_commit")), ("seed", info.get("seed")), ("world size", info.get("world_size")),
        ("tokens per domain", ", ".join(f"{d}: {c.get('counted')}" for d, c in tokens.items()) or "—"),
        ("token sample", _sample_text(info)),
        ("packages", ", ".join(f"{k} {v}" for k, v in info.get("packages", {}).items())),
    ]
    body = "".join(f"<tr><td class=t><b>{_esc(k)}</b></td><td class=t>{_esc(v)}</td></tr>" for k, v in rows if v is not None)
    arguments = json.dumps(info.get("arguments", {}), indent=1)
    return (f"<table class=meta>{body}</table><details><summary>all arguments</summary><pre>{_esc(arguments)}</pre>"
            "</details>")


def _csv_section(path: Path, relative: str, rows: int) -> str:
    import pandas as pd

    entry = _describe(relative)
    try:
        table = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        return (f"<h3>{_esc(relative)}</h3><p class=desc>{_esc(entry.description if entry else '')} — "
                f"<b>could not be read</b> ({_esc(error)}), <a href='{_esc(relative)}'>the file</a></p>")
    head = table.head(rows)
    numeric = {c for c in head.columns if pd.api.types.is_numeric_dtype(head[c])}
    header = "".join(f"<th class={'n' if c in numeric else 't'} title='{_esc(entry.column(c) if entry else '')}'>{_esc(c)}</th>"
                     for c in head.columns)
    body = "".join("<tr>" + "".join(f"<td class={'n' if c in numeric else 't'}>{_cell(v)}</td>" for c, v in zip(head.columns, row, strict=True))
                   + "</tr>" for row in head.itertuples(index=False))
    columns = ""
    if entry is not None:
        columns = "<details><summary>columns</summary><ul>" + "".join(
            f"<li><code>{_esc(c)}</code>: {_esc(entry.column(c) or 'undocumented')}</li>" for c in table.columns) + "</ul></details>"
    shown = f"first {len(head)} of {len(table)} rows" if len(table) > len(head) else f"{len(table)} rows"
    return (f"<h3>{_esc(relative)}</h3><p class=desc>{_esc(entry.description if entry else '')} — {shown}, "
            f"<a href='{_esc(relative)}'>full file</a></p>{columns}"
            f"<div class=scroll><table class='sortable data'><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table></div>")


COMPARE = "compare"  # the script name compare.py records in its run.json


def _compared_run_folder(comparison: Path, info: dict, folder: str) -> Path | None:
    """Where a run compare.py compared lies now (it holding run.json), or None. compare.py records each folder as it
    was given: absolute, or relative to where compare.py ran (often the repository root, as `results/...`); the
    latter is tried from here and under the comparison's own results root (`<out>/compare/<models>/<script>/<id>`)."""
    path = Path(folder)
    candidates = [path] if path.is_absolute() else [Path.cwd() / path]
    given_out = (info.get("arguments") or {}).get("out") if isinstance(info.get("arguments"), dict) else None
    if not path.is_absolute() and given_out and len(comparison.parents) > 3 and path.is_relative_to(given_out):
        candidates.append(comparison.parents[3] / path.relative_to(given_out))
    return next((c for c in candidates if (c / "run.json").is_file()), None)


def _compared_runs(comparison: Path, info: dict) -> list[dict]:
    """run.json's `runs` of a comparison, each with `found`: the folder it lies in now (or None)."""
    runs = info.get("runs") if isinstance(info.get("runs"), list) else []
    return [{**item, "found": _compared_run_folder(comparison, info, str(item.get("folder", "")))}
            for item in runs if isinstance(item, dict)]


def _compared_section(comparison: Path, info: dict, compared: list[dict], pages: set[Path]) -> str:
    """The list of runs a comparison compared (`_compared_runs`), each linked to its page where it has one (or gets
    one now)."""
    rows = []
    for item in compared:
        found, folder = item["found"], str(item.get("folder", ""))
        if found is not None and (found.resolve() in pages or (found / "report.html").is_file()):
            target = os.path.relpath(found.resolve() / "report.html", comparison.resolve())
            cell = f"<a href='{_esc(Path(target).as_posix())}'>{_esc(folder)}</a>"
        else:
            cell = _esc(folder) + ("" if found is not None else " <span class=desc>(not found from here)</span>")
        rows.append("<tr>" + "".join(f"<td class=t>{_esc(item.get(key) or '—')}</td>"
                                     for key in ("label", "model", "revision", "run_id"))
                    + f"<td class=t>{cell}</td></tr>")
    header = "".join(f"<th class=t>{c}</th>" for c in ("label", "model", "revision", "run id", "folder"))
    return (f"<h2>Compared runs</h2><p class=desc>{len(rows)} {_esc(info.get('compared_script'))} runs; the label "
            "is each run's name in the tables and figures below.</p>"
            f"<table class=sortable><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def run_page(run: Path, info: dict, rows: int, pages: Sequence[Path] = ()) -> str:
    """The page of a run folder; `pages`: the run folders getting a page in the same pass (links to compared runs)."""
    if info.get("script") == COMPARE:
        compared = _compared_runs(run, info)
        models = ", ".join(dict.fromkeys(str(item.get("model")) for item in compared)) or "—"
        parts = [f"<h1>Comparison of {_esc(info.get('compared_script'))} runs — {_esc(models)}</h1>",
                 _compared_section(run, info, compared, {p.resolve() for p in pages}), "<h2>This comparison</h2>",
                 _metadata(info)]
    else:
        parts = [f"<h1>{_esc(info.get('script'))} — {_esc(info.get('model'))}</h1>", _metadata(info)]
    figures = sorted((run / "figures").glob("*.png"), key=_natural) if (run / "figures").is_dir() else []
    if figures:
        parts.append("<h2>Figures</h2>")
        for png in figures:
            data = base64.b64encode(png.read_bytes()).decode()
            pdf = png.with_suffix(".pdf")
            link = f" (<a href='figures/{_esc(pdf.name)}'>PDF</a>)" if pdf.exists() else ""
            parts.append(f"<figure><img alt='{_esc(png.stem)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{_esc(png.stem)}{link}</figcaption></figure>")
    tables = sorted(run.glob("*.csv"), key=_natural)
    if tables:
        parts.append("<h2>Tables</h2>")
        parts.extend(_csv_section(path, path.name, rows) for path in tables)
    others = sorted((p for p in run.iterdir() if p.suffix in (".npy", ".json") and p.name != "run.json"), key=_natural)
    if others:
        groups: dict[str, tuple] = {}  # files of one registry entry (one per expert, say) share a line
        for path in others:
            entry = _describe(path.name)
            groups.setdefault(entry.pattern if entry is not None else path.name, (entry, []))[1].append(path)
        items = []
        for entry, paths in groups.values():
            extra = f" — axes {entry.axes}" if entry is not None and entry.axes else ""
            links = ", ".join(f"<a href='{_esc(p.name)}'>{_esc(p.name)}</a>" for p in paths)
            count = f" ({len(paths)} files)" if len(paths) > 1 else ""
            items.append(f"<li>{_esc(entry.description if entry else '')}{_esc(extra)}{count}: {links}</li>")
        parts.append("<h2>Other files</h2><ul>" + "".join(items) + "</ul>")
    return _page(f"{info.get('script')} {info.get('run_id')}", "".join(parts))


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{_esc(title)}</title><style>{STYLE}</style></head>"
            f"<body>{body}<script>{SCRIPT_JS}</script></body></html>\n")


def find_runs(root: Path) -> list[Path]:
    if (root / "run.json").is_file():
        return [root]
    return sorted(p.parent for p in root.rglob("run.json") if not any(part.startswith(".") for part in p.parent.parts))


def _layers(arguments: dict) -> str:
    chosen = arguments.get("layers")
    if chosen is None and arguments.get("layer") is not None:
        chosen = [arguments["layer"]]
    return " ".join(str(layer) for layer in chosen) if chosen else "all"


def _tokens(info: dict) -> str:
    """The index's token cell: counted tokens summed over the domains; for a run that analyses a token sample, the
    sample's size first (what --num_tokens asked for), then what was read to draw it."""
    read, sample = _counted_total(info), _sample(info)
    if sample is not None:
        return f"{sample['num_tokens']:,} sampled" + (f" ({read:,} read)" if read is not None else "")
    return f"{read:,}" if read is not None else "—"


def _comparisons_table(root: Path, comparisons: Sequence[tuple[Path, dict]]) -> str:
    """The index's table of comparison folders: what was compared, which runs, on which data."""
    columns = ("compared script", "runs", "data", "started", "comparison")
    rows = []
    for folder, info in comparisons:
        relative = folder.relative_to(root).as_posix()
        compared = _compared_runs(folder, info)
        labels = ", ".join(str(item.get("label") or item.get("model")) for item in compared)
        data = []
        for item in compared:  # the compared runs' --data (one value: compare.py refuses runs on different data)
            if item["found"] is not None:
                try:
                    value = (_run_record(item["found"]).get("arguments") or {}).get("data")
                except InputError:
                    continue
                text = " ".join(map(str, value)) if isinstance(value, list) else str(value or "")
                if text and text not in data:
                    data.append(text)
        cells = [info.get("compared_script"), f"{len(compared)}: {labels}", " | ".join(data) or "—", info.get("started")]
        rows.append("<tr>" + "".join(f"<td class=t>{_esc(c)}</td>" for c in cells)
                    + f"<td class=t><a href='{_esc(relative)}/report.html' title='{_esc(info.get('command', ''))}'>"
                      f"{_esc(relative)}</a></td></tr>")
    header = "".join(f"<th class=t>{_esc(c)}</th>" for c in columns)
    return (f"<h2>Comparisons</h2><p class=desc>{len(comparisons)} comparison{'s' if len(comparisons) != 1 else ''} "
            "across runs (compare.py): a page each with the compared runs, their tables and figures.</p>"
            f"<table class='sortable data'><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def index_page(root: Path, found: Sequence[tuple[Path, dict]]) -> str:
    runs = [(run, info) for run, info in found if info.get("script") != COMPARE]
    comparisons = [(run, info) for run, info in found if info.get("script") == COMPARE]
    columns = ("script", "model", "data", "layers", "tokens", "started", "wall time (s)", "run")
    numeric = {"tokens", "wall time (s)"}
    rows = []
    for run, info in runs:
        relative = run.relative_to(root).as_posix()
        data = relative.split("/")[2] if relative.count("/") >= 3 else ""
        arguments = info.get("arguments") if isinstance(info.get("arguments"), dict) else {}
        wall = info.get("wall_time_s")
        cells = [info.get("script"), info.get("model"), data, _layers(arguments), _tokens(info), info.get("started"),
                 f"{wall:.1f}" if isinstance(wall, (int, float)) else "—"]
        rows.append("<tr>" + "".join(f"<td class={'n' if name in numeric else 't'}>{_esc(c)}</td>"
                                     for name, c in zip(columns[:-1], cells, strict=True))
                    + f"<td class=t><a href='{_esc(relative)}/report.html' title='{_esc(info.get('command', ''))}'>"
                      f"{_esc(relative)}</a></td></tr>")
    header = "".join(f"<th class=t>{_esc(c)}</th>" for c in columns)
    table = f"<table class='sortable data'><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    return _page(f"moescope results: {root}", f"<h1>Runs in {_esc(root)}</h1><p class=desc>{len(runs)} runs; a "
                 "click on a column header sorts by it; hover a run for its command. <i>tokens</i>: the counted "
                 "tokens read, summed over the domains; a run that analyses a token sample (sim.py) shows the "
                 "sample's size and, in brackets, the tokens read to draw it (each domain is read up to the largest "
                 "domain's share, so a little more than the sample).</p>" + table
                 + (_comparisons_table(root, comparisons) if comparisons else ""))


def run(args: argparse.Namespace) -> None:
    from common.atomic import atomic_write

    root = Path(args.results)
    if not root.is_dir():
        raise InputError(f"{args.results}: no such folder")
    runs = find_runs(root)
    if not runs:
        raise InputError(f"{args.results}: no run folder (with a run.json) here or below")
    written = []
    for folder in runs:
        try:
            info = _run_record(folder)
        except InputError as error:
            if runs == [root]:
                raise
            print(f"report: skipped {error}", file=sys.stderr)  # one broken run does not cost the others' pages
            continue
        page = run_page(folder, info, args.rows, runs)
        atomic_write(folder / "report.html", lambda p, text=page: p.write_text(text, encoding="utf-8"))
        written.append((folder, info))
    if runs != [root]:
        if not written:
            raise InputError(f"{args.results}: none of the {len(runs)} run folders could be read (see above)")
        text = index_page(root, written)
        atomic_write(root / "index.html", lambda p: p.write_text(text, encoding="utf-8"))
        print(f"report: {root / 'index.html'} ({len(written)} run{'s' if len(written) != 1 else ''})", file=sys.stderr)
    else:
        print(f"report: {root / 'report.html'}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
