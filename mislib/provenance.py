"""Where a figure's or a table's numbers come from: profile, models, runs and counts.

A number without its source misleads: the demo's accuracies come from a randomly
initialised model and look like a result. Every figure the notebooks save carries a
:class:`Provenance` stamp in its lower-left corner (:func:`stamp`, called by
:func:`mislib.plots.save_figure`) and every table a one-line :func:`caption`; both say the
profile, the model(s) (and that the smoke model's answers are noise), the run ids, and how
many questions were generated, how many asked (sent to a model, answered or not: stage 04's
records, :func:`read_sent_records`) and how many trials each, and how many of the asked
questions got an answer when some did not. A figure drawn
from a factor-model fit that did not converge says ``NOT CONVERGED`` in red.

Stages before inference have no model and no run: :meth:`Provenance.from_profile` gives a
stamp with the profile and that stage's counts only.

>>> prov = Provenance(profile="demo", models=("smoke:tiny-qwen3-vl",), run_ids=("r1",),
...                   n_questions_generated=1446, n_questions_asked=96, n_trials=2,
...                   smoke=True)
>>> print(prov.label())
profile demo · model smoke:tiny-qwen3-vl (random weights: answers are noise) · run r1 · 96 of 1,446 questions × 2 trials
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from mislib.config import profile_name  # noqa: F401  (re-exported: stamps name their profile)

#: Model ids of the demo's randomly initialised models start with this.
SMOKE_PREFIX = "smoke:"
#: What the stamp says after a smoke model's id.
SMOKE_NOTE = "random weights: answers are noise"
#: The ``gid`` of the texts :func:`stamp` draws (a second stamp replaces the first).
STAMP_GID = "mislib-provenance"


def is_smoke_model(model_id: Any) -> bool:
    """Whether ``model_id`` names a smoke model (``smoke:…``, random weights).

    >>> is_smoke_model("smoke:tiny-qwen3-vl"), is_smoke_model("Qwen/Qwen3-VL-2B-Instruct")
    (True, False)
    """
    return str(model_id).startswith(SMOKE_PREFIX)



def count_generated_questions(root: str | os.PathLike | None = None) -> int:
    """Rows of stage 03's ``questions.parquet`` (the benchmark's generated questions).

    Raises
    ------
    FileNotFoundError
        When stage 03 has not written the table under ``root``.
    """
    from mislib.paths import project_paths

    path = project_paths(root).questions_file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run stage 03 (03_question_generation) "
                                "to count the generated questions")
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(path).metadata.num_rows)


def read_sent_records(run_ids: Iterable[str],
                      root: str | os.PathLike | None = None) -> pd.DataFrame:
    """Every record stage 04 wrote for the runs (``run_id, model, arm, question_id, trial``):
    what was sent to a model, whether it answered, failed (error status) or was unparseable.

    Stage 06's ``scored.parquet`` keeps the answered records only, so a question whose every
    trial failed is in the runs' ``responses.parquet`` but not in the scored table.

    Raises
    ------
    FileNotFoundError
        When a run has no ``data/results/<run_id>/responses.parquet`` under ``root``.
    ValueError
        When one lacks a needed column.
    """
    from mislib.paths import RESPONSES_FILE, project_paths

    results = project_paths(root).results
    columns = ["model", "arm", "question_id", "trial"]
    frames = []
    for run_id in sorted(set(map(str, run_ids))):
        path = results / run_id / RESPONSES_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the records of run {run_id} count the "
                                    "questions asked (stage 04, 04_inference)")
        try:
            frame = pd.read_parquet(path, columns=columns)
        except (KeyError, ValueError) as err:  # pyarrow names a missing column either way
            raise ValueError(f"{path}: lacks one of the columns {columns} (stage 04's "
                             f"responses schema): {err}") from None
        frames.append(frame.assign(run_id=run_id))
    if not frames:
        return pd.DataFrame(columns=["run_id", *columns])
    return pd.concat(frames, ignore_index=True)


def scored_run_ids(profile: str | Mapping[str, Any],
                 root: str | os.PathLike | None) -> set[str]:
    """The run ids stage 06 reads for ``profile`` (:func:`mislib.scoring.find_runs`: the
    ``[scoring] runs`` named, else the current runs); none when ``root`` holds no run."""
    from mislib.config import ProfileError, stage_params
    from mislib.scoring import find_runs

    try:
        runs = stage_params(profile, "scoring").get("runs")
    except ProfileError:  # a partial mapping (no [scoring] table): stage 06's default
        runs = None
    try:
        return {path.parent.name for path in find_runs(root, runs)}
    except FileNotFoundError:  # no run on disk: the scored table's runs name what is missing
        return set()


def _answered(records: pd.DataFrame) -> pd.DataFrame:
    """The records a model answered (``answered``, else ``status == "ok"``; all without
    either column: stage 06's scored table holds answered records only)."""
    if "answered" in records:
        return records[records["answered"].astype(bool)]
    if "status" in records:
        return records[records["status"].fillna("ok").astype(str) == "ok"]
    return records


@dataclass(frozen=True)
class Provenance:
    """What a figure or table was computed from.

    Attributes
    ----------
    profile : the profile's name.
    models : model ids the runs sent questions to, answered or not (empty before inference).
    run_ids : stage 04 run folders the numbers read, with any whose every record failed
        (empty before inference).
    n_questions_generated : rows of stage 03's ``questions.parquet`` (0: not yet generated).
    n_questions_asked : distinct questions sent to a model in the runs (answered or not).
    n_trials : trials per question (the most any (model, arm, question) was sent).
    smoke : a smoke model (random weights) answered.
    converged : whether the factor-model fit behind the figure converged (None: no fit).
    simulated : the runs are simulated responses (:mod:`mislib.simulate`), not a model's.
    counts : further ``(what, how many)`` pairs to name, e.g. ``(("volumes", 3),)`` for a
        stage before inference.
    n_questions_answered : distinct questions with at least one answered record (None: not
        counted apart, i.e. every question asked was answered or it is unknown).
    n_trials_min : the trials of the (model, arm) sent the fewest, when fewer than
        ``n_trials`` (models run with different ``n_trials``); None when all were sent
        ``n_trials``.
    """

    profile: str
    models: tuple[str, ...]
    run_ids: tuple[str, ...]
    n_questions_generated: int
    n_questions_asked: int
    n_trials: int
    smoke: bool
    converged: bool | None = None
    simulated: bool = False
    counts: tuple[tuple[str, int], ...] = ()
    n_questions_answered: int | None = None
    n_trials_min: int | None = None

    @classmethod
    def from_scored(cls, scored: pd.DataFrame, profile: str | Mapping[str, Any],
                    root: str | os.PathLike | None = None,
                    n_questions_generated: int | None = None,
                    converged: bool | None = None,
                    sent: pd.DataFrame | None = None) -> Provenance:
        """The provenance of numbers computed from stage 06's ``scored`` table.

        The questions asked, the trials, the models and the runs are counted from what was
        sent (``sent``, by default the records under ``root`` of the scored table's runs and
        of the runs stage 06 reads, :func:`read_sent_records`), not from the scored rows: a
        question whose every trial failed was asked all the same, and a run whose every
        record failed has no scored row at all. The questions with an answer are counted
        apart (``n_questions_answered``).

        Parameters
        ----------
        scored : ``scored.parquet`` (``run_id, model, arm, question_id, trial``), or stage
            04's records (with their ``status``).
        profile : profile name, TOML path or loaded mapping.
        root : project root whose stage 03 table counts the generated questions, and whose
            ``run.json`` files say whether a run was simulated.
        n_questions_generated : the count, when the caller has it (skips reading stage 03).
        converged : the fit's convergence, for figures of stage 07 (None: no fit).
        sent : the records sent for ``scored``'s runs (``model, arm, question_id, trial``),
            when the caller has them (skips reading the runs' ``responses.parquet``).

        Raises
        ------
        ValueError
            When ``scored`` lacks a needed column.
        FileNotFoundError
            When ``n_questions_generated`` is not given and stage 03's table is missing, or
            ``sent`` is not given and a run's ``responses.parquet`` is.
        """
        needed = ["run_id", "model", "arm", "question_id", "trial"]
        missing = [c for c in needed if c not in scored]
        if missing:
            raise ValueError(f"scored table lacks columns {missing} (stage 06's scored.parquet)")
        run_ids = set(scored["run_id"].astype(str))
        if n_questions_generated is None:
            n_questions_generated = count_generated_questions(root)
        if sent is None:
            # a run whose every record failed has no row in scored.parquet: the runs are
            # those stage 06 read, with the scored table's
            run_ids |= scored_run_ids(profile, root)
            sent = read_sent_records(run_ids, root)
        run_ids |= set(sent["run_id"].astype(str)) if "run_id" in sent else set()
        models = tuple(sorted(set(scored["model"].astype(str)) | set(sent["model"].astype(str))))
        run_ids = tuple(sorted(run_ids))
        # trials per (model, arm): the most any of its questions was sent (an unfinished
        # question does not make a range); their range over the models and arms
        per_run = (sent.groupby(["model", "arm", "question_id"])["trial"].nunique()
                   .groupby(level=["model", "arm"]).max())
        n_trials = int(per_run.max()) if len(per_run) else 0
        n_trials_min = int(per_run.min()) if len(per_run) else 0
        asked = set(sent["question_id"].astype(str)) | set(scored["question_id"].astype(str))
        answered = int(_answered(scored)["question_id"].nunique())
        return cls(profile=profile_name(profile), models=models, run_ids=run_ids,
                   n_questions_generated=int(n_questions_generated),
                   n_questions_asked=len(asked), n_trials=n_trials,
                   smoke=any(is_smoke_model(m) for m in models),
                   converged=converged, simulated=_any_simulated(run_ids, root),
                   n_questions_answered=answered if answered < len(asked) else None,
                   n_trials_min=n_trials_min if n_trials_min < n_trials else None)

    @classmethod
    def from_profile(cls, profile: str | Mapping[str, Any],
                     counts: Mapping[str, int] | Iterable[tuple[str, int]] = (),
                     n_questions_generated: int = 0) -> Provenance:
        """The provenance of a stage before inference: the profile and its counts only.

        >>> Provenance.from_profile("demo", {"volumes": 3, "slices": 120}).label()
        'profile demo · 3 volumes · 120 slices'
        """
        pairs = counts.items() if isinstance(counts, Mapping) else counts
        return cls(profile=profile_name(profile), models=(), run_ids=(),
                   n_questions_generated=int(n_questions_generated), n_questions_asked=0,
                   n_trials=0, smoke=False,
                   counts=tuple((str(k), int(v)) for k, v in pairs))

    def replace(self, **changes: Any) -> Provenance:
        """A copy with some fields changed (e.g. ``converged`` for a fit's figures)."""
        from dataclasses import replace

        return replace(self, **changes)

    def trials_text(self, dash: str = "–") -> str:
        """The trials per question: ``"5"``, or ``"2–5"`` when models or arms were sent
        different numbers of trials."""
        if self.n_trials_min is None or self.n_trials_min >= self.n_trials:
            return f"{self.n_trials:,}"
        return f"{self.n_trials_min:,}{dash}{self.n_trials:,}"

    def label(self) -> str:
        """One line: profile · model(s) · runs · questions × trials (· fit not converged)."""
        parts = [f"profile {self.profile}"]
        if self.models:
            named = [f"{m} ({SMOKE_NOTE})" if is_smoke_model(m) else m for m in self.models]
            parts.append(("model " if len(named) == 1 else "models ") + ", ".join(named))
        if self.simulated:
            parts.append("simulated responses: they test the pipeline only")
        if self.run_ids:
            parts.append(("run " if len(self.run_ids) == 1 else "runs ")
                         + ", ".join(self.run_ids))
        if self.n_questions_asked:
            text = f"{self.n_questions_asked:,}"
            if self.n_questions_generated:
                text += f" of {self.n_questions_generated:,}"
            text += " questions"
            if self.n_questions_answered is not None:
                text += f" ({self.n_questions_answered:,} answered)"
            parts.append(f"{text} × {self.trials_text()} "
                         f"trial{'s' if self.n_trials != 1 else ''}")
        elif self.n_questions_generated:
            parts.append(f"{self.n_questions_generated:,} questions generated")
        parts.extend(_count(n, what) for what, n in self.counts)
        if self.converged is False:
            parts.append("factor model NOT CONVERGED")
        return " · ".join(parts)


def _count(n: int, what: str) -> str:
    """``"3 volumes"``, ``"1 volume"`` (a one-word plural loses its ``s`` for one)."""
    if n == 1 and what.endswith("s") and " " not in what:
        what = what[:-1]
    return f"{n:,} {what}"


def _any_simulated(run_ids: Iterable[str], root: str | os.PathLike | None) -> bool:
    """Whether any run's ``run.json`` says ``simulated`` (missing files count as not)."""
    import json

    from mislib.paths import RUN_FILE, project_paths

    results = project_paths(root).results
    for run_id in run_ids:
        try:
            record = json.loads((results / run_id / RUN_FILE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("simulated"):
            return True
    return False


def caption(prov: Provenance) -> str:
    """The one-line caption of a table: ``Source: <label>.``"""
    return f"Source: {prov.label()}."


def stamp(fig: Any, prov: Provenance, fontsize: float = 6.0) -> Any:
    """Draw ``prov``'s label under the figure's lower-left corner; return the figure.

    The label sits just below everything already drawn (the figures are saved with a tight
    bounding box, which grows to hold it), so it never covers data or an axis label; it is
    wrapped to the figure's width. When
    the fit behind the figure did not converge, ``NOT CONVERGED`` is also drawn in red
    above the figure's upper-right corner. Stamping again replaces the earlier stamp.
    """
    for text in list(fig.texts):
        if text.get_gid() == STAMP_GID:
            text.remove()
    # Place the stamp outside everything drawn so far (axis labels, legends above the
    # axes), in inches: the saved figure's tight bounding box grows to hold it.
    box = fig.get_tightbbox()  # inches (matplotlib finds a renderer for the canvas)
    width_in, height_in = fig.get_size_inches()
    pad = fontsize / 72
    # ~0.55 em per character: the wrap width in characters of the figure's width
    chars = max(40, int(box.width * 72 / (fontsize * 0.55)))
    text = "\n".join(textwrap.wrap(prov.label(), chars, break_on_hyphens=False))
    colour = "#b2182b" if prov.smoke or prov.simulated or prov.converged is False else "0.35"
    # figure fractions (savefig's tight box moves the figure's origin, not the inches')
    fig.text(box.x0 / width_in, (box.y0 - pad) / height_in, text, ha="left", va="top",
             fontsize=fontsize, color=colour, gid=STAMP_GID)
    if prov.converged is False:
        fig.text(box.x1 / width_in, (box.y1 + pad) / height_in, "NOT CONVERGED", ha="right",
                 va="bottom", fontsize=fontsize + 3, fontweight="bold", color="#b2182b",
                 gid=STAMP_GID)
    return fig
