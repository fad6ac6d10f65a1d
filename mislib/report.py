"""A static HTML report of the last ``make reproduce``: ``build/site/index.html``.

The site is made with **nbconvert**, the tool that ships with Jupyter (JupyterLab's server
depends on it), for three reasons: the executed notebooks papermill leaves in
``build/notebooks/<profile>/`` already are the report's content, outputs included, so no
second build system has to re-execute or re-parse them; its ``lab`` template renders them as
JupyterLab shows them; and it works offline. Jupyter Book 2 / MyST would add Node.js and a
theme it downloads on first build, Jupyter Book 1 a Sphinx stack, for a site of nine pages.

Layout of the site::

    build/site/index.html              profile, models, run ids, claims, key figures
    build/site/notebooks/NN_name.html  each executed notebook with its outputs (+ the .ipynb)
    build/site/figures/*.png           the figures, copied beside the pages
    build/site/mathjax/                MathJax 2.7 (from ``jupyter_server_mathjax``), so the
                                       notebooks' formulas render without a network

The landing page is itself a small notebook of Markdown cells rendered by the same
exporter, so every page has one look. Nothing in the site loads from the network: the
``lab`` template's require.js, Mermaid and widget scripts (which come from a CDN) are left
out, and MathJax is loaded from the copy beside the pages.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mislib.config import profile_name
from mislib.notebooks import NOTEBOOK_RE
from mislib.paths import RUN_FILE, SCORED_FILE, project_paths

#: The figures shown on the landing page: the paper's figures, written by notebook 08.
KEY_FIGURE_PREFIX = "08_"
MATHJAX_CONFIG = "TeX-AMS-MML_HTMLorMML-full,Safe"

# The lab template without the scripts it fetches from a CDN, with a link back to the index.
_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}
{%- if resources.mislib_mathjax -%}
<script type="text/x-mathjax-config">
  // jupyter_server_mathjax ships the STIX-Web web fonts only; the blank font MathJax
  // measures with is loaded from 'about:blank', which a file:// page may not fetch
  MathJax.Hub.Config({"HTML-CSS": {availableFonts: [], preferredFont: null, imageFont: null,
                                   webFont: "STIX-Web", styles: {"@font-face": {
                                     "font-family": "MathJax_Blank",
                                     src: "local('MathJax_Blank')"}}}});
</script>
{{ super() }}
{%- endif -%}
{%- endblock html_head_js_mathjax -%}
{%- block html_head_css -%}
<style type="text/css">
  nav.mislib-report { padding: 8px 24px; border-bottom: 1px solid #ddd;
                      font-family: var(--jp-ui-font-family); font-size: 14px; }
  .mislib-gallery { display: flex; flex-wrap: wrap; gap: 12px; }
  .mislib-gallery figure { margin: 0; width: 220px; }
  .mislib-gallery img { width: 220px; border: 1px solid #ddd; }
  .mislib-gallery figcaption { font-size: 12px; }
  .jp-MarkdownOutput table { margin-left: 0; margin-right: auto; }
  .jp-MarkdownOutput td, .jp-MarkdownOutput th { text-align: left; }
</style>
{%- endblock html_head_css -%}
{%- block body_header -%}
{{ super() }}
{%- if resources.mislib_back -%}
<nav class="mislib-report"><a href="{{ resources.mislib_back }}">&larr; report of the
{{ resources.mislib_profile }} run</a>{%- if resources.mislib_ipynb %} &middot;
<a href="{{ resources.mislib_ipynb }}">download the executed notebook</a>{%- endif -%}</nav>
{%- endif -%}
{%- endblock body_header -%}
"""


class ReportError(RuntimeError):
    """The report cannot be built (no executed notebooks for the profile, unreadable files)."""


def _exporter(mathjax_url: str | None, embed_images: bool = True):
    """nbconvert's HTML exporter with the offline ``lab`` template above.

    ``embed_images`` inlines the images that Markdown cells link to (a notebook page then
    stands alone); the landing page links to the copies in ``figures/`` instead.
    """
    import jinja2
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab",
                            extra_loaders=[jinja2.DictLoader({"mislib.html.j2": _TEMPLATE})],
                            template_file="mislib.html.j2", embed_images=embed_images)
    if mathjax_url:
        exporter.mathjax_url = mathjax_url
    return exporter


