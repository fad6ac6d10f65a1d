"""Stage 08: the paper's headline claims put to a reproduction test, and the paper's tables.

Every headline number of the paper is a claim quantity: an accuracy of some questions
(``kind="level"``, percent) or the difference of two (``kind="difference"``, percentage
points). The factor claims (:data:`CLAIMS`) select questions by factor levels from stage 06's
``scored.parquet`` and pool the models in the profile's ``claims_arm``; the decoding claims
(:data:`ARM_CLAIMS`) compare two arms of one model on the same (question, trial) pairs, for
every model that ran both arms. This run's estimate is Bayes@N (:mod:`mislib.bayes`) with a
central credible interval ``[lo, hi]``; beside it stand the raw accuracy of the same trials,
chance (the mean of 1 / number of answer options) and n (questions × trials; for a
difference, each side's). Where stage
07's factor model has the same contrast (``contrasts.parquet``) its estimate is shown too,
marked *not converged* when that fit did not converge (:func:`read_converged`).

The reproduction test
---------------------
A claim's tolerance band is the paper's value ``p`` ± ``t`` (``[paper] tolerance_points``,
percent for a level, points for a difference). With ``[lo, hi]`` this run's interval:

- a **level** is *reproduced* when ``p - t <= lo`` and ``hi <= p + t`` (the whole interval
  inside the band); *contradicted* when ``hi < p - t`` or ``lo > p + t`` (the whole
  interval outside); *inconclusive* otherwise (wider than the band, or overlapping its edge).
- a **difference** is *reproduced* when its interval lies inside the band **and** excludes
  zero on the side of the paper's sign (``lo > 0`` for a positive ``p``, ``hi < 0`` for a
  negative one); *contradicted* when the interval lies outside the band, or excludes zero on
  the other side (the opposite sign); *inconclusive* otherwise (an interval that holds zero is
  never reproduced).
- a difference the paper gives no number for but a direction (``sign``; SemSam against the
  greedy control) is *reproduced* when its interval excludes zero on that side,
  *contradicted* when it excludes zero on the other, *inconclusive* otherwise.

Before any of that a claim is *not measurable* when this run has no such questions (or no
model ran both arms), and *not assessed* when a smoke model (random weights,
:func:`mislib.provenance.is_smoke_model`) answered any of its questions, when either side has
fewer than ``[paper] min_questions`` distinct questions, when the paper states nothing to
compare with (greedy against baseline), or when the paper's number is another model's
accuracy (the SemSam accuracies are Qwen3-VL-32B's; the SemSam gain of any other model is
tested for its sign only).

Bayes@N (what ``estimate`` is): per question a uniform Beta(1, 1) prior updated by its N
trials, so a question answered correctly k times has posterior mean (k + 1) / (N + 2); the
estimate is the average of these over the questions, and the interval a normal
approximation from scorio. The data's weight is N / (N + 2): with few trials the estimate is
pulled towards 50 % (0 of 2 correct gives 25 %, 2 of 2 gives 75 %), so the raw accuracy and
chance stand beside it. If a paper number is a plain accuracy, the comparison is biased
towards 50 % by the same factor (N = 5: a 13-point difference shows as 9.3 points).

:func:`write_paper_assets` (notebook 08) writes ``paper/claims.md``, ``paper/numbers.tex``
(LaTeX macros, the profile and counts included) and ``paper/tables/*.tex`` (booktabs) +
``*.md``, each table with its provenance caption; :mod:`mislib.claims_figure` draws the
paper against this run.

The package, along its seams
----------------------------
:mod:`~mislib.claims.definitions`
    the claims as data: :class:`Claim`, :class:`ArmClaim`, :data:`CLAIMS`, :data:`ARM_CLAIMS`.
:mod:`~mislib.claims.evaluation`
    the reproduction test (:func:`claim_status`, :func:`status_reason`) and the claims table
    (:func:`evaluate_claims`, :data:`CLAIM_COLUMNS`).
:mod:`~mislib.claims.rendering`
    ``claims.md``, the paper's tables and ``numbers.tex`` as text (:func:`claims_markdown`,
    :func:`format_tables`, :func:`numbers_tex`, ...).
:mod:`~mislib.claims.assets`
    stage 08 on disk (:func:`write_paper_assets`, :func:`read_converged`,
    :func:`read_recovery`).

>>> claim_status("level", 69.4, 66.0, 71.0, tolerance=5.0)
'reproduced'
>>> claim_status("level", 69.4, 40.0, 90.0, tolerance=5.0)   # wide: never reproduced
'inconclusive'
>>> claim_status("difference", 11.6, -1.0, 9.0, tolerance=5.0)  # holds zero
'inconclusive'
"""

from mislib.claims.assets import read_converged, read_recovery, write_paper_assets
from mislib.claims.definitions import ARM_CLAIMS, CLAIMS, PAPER, ArmClaim, Claim
from mislib.claims.evaluation import CLAIM_COLUMNS, claim_status, evaluate_claims, status_reason
from mislib.claims.rendering import (
    BAYES_AT_N,
    TABLES,
    claims_display,
    claims_markdown,
    format_tables,
    latex_escape,
    latex_table,
    macro_name,
    markdown_table,
    numbers_tex,
)
from mislib.claims.rendering import _recovery_sentence as _recovery_sentence
from mislib.paths import project_paths as project_paths
from mislib.vocabulary import CLAIM_STATUSES as STATUSES

__all__ = [
    "ARM_CLAIMS", "BAYES_AT_N", "CLAIMS", "CLAIM_COLUMNS", "PAPER", "STATUSES", "TABLES",
    "ArmClaim", "Claim", "claim_status", "claims_display", "claims_markdown",
    "evaluate_claims", "format_tables", "latex_escape", "latex_table", "macro_name",
    "markdown_table", "numbers_tex", "read_converged", "read_recovery", "status_reason",
    "write_paper_assets",
]
