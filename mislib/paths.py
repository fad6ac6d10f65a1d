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

# The stage contract files (data/README.md), named once. Stages join these to the folders
# below (``paths.benchmark / QUESTIONS_FILE``) or use the properties that do it for them.
#: Stage 01, under ``prepared/``.
VOLUMES_FILE = "volumes.parquet"
COMPONENTS_FILE = "components.parquet"
SLICES_FILE = "slices.parquet"
REJECTED_FILE = "rejected.parquet"
#: Stages 02-03, under ``benchmark/``.
RENDERS_FILE = "renders.parquet"
SKIPPED_FILE = "skipped.parquet"
LETTERS_FILE = "letters.parquet"  # read by stage 03's letters rule too
QUESTIONS_FILE = "questions.parquet"
VALIDITY_FILE = "validity.parquet"
#: Stage 04, under ``results/<run_id>/``.
RESPONSES_FILE = "responses.parquet"
RUN_FILE = "run.json"
#: Stage 06, under ``analysis/``.
SCORED_FILE = "scored.parquet"
BAYES_BY_FACTOR_FILE = "bayes_by_factor.parquet"
SEMSAM_EFFECT_FILE = "semsam_effect.parquet"
UNPARSEABLE_FILE = "unparseable.parquet"
#: Stage 07, under ``analysis/``.
FACTOR_EFFECTS_FILE = "factor_effects.parquet"
FACTOR_SD_FILE = "factor_sd.parquet"
CONTRASTS_FILE = "contrasts.parquet"
PPC_FILE = "ppc.parquet"
FACTOR_DIAGNOSTICS_FILE = "factor_diagnostics.json"
FACTOR_POSTERIOR_FILE = "factor_posterior.zarr"
RECOVERY_FILE = "recovery.parquet"
RECOVERY_DIAGNOSTICS_FILE = "recovery_diagnostics.json"
#: Stage 08, under ``paper/``.
CLAIMS_FILE = "claims.md"
NUMBERS_FILE = "numbers.tex"


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
    def volumes_file(self) -> Path:
        return self.prepared / VOLUMES_FILE

    @property
    def components_file(self) -> Path:
        return self.prepared / COMPONENTS_FILE

    @property
    def slices_file(self) -> Path:
        return self.prepared / SLICES_FILE

    @property
    def renders_file(self) -> Path:
        return self.benchmark / RENDERS_FILE

    @property
    def questions_file(self) -> Path:
        return self.benchmark / QUESTIONS_FILE

    @property
    def scored_file(self) -> Path:
        return self.analysis / SCORED_FILE

    def responses_files(self) -> list[Path]:
        """Every run's ``results/<run_id>/responses.parquet``, sorted (current or not)."""
        return sorted(self.results.glob(f"*/{RESPONSES_FILE}"))

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

    def relative(self, path: str | os.PathLike) -> str:
        """``path`` as shown to a reader: relative to the project root when inside it (so
        executed notebooks and logs do not carry the machine's folders), else as given.

        >>> ProjectPaths(Path("/r")).relative("/r/data/raw/x.nii.gz")
        'data/raw/x.nii.gz'
        """
        try:
            return Path(path).resolve().relative_to(self.root).as_posix()
        except ValueError:
            return str(path)


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
