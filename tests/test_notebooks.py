"""Committed notebooks: numbered, no outputs, a parameters cell, in sync with their .py pair."""

from pathlib import Path

import jupytext
import nbformat
import pytest

from mislib.notebooks import NOTEBOOK_RE, list_notebooks

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_notebooks_are_numbered_and_found_in_order():
    assert NOTEBOOKS, "no notebooks committed"
    for nb in NOTEBOOKS:
        assert NOTEBOOK_RE.match(nb.name), f"{nb.name} is not NN_name.ipynb"
    listed = list_notebooks(ROOT)
    assert [p.name for p in listed] == sorted(p.name for p in listed)


def test_list_notebooks_picks_one_by_number():
    first = NOTEBOOKS[0]
    number = first.name[:2]
    assert [p.name for p in list_notebooks(ROOT, number)] == [first.name]
    with pytest.raises(ValueError, match="no notebook matches"):
        list_notebooks(ROOT, "99")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {i} has outputs"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_a_parameters_cell_with_profile_and_force(path):
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: expected one cell tagged 'parameters'"
    source = tagged[0].source
    assert "profile" in source and "force" in source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_matches_its_jupytext_pair(path):
    script = path.with_suffix(".py")
    assert script.is_file(), f"{path.name} has no paired {script.name}"
    a = jupytext.read(path)
    b = jupytext.read(script)
    cells = lambda nb: [(c.cell_type, c.source.strip()) for c in nb.cells]  # noqa: E731
    assert cells(a) == cells(b), f"{path.name} and {script.name} differ: run `make notebooks-sync`"


#: Notebooks whose saved figures this test checks (08 saves through mislib functions with
#: their own tests: plots.make_figures, claims_figure).
STAMPED = [p for p in NOTEBOOKS if p.name[:2] in {"01", "02", "03", "04", "05", "06", "07"}]


@pytest.mark.parametrize("path", STAMPED, ids=lambda p: p.name)
def test_every_figure_a_notebook_saves_carries_the_provenance_stamp(path):
    """Figures are saved only through plots.save_figure, and every call passes provenance=."""
    import ast

    tree = ast.parse(path.with_suffix(".py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    name = lambda c: getattr(c.func, "attr", getattr(c.func, "id", ""))  # noqa: E731
    assert not [c for c in calls if name(c) in ("savefig", "figure_path")], \
        f"{path.name} saves a figure around save_figure (no provenance stamp)"
    saves = [c for c in calls if name(c) == "save_figure"]
    assert saves, f"{path.name} saves no figure"
    for call in saves:
        assert "provenance" in {k.arg for k in call.keywords}, \
            f"{path.name} line {call.lineno}: save_figure without provenance="


def test_a_failing_cell_stops_reproduce_and_names_notebook_and_cell(tmp_path):
    from mislib.notebooks import NotebookFailed, reproduce

    folder = tmp_path / "notebooks"
    folder.mkdir()
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile = "demo"\nforce = False')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("x = 1"),
                nbformat.v4.new_code_cell("raise ValueError('broken on purpose')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, folder / "01_broken.ipynb")
    nbformat.write(nb, folder / "02_never.ipynb")
    with pytest.raises(NotebookFailed, match=r"01_broken.ipynb failed at code cell 3 .*"
                                             r"ValueError: broken on purpose"):
        reproduce("demo", root=tmp_path)
    executed = tmp_path / "build" / "notebooks" / "demo"
    assert (executed / "01_broken.ipynb").is_file()
    assert not (executed / "02_never.ipynb").exists()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_papermill_can_override_every_name_in_the_parameters_cell(path):
    import ast

    import papermill as pm

    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", []))
    assigned = [t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)]
    # papermill skips a line it cannot parse (e.g. '=' or a quote in its comment): that
    # parameter could then not be set from `make reproduce` or a notebook call
    assert list(pm.inspect_notebook(str(path))) == assigned
