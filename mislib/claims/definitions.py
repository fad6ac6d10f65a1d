"""The paper's headline claims, as data: what is measured, on which questions, and the
paper's value with where the paper states it (:data:`CLAIMS`, :data:`ARM_CLAIMS`).

The rules that test them are in :mod:`mislib.claims.evaluation`; :mod:`mislib.claims`
describes both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from mislib.vocabulary import cell_name, difference_name

#: The paper: Yu, Hariri et al., "Medical Image Spatial Grounding with Semantic Sampling",
#: arXiv:2603.14579 (v1), and the authors' project page and poster of it.
PAPER = "arXiv:2603.14579v1"
#: Where a factor claim's number was taken from (issue 7 transcribed them; the paper's
#: section or table of each has not been checked against the paper in this repository).
_RESULTS = f"{PAPER}, results (number as transcribed in issue 7; section not checked)"


@dataclass(frozen=True)
class Claim:
    """One headline quantity of the paper measured on question subsets (models pooled).

    Attributes
    ----------
    id : short identifier (letters, digits and underscores; becomes LaTeX macro names).
    claim : which headline claim it belongs to (a short title).
    quantity : what is measured, in words.
    paper : the paper's value, percent (level) or percentage points (difference).
    select : factor levels of the questions measured (``{"family": "plane"}``;
        ``"<baseline>"`` is the profile's no-prompt level).
    minus : for a difference, the levels of the subtracted questions.
    contrast : the matching ``contrasts.parquet`` name of stage 07, if any (a leading ``-``
        turns it round).
    source : where the paper states it.
    """

    id: str
    claim: str
    quantity: str
    paper: float
    select: Mapping[str, str] = field(default_factory=dict)
    minus: Mapping[str, str] | None = None
    contrast: str | None = None
    source: str = _RESULTS

    @property
    def kind(self) -> str:
        return "level" if self.minus is None else "difference"


@dataclass(frozen=True)
class ArmClaim:
    """One quantity of two decoding arms of one model on the same (question, trial) pairs.

    Attributes
    ----------
    id, claim, quantity, source : as in :class:`Claim`.
    paper : the paper's value for its model ``[paper] semsam_claim_model``; NaN when the
        paper gives no number.
    arms : ``(reference, compared)`` arms, e.g. ``("baseline", "semsam")``.
    part : ``"reference"`` or ``"compared"`` (that arm's accuracy, a level) or ``"effect"``
        (compared − reference, a difference).
    sign : the direction the paper implies for an effect (+1, -1; 0: none); it is what is
        tested for a model other than the paper's, or when the paper gives no number.
    """

    id: str
    claim: str
    quantity: str
    paper: float
    source: str
    arms: tuple[str, str]
    part: str
    sign: int = 0

    @property
    def kind(self) -> str:
        return "difference" if self.part == "effect" else "level"


_IMG = {"ablation": "none"}
_SEMSAM = "SemSam against baseline decoding"
_GREEDY = "SemSam against the greedy control (three arms)"
_STD = "Standard view: anatomical beats colloquial"
_STO = "Storage view: colloquial beats anatomical"
_XSL = "Cross-slice relations are harder than in-plane ones"
_DIM = "3D stacks are slightly harder than 2D slices"
_BOX = "A box helps colloquial and hurts anatomical questions"
_TXT = "Text only: anatomical survives, colloquial collapses"
_PAGE = f"{PAPER} project page and poster (headline figure: accuracy against model size)"

#: The decoding claims, evaluated for every model that ran both arms of a pair.
ARM_CLAIMS: tuple[ArmClaim, ...] = (
    ArmClaim("semsam_baseline", _SEMSAM, "accuracy, baseline decoding", 53.4, _PAGE,
             ("baseline", "semsam"), "reference"),
    ArmClaim("semsam_with", _SEMSAM, "accuracy with SemSam", 66.5, _PAGE,
             ("baseline", "semsam"), "compared"),
    ArmClaim("semsam_gain", _SEMSAM, "SemSam − baseline (paired)", 13.06,
             f"{PAPER}, abstract (+13.06 % on Qwen3-VL-32B; SemSam called model-agnostic)",
             ("baseline", "semsam"), "effect", sign=+1),
    ArmClaim("semsam_minus_greedy", _GREEDY, "SemSam − greedy (paired)", math.nan,
             "no number in the paper: it credits the gain to re-scoring, so SemSam should "
             "beat greedy decoding (docs/design.md, the arms)", ("greedy", "semsam"), "effect",
             sign=+1),
    ArmClaim("greedy_minus_baseline", _GREEDY, "greedy − baseline (paired)", math.nan,
             "no claim in the paper (the greedy arm is this project's control)",
             ("baseline", "greedy"), "effect"),
)
#: The factor claims: question subsets of the claims arm, models pooled.
CLAIMS: tuple[Claim, ...] = (
    Claim("std_anatomical", _STD, "standard view, anatomical terms", 69.4,
          {**_IMG, "convention": "standard", "terminology": "anatomical"},
          contrast=cell_name(convention="standard", terminology="anatomical")),
    Claim("std_colloquial", _STD, "standard view, colloquial terms", 57.8,
          {**_IMG, "convention": "standard", "terminology": "colloquial"},
          contrast=cell_name(convention="standard", terminology="colloquial")),
    Claim("std_gap", _STD, "standard view: anatomical − colloquial", 69.4 - 57.8,
          {**_IMG, "convention": "standard", "terminology": "anatomical"},
          {**_IMG, "convention": "standard", "terminology": "colloquial"},
          contrast="-" + difference_name(
              cell_name(convention="standard", terminology="colloquial"),
              cell_name(convention="standard", terminology="anatomical"))),
    Claim("sto_colloquial", _STO, "storage view, colloquial terms", 59.85,
          {**_IMG, "convention": "storage", "terminology": "colloquial"},
          contrast=cell_name(convention="storage", terminology="colloquial")),
    Claim("sto_anatomical", _STO, "storage view, anatomical terms", 50.2,
          {**_IMG, "convention": "storage", "terminology": "anatomical"},
          contrast=cell_name(convention="storage", terminology="anatomical")),
    Claim("sto_gap", _STO, "storage view: colloquial − anatomical", 59.85 - 50.2,
          {**_IMG, "convention": "storage", "terminology": "colloquial"},
          {**_IMG, "convention": "storage", "terminology": "anatomical"},
          contrast=difference_name(cell_name(convention="storage", terminology="colloquial"),
                                   cell_name(convention="storage", terminology="anatomical"))),
    Claim("plane_naming", "Plane naming", "plane-naming questions", 77.6,
          {**_IMG, "family": "plane"}, contrast=cell_name(family="plane")),
    Claim("cross_slice", _XSL, "cross-slice (3D) relations", 68.0,
          {**_IMG, "family": "relation_3d"}, contrast=cell_name(family="relation_3d")),
    Claim("in_plane", _XSL, "in-plane (2D) relations", 71.7,
          {**_IMG, "family": "relation_2d"}, contrast=cell_name(family="relation_2d")),
    Claim("cross_minus_in", _XSL, "cross-slice − in-plane", 68.0 - 71.7,
          {**_IMG, "family": "relation_3d"}, {**_IMG, "family": "relation_2d"},
          contrast=difference_name(cell_name(family="relation_3d"),
                                   cell_name(family="relation_2d"))),
    Claim("dims_3d", _DIM, "3D stacks", 56.9, {**_IMG, "dims": "3d"},
          contrast=cell_name(dims="3d")),
    Claim("dims_2d", _DIM, "2D slices", 58.8, {**_IMG, "dims": "2d"},
          contrast=cell_name(dims="2d")),
    Claim("dims_gap", _DIM, "3D − 2D", 56.9 - 58.8, {**_IMG, "dims": "3d"},
          {**_IMG, "dims": "2d"},
          contrast=difference_name(cell_name(dims="3d"), cell_name(dims="2d"))),
    Claim("nobox_colloquial", _BOX, "no visual prompt, colloquial terms", 45.1,
          {**_IMG, "prompt": "<baseline>", "terminology": "colloquial"},
          contrast=cell_name(prompt="<baseline>", terminology="colloquial")),
    Claim("box_colloquial_gain", _BOX, "box − no prompt, colloquial terms", 8.23,
          {**_IMG, "prompt": "box", "terminology": "colloquial"},
          {**_IMG, "prompt": "<baseline>", "terminology": "colloquial"},
          contrast=difference_name(cell_name(prompt="box", terminology="colloquial"),
                                   cell_name(prompt="<baseline>", terminology="colloquial"))),
    Claim("nobox_anatomical", _BOX, "no visual prompt, anatomical terms", 75.3,
          {**_IMG, "prompt": "<baseline>", "terminology": "anatomical"},
          contrast=cell_name(prompt="<baseline>", terminology="anatomical")),
    Claim("box_anatomical_gain", _BOX, "box − no prompt, anatomical terms", -13.33,
          {**_IMG, "prompt": "box", "terminology": "anatomical"},
          {**_IMG, "prompt": "<baseline>", "terminology": "anatomical"},
          contrast=difference_name(cell_name(prompt="box", terminology="anatomical"),
                                   cell_name(prompt="<baseline>", terminology="anatomical"))),
    Claim("text_anatomical", _TXT, "text only, anatomical terms", 69.3,
          {"ablation": "text_only", "terminology": "anatomical"},
          contrast=cell_name(ablation="text_only", terminology="anatomical")),
    Claim("image_anatomical", _TXT, "with the image, anatomical terms", 74.0,
          {"ablation": "none", "terminology": "anatomical"},
          contrast=cell_name(ablation="none", terminology="anatomical")),
    Claim("text_colloquial", _TXT, "text only, colloquial terms", 40.4,
          {"ablation": "text_only", "terminology": "colloquial"},
          contrast=cell_name(ablation="text_only", terminology="colloquial")),
    Claim("text_minus_image_anatomical", _TXT, "text only − with image, anatomical", 69.3 - 74.0,
          {"ablation": "text_only", "terminology": "anatomical"},
          {"ablation": "none", "terminology": "anatomical"},
          contrast=difference_name(cell_name(ablation="text_only", terminology="anatomical"),
                                   cell_name(ablation="none", terminology="anatomical"))),
)
