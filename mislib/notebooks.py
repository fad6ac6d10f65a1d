"""Run the numbered notebooks headless with papermill (what ``make reproduce`` calls).

Notebooks live in ``notebooks/NN_name.ipynb`` (no outputs; each paired with a jupytext
``NN_name.py`` percent script for readable diffs). Executed copies go to
``build/notebooks/<profile>/``. A failing cell stops the run with an error naming the
notebook and the cell.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

from mislib.config import ProfileError, load_profile, profile_name, resolve_profile
from mislib.paths import project_paths

NOTEBOOK_RE = re.compile(r"^(\d{2})_[a-z0-9_]+\.ipynb$")


class NotebookFailed(RuntimeError):
    """A notebook cell raised; the message names the notebook and the cell."""


def list_notebooks(root: str | os.PathLike | None = None, only: str | None = None) -> list[Path]:
    """Numbered notebooks in execution order; ``only="01"`` (or ``"01_volume_prep"``) picks one."""
    folder = project_paths(root).notebooks
    books = sorted(p for p in folder.glob("*.ipynb") if NOTEBOOK_RE.match(p.name))
    if only is not None:
        books = [p for p in books if p.stem == only or p.name.split("_", 1)[0] == only.zfill(2)]
        if not books:
            raise ValueError(f"no notebook matches NB={only!r} in {folder}")
    return books


def _failed_cell(nb_path: Path) -> str:
    """Describe the first cell that raised in an executed notebook."""
    import nbformat

    nb = nbformat.read(nb_path, as_version=4)
    code_index = 0
    for cell in nb.cells:
        # papermill's injected-parameters cell is not in the committed notebook: skip it
        # so the number matches what the reader sees there
        if cell.cell_type != "code" or "injected-parameters" in cell.metadata.get("tags", []):
            continue
        code_index += 1
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                first_line = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
                return (f"code cell {code_index} ({first_line[:60]!r}): "
                        f"{out.get('ename')}: {out.get('evalue')}")
    return "unknown cell"


def reproduce(profile: str = "demo", only: str | None = None, force: bool = False,
              root: str | os.PathLike | None = None, log_output: bool = False) -> list[Path]:
    """Execute the notebooks in numeric order; return the executed copies' paths.

    The profile is checked (:func:`mislib.config.load_profile`) before the first notebook
    starts, and a TOML path is made absolute from the caller's directory (the notebooks run
    in ``notebooks/``).
    """
    import papermill as pm

    profile = resolve_profile(profile)
    load_profile(profile)  # raises ProfileError naming table, key and value
    paths = project_paths(root)
    out_dir = paths.build / "notebooks" / profile_name(profile)
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = []
    for nb in list_notebooks(root, only):
        target = out_dir / nb.name
        t0 = time.perf_counter()
        print(f"== {nb.name} (profile={profile})", flush=True)
        try:
            pm.execute_notebook(
                str(nb), str(target),
                parameters={"profile": str(profile), "force": bool(force)},
                cwd=str(paths.notebooks), kernel_name="python3", progress_bar=False,
                log_output=log_output,
            )
        except pm.PapermillExecutionError as err:
            raise NotebookFailed(
                f"notebook {nb.name} failed at {_failed_cell(target)}; "
                f"executed copy: {target}") from err
        print(f"   done in {time.perf_counter() - t0:.1f} s -> {target}", flush=True)
        executed.append(target)
    return executed


def main_reproduce(args) -> int:
    try:
        reproduce(args.profile, args.nb, args.force)
    except (NotebookFailed, ProfileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
