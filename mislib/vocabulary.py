"""The benchmark's vocabulary, named once: factors, their levels in order, arms, statuses.

Every stage imports these names from here, so a level added in one place (the ``none``
prompt, the ``greedy`` arm) reaches questions, scoring, analysis, simulation and plots
together. Plane and convention names belong to :mod:`mislib.geometry` and are re-exported.

>>> ordered("prompt", ["point", "none", "mask"])
['none', 'mask', 'point']
>>> cell_name(convention="standard", terminology="anatomical")
'p[convention=standard,terminology=anatomical]'
>>> difference_name(cell_name(dims="3d"), cell_name(dims="2d"))
'p[dims=3d] - p[dims=2d]'
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from mislib.geometry import CONVENTIONS, PLANES

if TYPE_CHECKING:
    import pandas as pd

# ----------------------------------------------------------------------------------------
# Levels of each question factor (columns of questions.parquet), in display order
# ----------------------------------------------------------------------------------------
MODALITIES = ("CT", "MRI")
DIMS = ("2d", "3d")
#: ``none`` is the scan alone (no marks, no letters): the no-prompt baseline.
PROMPTS = ("none", "mask", "box", "point")
NO_PROMPT = "none"
BACKGROUNDS = ("scan", "blank")
TERMINOLOGIES = ("anatomical", "colloquial")
FORMS = ("open", "closed_true", "closed_false")
FAMILIES = ("relation_2d", "relation_3d", "plane")
#: ``none`` is the full question (image and text); the others remove the image or the scan.
ABLATIONS = ("none", "text_only", "blank")

# ----------------------------------------------------------------------------------------
# Decoding arms of stage 04 (a trial factor: every question is answered under each)
# ----------------------------------------------------------------------------------------
#: ``baseline``: a draw from the top-k/top-p candidates (the default rule); ``greedy``: the
#: most probable candidate (the control that separates determinism from re-scoring);
#: ``semsam``: the candidate with the largest neighbourhood score (docs/design.md).
ARMS = ("baseline", "greedy", "semsam")

# ----------------------------------------------------------------------------------------
# Factors
# ----------------------------------------------------------------------------------------
#: Every factor of the benchmark, trial factors (arm, model) first, then the question
#: factors in the order the paper discusses them.
FACTORS: tuple[str, ...] = ("arm", "model", "modality", "plane", "dims", "convention",
                            "prompt", "background", "terminology", "form", "family",
                            "ablation")
#: Factors that vary within a question (every question is answered by each model and arm).
TRIAL_FACTORS: tuple[str, ...] = ("arm", "model")
#: Factors that are columns of ``questions.parquet``.
QUESTION_FACTORS: tuple[str, ...] = tuple(f for f in FACTORS if f not in TRIAL_FACTORS)
#: Factors of the stage-07 model. ``background`` is left out: it is the ``blank`` ablation
#: seen from the render's side, so the two columns are collinear.
MODEL_FACTORS: tuple[str, ...] = tuple(f for f in FACTORS if f != "background")

#: Each factor's levels in the benchmark's order (``model`` has none fixed: run-dependent).
LEVEL_ORDER: dict[str, tuple[str, ...]] = {
    "arm": ARMS,
    "modality": MODALITIES,
    "plane": PLANES,
    "dims": DIMS,
    "convention": CONVENTIONS,
    "prompt": PROMPTS,
    "background": BACKGROUNDS,
    "terminology": TERMINOLOGIES,
    "form": FORMS,
    "family": FAMILIES,
    "ablation": ABLATIONS,
}

# ----------------------------------------------------------------------------------------
# Statuses
# ----------------------------------------------------------------------------------------
#: ``status`` of a record in ``responses.parquet`` (stage 04): ``bad_response`` is an HTTP
#: endpoint's reply that is not a chat completion (the body is kept in ``error``),
#: ``request_error`` a request the endpoint refused for this record alone (HTTP 400, 413, 422).
RECORD_STATUSES = ("ok", "missing_input", "unknown_family", "oom", "bad_response",
                   "request_error")
#: ``parse_status`` of a parsed answer (:func:`mislib.answers.parse_answer`).
PARSE_STATUSES = ("ok", "unparseable", "ambiguous")
#: ``status`` of a paper claim checked by stage 08 (:mod:`mislib.claims`, whose docstring
#: states the rules): decided against the paper's value ± a tolerance, or not decided.
CLAIM_STATUSES = ("reproduced", "contradicted", "inconclusive", "not assessed",
                  "not measurable")


#: Backends that decode on this machine with the same rule and seeds, token for token (the
#: hf and vllm backends); their runs of one model pair with each other.
LOCAL_BACKENDS = ("hf", "vllm")


def decoder_of(backend: Any) -> str:
    """What pairs arms of one model: ``"local"`` for the local backends (and records older
    than the ``backend`` column), else the backend's name (``"openai"``: a server decodes).

    >>> decoder_of("vllm"), decoder_of(None), decoder_of("openai")
    ('local', 'local', 'openai')
    """
    return "local" if is_missing(backend) or backend in LOCAL_BACKENDS else str(backend)


def decoded_model(model: Any, backend: Any) -> str:
    """The model as the analysis names it: a model decoded on an endpoint is its own level
    (``"<model> via openai"``), beside the same weights decoded locally, whose arms it does
    not pair with (:func:`decoder_of`).

    >>> decoded_model("qwen3-vl-8b-instruct", "hf"), decoded_model("m", "openai")
    ('qwen3-vl-8b-instruct', 'm via openai')
    """
    decoder = decoder_of(backend)
    return str(model) if decoder == "local" else f"{model} via {decoder}"


def is_missing(value: Any) -> bool:
    """True for ``None`` and a float NaN (a null cell read back from parquet).

    >>> is_missing(None), is_missing(float("nan")), is_missing(0.0), is_missing("")
    (True, True, False, False)
    """
    return value is None or (isinstance(value, float) and math.isnan(value))


def ordered(factor: str, values: Iterable[Any]) -> list[str]:
    """The distinct non-null ``values`` of ``factor`` in the benchmark's level order.

    Levels :data:`LEVEL_ORDER` does not know (a model id, a new level) follow, sorted.

    >>> ordered("ablation", ["zeta", "blank", None, "none"])
    ['none', 'blank', 'zeta']
    """
    import pandas as pd  # here, so that the decode rule's workers need no pandas

    present = set(pd.Series(list(values), dtype=object).dropna().astype(str))
    known = [lv for lv in LEVEL_ORDER.get(factor, ()) if lv in present]
    return known + sorted(present - set(known))


# ----------------------------------------------------------------------------------------
# Names built from the vocabulary
# ----------------------------------------------------------------------------------------
def interaction_name(f1: str, f2: str) -> str:
    """The model term of an interaction of two factors: ``"f1:f2"``."""
    return f"{f1}:{f2}"


def cell_name(**levels: str) -> str:
    """The name of an accuracy cell in ``contrasts.parquet``: ``p[f1=l1,f2=l2]``.

    Factors keep the order they are given in.
    """
    return "p[" + ",".join(f"{f}={lv}" for f, lv in levels.items()) + "]"


def difference_name(minuend: str, subtrahend: str) -> str:
    """The name of a difference of two cells in ``contrasts.parquet``: ``"a - b"``."""
    return f"{minuend} - {subtrahend}"


def structure_pair(component_a: pd.Series, component_b: pd.Series) -> pd.Series:
    """An order-free key of the structures a question names: ``"a|b"``, or ``"a"`` alone.

    Questions naming no structure (plane questions) get ``"none"``.

    >>> import pandas as pd
    >>> structure_pair(pd.Series(["liver", "spleen"]), pd.Series(["spleen", None])).tolist()
    ['liver|spleen', 'spleen']
    """
    import numpy as np
    import pandas as pd

    a = component_a.astype(object).where(component_a.notna(), "").astype(str).to_numpy()
    b = component_b.astype(object).where(component_b.notna(), "").astype(str).to_numpy()
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    key = pd.Series([f"{x}|{y}".strip("|") for x, y in zip(lo, hi, strict=True)],
                    index=component_a.index, dtype=object)
    return key.replace("", "none")