def _notebook_title(nb) -> str:
    """The first Markdown heading of a notebook (its title), else ''."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return ""


def _has_math(nb) -> bool:
    return any(cell.cell_type == "markdown" and "$" in cell.source for cell in nb.cells)


def read_executed(folder: Path) -> list[dict[str, Any]]:
    """The executed notebooks in ``folder`` with papermill's record of each run.

    Returns
    -------
    One dict per numbered notebook, in order: ``path``, ``nb`` (the nbformat node),
    ``title``, ``profile`` (papermill's parameter), ``end_time`` (ISO string), ``duration``
    (seconds), ``status`` (``"ok"`` or ``"failed"``) and, for a notebook that finished before
    one numbered below it (left over from an earlier run), ``note``. A notebook that cannot
    be read raises :class:`ReportError` naming the file.
    """
    import nbformat

    books = []
    for path in sorted(p for p in folder.glob("*.ipynb") if NOTEBOOK_RE.match(p.name)):
        try:
            nb = nbformat.read(path, as_version=4)
        except Exception as err:  # nbformat raises several types for a broken file
            raise ReportError(f"{path}: not a readable notebook ({err})") from err
        pm = nb.metadata.get("papermill", {})
        books.append({
            "path": path, "nb": nb, "title": _notebook_title(nb) or path.stem,
            "profile": str(pm.get("parameters", {}).get("profile", "")),
            "end_time": str(pm.get("end_time") or ""),
            "duration": pm.get("duration"),
            "status": "failed" if pm.get("exception") else "ok",
        })
    # In one run the notebooks finish in order: one that finished before a notebook numbered
    # below it is left over from an earlier run (a later run stopped or ran NB= only).
    newest = ("", "")
    for book in books:
        if book["end_time"] and book["end_time"] < newest[0]:
            book["note"] = f"from an earlier run than {newest[1]}"
        elif book["end_time"]:
            newest = (book["end_time"], book["path"].stem)
    return books


def read_runs(root: str | os.PathLike | None = None) -> tuple[list[dict[str, Any]], str]:
    """The inference runs behind this run's results, with where that list comes from.

    The runs notebook 06 scored (``run_id`` of ``data/analysis/scored.parquet``: the answers
    the claims and figures are computed from); before stage 06 has run, the current run of
    each (model, arm) (stage 04's stamps); failing both, every folder in ``data/results``.
    Each run's ``run.json`` supplies the model, arm and sessions; one that is missing or
    cannot be parsed is listed with that note instead, so one broken file hides nothing else.

    Returns
    -------
    (rows, source) : one dict per run (``run id, model, arm, records, trials, started,
    commit, note``), and a sentence naming the source of the list.
    """
    import pandas as pd

    paths = project_paths(root)
    scored = paths.analysis / SCORED_FILE
    run_ids: list[str] = []
    problem = ""
    source = "the runs notebook 06 scored (`data/analysis/scored.parquet`)"
    if scored.is_file():
        try:
            run_ids = sorted(pd.read_parquet(scored, columns=["run_id"])["run_id"]
                             .astype(str).unique())
        except (OSError, ValueError, KeyError) as err:
            problem = f"`data/analysis/scored.parquet` is unreadable ({err}), so "
    if not run_ids:
        from mislib.inference.store import current_runs

        run_ids = [p.name for p in current_runs(paths.results)]
        source = problem + "the current run of each (model, arm) (stage 04's stamps)"
    if not run_ids:
        run_ids = sorted(p.parent.name for p in paths.results.glob(f"*/{RUN_FILE}"))
        source = problem + "every run folder in `data/results/`"
    rows = []
    for run_id in run_ids:
        path = paths.results / run_id / RUN_FILE
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            rows.append({"run id": run_id, "note": f"run.json missing or unreadable: {err}"})
            continue
        sessions = [s for s in record.get("sessions") or [] if isinstance(s, dict)]
        first, last = (sessions[0], sessions[-1]) if sessions else ({}, {})
        request = last.get("request") or {}
        rows.append({
            "run id": run_id,
            "model": record.get("model") or record.get("model_id") or "",
            "arm": record.get("arm", ""),
            "records": record.get("n_records", ""),
            "trials": request.get("n_trials", last.get("n_trials", "")),
            "started": str(first.get("started", "")),
            "commit": str(last.get("git_commit") or "")[:12],
            "note": "simulated responses" if record.get("simulated") else "",
        })
    return rows, source


def _html_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """An HTML table (escaped) of ``rows``; cells may carry ``('html', markup)`` links."""
    def cell(v: Any) -> str:
        if isinstance(v, tuple) and v and v[0] == "html":
            return v[1]
        return html.escape("" if v is None else str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c, ''))}</td>" for c in columns)
                   + "</tr>" for r in rows)
    return (f'<table class="mislib-table"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>")


def _demote_headings(markdown: str) -> str:
    """Shift every Markdown heading one level down (``#`` -> ``##``) outside code fences."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        out.append("#" + line if not fenced and re.match(r"#{1,5} ", line) else line)
    return "\n".join(out)


def _landing_notebook(profile: str, books, runs, runs_source: str, claims_md: str | None,
                      figures: Sequence[str], built: str):
    """The landing page as a notebook of Markdown cells (rendered like the others)."""
    import nbformat.v4 as v4

    models = sorted({r["model"] for r in runs if r.get("model")})
    run_ids = [r["run id"] for r in runs]
    cells = [v4.new_markdown_cell(
        f"# MIS-Ground: report of the `{profile}` run\n\n"
        f"Profile **`{profile}`** · models: "
        + (", ".join(f"`{m}`" for m in models) or "*none (no inference run of this profile)*")
        + " · run ids: " + (", ".join(f"`{r}`" for r in run_ids) or "*none*")
        + f"\n\nBuilt {built} by `make report` from the executed notebooks in "
        f"`build/notebooks/{profile}/`, `paper/claims.md` and `figures/`.")]

    nb_rows = [{
        "notebook": ("html", f'<a href="notebooks/{html.escape(b["path"].stem)}.html">'
                             f'{html.escape(b["path"].stem)}</a>'),
        "title": b["title"], "finished (UTC)": b["end_time"][:19].replace("T", " "),
        "duration": "" if b["duration"] is None else f'{float(b["duration"]):.1f} s',
        "status": b["status"], "note": b.get("note", "")} for b in books]
    problems = [b["path"].stem for b in books if b["status"] != "ok" or b.get("note")]
    warning = (f"\n\n> **Not one complete run**: {', '.join(problems)} failed or are older "
               "than a notebook before them; rerun `make reproduce`." if problems else "")
    cells.append(v4.new_markdown_cell(
        "## Notebooks\n\nEach page is the executed notebook with its outputs." + warning
        + "\n\n" + _html_table(nb_rows, ["notebook", "title", "finished (UTC)", "duration",
                                          "status", "note"])))

    cells.append(v4.new_markdown_cell(
        f"## Inference runs\n\nListed: {runs_source}.\n\n"
        + (_html_table(runs, ["run id", "model", "arm", "records", "trials", "started",
                              "commit", "note"])
           if runs else "No inference run in `data/results/` yet (notebook 04 makes them).")))

    if claims_md is None:
        cells.append(v4.new_markdown_cell(
            "## Claims\n\n`paper/claims.md` is missing: notebook 08 writes it "
            "(`make reproduce`)."))
    else:
        cells.append(v4.new_markdown_cell(_demote_headings(claims_md)))

    key = [f for f in figures if f.startswith(KEY_FIGURE_PREFIX)]
    fig_md = ["## Key figures", ""]
    fig_md += [f"### {Path(f).stem}\n\n![{Path(f).stem}](figures/{f})\n" for f in key] or [
        f"No `figures/{KEY_FIGURE_PREFIX}*.png` (notebook 08 writes them)."]
    cells.append(v4.new_markdown_cell("\n".join(fig_md)))
    others = [f for f in figures if not f.startswith(KEY_FIGURE_PREFIX)]
    if others:
        gallery = "".join(
            f'<figure><a href="figures/{html.escape(f)}"><img src="figures/{html.escape(f)}" '
            f'alt="{html.escape(f)}"></a><figcaption>{html.escape(f)}</figcaption></figure>'
            for f in others)
        cells.append(v4.new_markdown_cell(
            "## All figures\n\nEvery other figure in `figures/` (click for full size).\n\n"
            f'<div class="mislib-gallery">{gallery}</div>'))
    nb = v4.new_notebook(cells=cells)
    nb.metadata["title"] = f"MIS-Ground report ({profile})"
    return nb


def _copy_mathjax(site: Path) -> str | None:
    """Copy MathJax 2.7 beside the pages; return its URL relative to a notebook page."""
    try:
        import jupyter_server_mathjax
    except ImportError:
        return None
    static = Path(jupyter_server_mathjax.__file__).parent / "static"
    if not (static / "MathJax.js").is_file():
        return None
    shutil.copytree(static, site / "mathjax", ignore=shutil.ignore_patterns("localization"))
    return f"../mathjax/MathJax.js?config={MATHJAX_CONFIG}"


def build_report(profile: str = "demo", root: str | os.PathLike | None = None,
                 out: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Build the static site of the last run of ``profile``; return ``index.html``'s path.

    Parameters
    ----------
    profile : profile name (or a TOML path: its stem names the run, as in ``reproduce``).
    root : project root (default: the repository).
    out : the site's folder (default ``build/site``); replaced as a whole once the new site
        is complete, so a failed build leaves the previous site in place.
    progress : show a tqdm bar over the notebooks.

    Raises
    ------
    ReportError : no executed notebooks in ``build/notebooks/<profile>/`` (run
        ``make reproduce`` first) or an unreadable notebook.
    """
    from tqdm import tqdm

    paths = project_paths(root)
    name = profile_name(profile)
    executed = paths.build / "notebooks" / name
    books = read_executed(executed)
    if not books:
        raise ReportError(f"no executed notebooks in {executed}: run "
                          f"`make reproduce PROFILE={name}` first")
    site = Path(out) if out is not None else paths.build / "site"
    tmp = site.with_name(site.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "notebooks").mkdir(parents=True)
    (tmp / "figures").mkdir()

    figures = sorted(p.name for p in paths.figures.glob("*.png"))
    for f in figures:
        shutil.copy2(paths.figures / f, tmp / "figures" / f)
    mathjax = _copy_mathjax(tmp) if any(_has_math(b["nb"]) for b in books) else None
    exporter = _exporter(mathjax)

    for book in tqdm(books, desc="report", unit="notebook", disable=not progress):
        stem = book["path"].stem
        resources = {"metadata": {"name": stem, "path": str(paths.notebooks)},
                     "mislib_back": "../index.html", "mislib_profile": name,
                     "mislib_ipynb": f"{stem}.ipynb",
                     "mislib_mathjax": bool(mathjax and _has_math(book["nb"]))}
        try:
            body, _ = exporter.from_notebook_node(book["nb"], resources=resources)
        except Exception as err:  # one notebook nbconvert cannot render must not cost the rest
            problem = f"could not be rendered ({type(err).__name__}: {err})"
            print(f"warning: {book['path']} {problem}", file=sys.stderr)
            book["note"] = "; ".join(filter(None, [book.get("note"), problem]))
            body = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{stem}</title>"
                    f"</head><body><p><a href='../index.html'>&larr; report</a></p><p>"
                    f"{html.escape(str(book['path'].name))} {html.escape(problem)}; the "
                    f"executed notebook is <a href='{stem}.ipynb'>here</a>.</p></body></html>")
        (tmp / "notebooks" / f"{stem}.html").write_text(body, encoding="utf-8")
        shutil.copy2(book["path"], tmp / "notebooks" / book["path"].name)

    claims = paths.paper / "claims.md"
    built = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    runs, runs_source = read_runs(root)
    landing = _landing_notebook(name, books, runs, runs_source,
                                claims.read_text() if claims.is_file() else None, figures,
                                built)
    body, _ = _exporter(None, embed_images=False).from_notebook_node(
        landing, resources={"metadata": {"name": "index", "path": str(tmp)},
                            "mislib_mathjax": False})
    (tmp / "index.html").write_text(body, encoding="utf-8")

    shutil.rmtree(site, ignore_errors=True)
    tmp.rename(site)
    return site / "index.html"


def main_report(args) -> int:
    """``python -m mislib report --profile demo`` (what ``make report`` calls)."""
    try:
        index = build_report(args.profile)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"report: {index}")
    return 0
