"""Every folder the project reads or writes, named once.

Stages take a ``root`` (default: the repository root, or ``$MISGROUND_ROOT``) and derive
their folders from :func:`project_paths`, so tests can run a whole stage inside a temporary
directory. Figure file names start with the number of the notebook that made them
(:func:`figure_path`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ProjectPaths:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def raw(self) -> Path:
        return self.data / "raw"

    @property
    def demo_raw(self) -> Path:
        """Where the demo sources (atlas copy, phantoms) are written in their real layouts."""
        return self.raw / "demo"

    @property
    def prepared(self) -> Path:
        return self.data / "prepared"

    @property
    def benchmark(self) -> Path:
        return self.data / "benchmark"

    @property
    def results(self) -> Path:
        return self.data / "results"

    @property
    def analysis(self) -> Path:
        return self.data / "analysis"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def paper(self) -> Path:
        return self.root / "paper"

    @property
    def tables(self) -> Path:
        return self.paper / "tables"

    @property
    def notebooks(self) -> Path:
        return self.root / "notebooks"

    @property
    def build(self) -> Path:
        """Executed notebooks and other throw-away build products (git-ignored)."""
        return self.root / "build"

    @property
    def cache(self) -> Path:
        """Caches keyed by content hashes (SemSam tables, the smoke model)."""
        return self.root / ".cache"


def project_paths(root: str | os.PathLike | None = None) -> ProjectPaths:
    """Paths under ``root``; default ``$MISGROUND_ROOT`` or the repository root."""
    if root is None:
        root = os.environ.get("MISGROUND_ROOT", REPO_ROOT)
    return ProjectPaths(Path(root).resolve())


def figure_path(notebook: str, name: str, root: str | os.PathLike | None = None,
                suffix: str = ".png") -> Path:
    """``figures/<nn>_<name><suffix>`` where ``<nn>`` is the notebook's number.

    >>> figure_path("07_factor_analysis", "forest").name
    '07_forest.png'
    """
    number = notebook.split("_", 1)[0]
    if not number.isdigit():
        raise ValueError(f"notebook name must start with its number, got {notebook!r}")
    return project_paths(root).figures / f"{number}_{name}{suffix}"
