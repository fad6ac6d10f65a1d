"""mislib.report: the static site of the last run, built from tiny executed notebooks and
checked in a headless Chromium the way a reader sees it."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from browser import Chromium, chromium_binary
from conftest import require

from mislib.paths import project_paths
from mislib.report import ReportError, build_report, read_runs

CLAIM_TITLE = "Standard view: anatomical beats colloquial"
CLAIM_ROW = "standard view, anatomical terms"
SCORED_RUN = "smoke-tiny-baseline-0123456789"
OLD_RUN = "smoke-tiny-baseline-9876543210"


def _notebook(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    for kind, source in cells:
        src = textwrap.dedent(source).strip()
        nb.cells.append(nbformat.v4.new_markdown_cell(src) if kind == "md"
                        else nbformat.v4.new_code_cell(src))
    nb.cells[1].metadata["tags"] = ["parameters"]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    return nb


def _write_project(root: Path) -> None:
    """Two numbered notebooks (a figure, a formula), a claims.md and a run.json under root."""
    notebooks = root / "notebooks"
    notebooks.mkdir(parents=True)
    figure = """
        import matplotlib.pyplot as plt
        from pathlib import Path
        fig, ax = plt.subplots(figsize=(3, 2))
        ax.plot([0, 1, 2], [1, 0, 1])
        Path("../figures").mkdir(exist_ok=True)
        fig.savefig("../figures/{name}.png")
        plt.show()
    """
    nbformat.write(_notebook([
        ("md", "# 01 · A tiny first stage\n\nIt draws one line."),
        ("code", 'profile = "demo"\nforce = False'),
        ("code", figure.format(name="01_line")),
    ]), notebooks / "01_tiny_stage.ipynb")
    nbformat.write(_notebook([
        ("md", "# 08 · Tiny paper assets\n\nThe rule: $$s(c) = \\sum_j p_j$$"),
        ("code", 'profile = "demo"\nforce = False'),
        ("code", figure.format(name="08_headline")),
        ("code", 'print("accuracy table written")'),
    ]), notebooks / "08_tiny_assets.ipynb")
    paper = root / "paper"
    paper.mkdir()
    (paper / "claims.md").write_text(textwrap.dedent(f"""\
        # Headline claims of the paper beside this run

        Profile `demo`; models: `smoke:tiny`.

        ## {CLAIM_TITLE}

        | quantity | paper | this run | status |
        |---|---|---|---|
        | {CLAIM_ROW} | 69.4 | 25.0 | not reproduced |
        """))
    # the run notebook 06 scored, and an older run of another configuration that it did not
    for run_id in (SCORED_RUN, OLD_RUN):
        run = root / "data" / "results" / run_id
        run.mkdir(parents=True)
        (run / "run.json").write_text(json.dumps({
            "run_id": run_id, "model": f"model-of-{run_id}", "arm": "baseline",
            "n_records": 24, "sessions": [{"started": "2026-01-01T00:00:00Z",
                                           "git_commit": "0123456789abcdef",
                                           "request": {"n_trials": 2}}]}))
    analysis = root / "data" / "analysis"
    analysis.mkdir(parents=True)
    pd.DataFrame({"run_id": [SCORED_RUN, SCORED_RUN], "trial": [0, 1]}).to_parquet(
        analysis / "scored.parquet")


@pytest.fixture(scope="module")
def demo_site(tmp_path_factory):
    """A site built from two tiny notebooks executed by papermill (what reproduce runs)."""
    from mislib.notebooks import reproduce

    root = tmp_path_factory.mktemp("report_root")
    _write_project(root)
    reproduce("demo", root=root)
    index = build_report("demo", root=root, progress=False)
    return root, index


def test_report_lists_notebooks_scored_runs_claims_and_key_figures(demo_site):
    root, index = demo_site
    page = index.read_text()
    assert "01_tiny_stage.html" in page and "08_tiny_assets.html" in page
    assert SCORED_RUN in page and f"model-of-{SCORED_RUN}" in page
    assert OLD_RUN not in page, "a run that notebook 06 did not score is listed"
    assert CLAIM_TITLE in page and CLAIM_ROW in page
    assert 'src="figures/08_headline.png"' in page
    assert (index.parent / "figures" / "08_headline.png").is_file()
    for stem in ("01_tiny_stage", "08_tiny_assets"):
        assert (index.parent / "notebooks" / f"{stem}.html").is_file()
        assert (index.parent / "notebooks" / f"{stem}.ipynb").is_file()


def test_report_pages_load_nothing_from_the_network(demo_site):
    _, index = demo_site
    for page in [index, *index.parent.glob("notebooks/*.html")]:
        text = page.read_text()
        remote = re.findall(r'<(?:script|link|img)[^>]+(?:src|href)="(?:https?:)?//[^"]+"', text)
        assert remote == [], f"{page.name} loads {remote}"


def test_notebook_page_shows_outputs_and_links_back(demo_site):
    _, index = demo_site
    page = (index.parent / "notebooks" / "08_tiny_assets.html").read_text()
    assert "accuracy table written" in page
    assert "data:image/png;base64," in page
    assert 'href="../index.html"' in page


def test_report_without_executed_notebooks_names_the_folder_and_the_command(tmp_path):
    with pytest.raises(ReportError, match=r"build/notebooks/paper.*make reproduce PROFILE=paper"):
        build_report("paper", root=tmp_path, progress=False)
    assert not (tmp_path / "build" / "site").exists()


def test_runs_fall_back_to_every_run_folder_and_list_a_broken_run_json(tmp_path):
    good = tmp_path / "data" / "results" / "good"
    good.mkdir(parents=True)
    (good / "run.json").write_text(json.dumps({"run_id": "good", "model": "m", "arm": "semsam",
                                               "sessions": [{"request": {"n_trials": 3}}]}))
    bad = tmp_path / "data" / "results" / "bad"
    bad.mkdir()
    (bad / "run.json").write_text("{not json")
    rows, source = read_runs(tmp_path)
    rows = {r["run id"]: r for r in rows}
    assert "every run folder" in source
    assert rows["good"]["arm"] == "semsam" and rows["good"]["trials"] == 3
    assert "unreadable" in rows["bad"]["note"]


def test_failed_and_left_over_notebooks_are_flagged_on_the_landing_page(tmp_path):
    folder = tmp_path / "build" / "notebooks" / "demo"
    folder.mkdir(parents=True)
    for name, title, failed, end in (("04_broken", "04 · Broken", True, "2026-01-02T00:00:00"),
                                     ("05_older", "05 · Older", False, "2026-01-01T00:00:00")):
        nb = _notebook([("md", f"# {title}"), ("code", "profile = 'demo'")])
        nb.metadata["papermill"] = {"exception": failed, "parameters": {"profile": "demo"},
                                    "end_time": end, "duration": 1.0}
        nbformat.write(nb, folder / f"{name}.ipynb")
    page = build_report("demo", root=tmp_path, progress=False).read_text()
    assert re.search(r"04 · Broken</td>(<td>[^<]*</td>){2}<td>failed</td><td></td>", page)
    assert re.search(r"05 · Older</td>(<td>[^<]*</td>){2}<td>ok</td>"
                     r"<td>from an earlier run than 04_broken</td>", page)
    assert "Not one complete run" in page


@pytest.mark.timeout(240)
def test_chromium_shows_claims_loads_every_image_and_logs_no_error(demo_site, tmp_path):
    require(chromium_binary() is not None, "Chromium (Debian package `chromium`)",
            "apt-get install -y chromium")
    _, index = demo_site
    shot = project_paths().build / "report_landing.png"
    with Chromium(tmp_path / "chromium-profile") as browser:
        browser.open(index.as_uri())
        text = browser.evaluate("document.body.innerText")
        assert CLAIM_TITLE in text and CLAIM_ROW in text and "not reproduced" in text
        images = browser.evaluate(
            "Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth])")
        assert images and all(width > 0 for _, width in images), images
        assert browser.errors() == []
        browser.screenshot(shot)

        browser.open((index.parent / "notebooks" / "08_tiny_assets.html").as_uri(), settle=2.0)
        text = browser.evaluate("document.body.innerText")
        assert "accuracy table written" in text
        images = browser.evaluate("Array.from(document.images).map(i => i.naturalWidth)")
        assert images and all(width > 0 for width in images), images
        # MathJax (copied beside the pages) typeset the formula instead of leaving TeX source
        assert browser.evaluate("document.querySelectorAll('.MathJax_Display').length") == 1
        assert browser.errors() == []
    assert shot.stat().st_size > 10_000


def test_a_notebook_nbconvert_cannot_render_gets_a_note_and_the_rest_is_built(
        tmp_path, monkeypatch):
    import mislib.report as report

    folder = tmp_path / "build" / "notebooks" / "demo"
    folder.mkdir(parents=True)
    for name in ("01_fine", "02_unrenderable"):
        nbformat.write(_notebook([("md", f"# {name}"), ("code", "profile = 'demo'")]),
                       folder / f"{name}.ipynb")
    real = report._exporter

    class Picky:
        def __init__(self, inner):
            self.inner = inner

        def from_notebook_node(self, nb, resources=None):
            if resources["metadata"]["name"] == "02_unrenderable":
                raise ValueError("template exploded")
            return self.inner.from_notebook_node(nb, resources=resources)

    monkeypatch.setattr(report, "_exporter", lambda *a, **k: Picky(real(*a, **k)))
    index = build_report("demo", root=tmp_path, progress=False)
    assert "could not be rendered (ValueError: template exploded)" in index.read_text()
    assert "01_fine" in (index.parent / "notebooks" / "01_fine.html").read_text()
    fallback = (index.parent / "notebooks" / "02_unrenderable.html").read_text()
    assert 'href="02_unrenderable.ipynb"' in fallback.replace("'", '"')
