"""Stage 03: the factorial MIS-Ground questions, with ground truth from one geometry mapping.

Inputs (``data/README.md``): ``prepared/volumes.parquet`` (source, modality, laterality),
``prepared/components.parquet`` (3D centroids, used by the text-only ablation) and
``benchmark/renders.parquet`` (one row per labelled structure of every render). Outputs:
``benchmark/questions.parquet``, one row per question, ``benchmark/validity.parquet``
(:func:`mislib.validity.validity_report`: every validity rule re-checked from the written
tables, with its violations) and a stage stamp. See ``docs/design.md`` (questions).

Design
------
A **unit** is one rendered slice (``dims="2d"``) or stack (``"3d"``) of a volume; its renders
differ by display convention, visual prompt and background. In each unit the generator picks
up to ``max_pairs_per_unit`` structure pairs (least-used structures first, so components are
balanced as far as the data allow) and, per pair, the **relations** it can ask: every
in-plane world axis (``relation_2d``) or the through-plane axis (``relation_3d``) along which
the two centroids are at least ``margin_mm`` apart. Each relation is asked in
``cells_per_relation`` **cells** (convention × prompt × ablation, where the ablation is
``none`` on the scan, ``blank`` on the empty background, or ``text_only`` without an image;
the visual prompt ``none`` — the scan without marks — is one more prompt level of the scan)
and ``terminologies_per_relation`` terminologies, always least-used first; every
(relation, cell, terminology) gives three questions, one per form: ``open``,
``closed_true`` and ``closed_false`` (the inverted relation, answer ``False``), so True and
False are exactly balanced. Which structure is *A* is chosen so that the open answers of
each factor cell are balanced across the two direction terms. ``plane`` questions (name the
slice direction) are asked in ``plane_cells_per_unit`` renders of every unit.

The knobs that set the count, per unit: pairs × axes × cells × terminologies × 3 forms for
relations, plus plane cells × 3. ``"all"`` for ``cells_per_relation``,
``terminologies_per_relation`` or ``plane_cells_per_unit`` crosses every available level
(the full factorial); the paper profile samples one cell per relation to land near the
paper's 33,864 questions.

Ground truth
------------
Anatomical terms (patient-relative) come from world RAS+ geometry: the visible 2D centroids
on the slice (``visible_x/y/z``) for ``relation_2d``, the 3D centroids for ``relation_3d``
and for text-only questions. On a limb (``laterality`` left/right) the x axis is asked as
medial/lateral. Colloquial terms (screen-relative) come from the renderer's pixel centroids
(``centroid_col/row``) for 2D and from the frame order of
:func:`mislib.geometry.screen_mapping` for 3D; both are checked against the mapping applied
to the world geometry, and a disagreement stops the stage with the renders named
(:class:`GroundTruthMismatch`), since it means the renderer and the truth drifted apart.
Text-only colloquial questions follow the ``standard`` convention.

Answerable by construction
--------------------------
Every question must be answerable from its input, or a low score would blame a factor for
the generator's fault:

- On the **blank** background nothing shows the anatomy, so anatomical questions there state
  the plane and the display convention in patient terms (:func:`display_statement`: "up in
  the image is anterior, left in the image is the patient's right"); screen terms need no
  statement. No ``plane`` question is asked on the blank background.
- **Text-only** questions ask anatomical directions (anatomical knowledge), or screen terms
  under the standard convention, which the text states the same way.
- Questions whose text names two structures whose **names settle the answer** (left/right
  twins asked left/right, upper/lower lobes asked superior/inferior, medial/lateral menisci
  on a limb: :func:`names_decide`) carry ``answer_in_name = True``; with
  ``exclude_answer_in_name`` (the profiles' default) such a pair is asked only on the blank
  background, where letters replace the names.
- A **stack** relation is asked only when the frame order — both the structures' mean frames
  and the midpoints of their frame ranges — agrees with the 3D centroids
  (:func:`frame_order_agrees`).

The generator is cut at its seams: :func:`_units` groups the renders (:class:`View`) into
units, :func:`_choose_pairs` picks pairs, :func:`_relation_cells` the factor cells of each
:class:`Relation`, :func:`_ask_relation` asks it in each picked cell, :func:`_ask_plane` the
plane questions; :class:`Usage` holds the counts that balance them.

References
----------
A structure is named with its letter, ``the liver (B)``, on a prompted scan; by its letter
only, ``structure B``, on the blank background; by its name only, ``the liver``, on the
scan without a visual prompt (prompt ``none``: no letters are drawn) and in text-only
questions.

>>> anatomical_term("R", laterality="right")
'lateral'
>>> colloquial_term("S", screen_mapping("coronal", "storage"))
'left'
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from tqdm import tqdm

from mislib.config import file_digest, stage_params
from mislib.geometry import (
    AXIS_VECTORS,
    CONVENTIONS,
    OPPOSITE,
    PLANES,
    ScreenMapping,
    plane_axes,
    screen_mapping,
    screen_offset,
)
from mislib.paths import (
    COMPONENTS_FILE,
    LETTERS_FILE,
    QUESTIONS_FILE,
    RENDERS_FILE,
    VALIDITY_FILE,
    VOLUMES_FILE,
    project_paths,
)
from mislib.stage import StageRun
from mislib.structures import readable_name as display_name  # the one readable-name map
from mislib.vocabulary import (
    ABLATIONS,
    BACKGROUNDS,
    DIMS,
    FAMILIES,
    FORMS,
    NO_PROMPT,
    PROMPTS,
    QUESTION_FACTORS,
    TERMINOLOGIES,
    ordered,
)

log = logging.getLogger(__name__)

#: The factors notebook 03 counts questions by (``background`` follows from the ablation).
FIGURE_FACTORS = tuple(f for f in QUESTION_FACTORS if f != "background")

RENDER_COLUMNS = ("render_id", "volume_id", "slice_id", "plane", "convention", "dims",
                  "prompt", "background", "image_path", "n_frames", "letter", "component",
                  "centroid_col", "centroid_row", "frame_first", "frame_last",
                  "centroid_frame", "visible_x", "visible_y", "visible_z")
QUESTION_COLUMNS = (
    "question_id", "render_id", "volume_id", "slice_id", "source", "modality", "plane", "dims",
    "convention", "prompt", "background", "terminology", "form", "family", "ablation",
    "component_a", "component_b", "name_a", "name_b", "letter_a", "letter_b", "axis",
    "direction", "separation_mm", "text", "answer", "choices", "image_path", "n_frames",
    "answer_in_name", "relation_id")

#: The positive world code of each world axis (0=x, 1=y, 2=z) and the axis' pair name.
AXIS_CODES = ("R", "A", "S")
AXIS_NAMES = ("R/L", "A/P", "S/I")
ANATOMICAL_TERMS = {"R": "right", "L": "left", "A": "anterior", "P": "posterior",
                    "S": "superior", "I": "inferior"}
OPPOSITE_TERM = {"superior": "inferior", "inferior": "superior", "anterior": "posterior",
                 "posterior": "anterior", "left": "right", "right": "left",
                 "medial": "lateral", "lateral": "medial", "above": "below", "below": "above",
                 "earlier": "later", "later": "earlier"}
#: Options of an open relation question, in a fixed order per term pair.
TERM_PAIRS = (("superior", "inferior"), ("anterior", "posterior"), ("left", "right"),
              ("medial", "lateral"), ("above", "below"), ("earlier", "later"))
#: Prompt wording of a scan, by the start of its source name (phantoms included).
SOURCE_DESCRIPTIONS = {"brain": "brain MRI", "totalsegmentator": "torso CT",
                       "torso_mr": "torso MRI", "torso": "torso CT", "knee": "knee MRI"}


class GroundTruthMismatch(ValueError):
    """The renderer's pixel centroids or frame ranges disagree with the screen mapping."""


# ----------------------------------------------------------------------------------------
# Direction terms from the one (plane, convention) mapping
# ----------------------------------------------------------------------------------------

def anatomical_term(code: str, laterality: str | None = None) -> str:
    """The patient-relative term of a world direction code (``"R"`` → ``"right"``).

    On a limb (``laterality`` ``"left"``/``"right"``) the x axis is medial/lateral: toward
    the patient's midline is medial, so on a right limb ``"L"`` is medial.
    """
    if code not in ANATOMICAL_TERMS:
        raise ValueError(f"unknown axis code {code!r}; expected one of {sorted(ANATOMICAL_TERMS)}")
    if code in ("R", "L") and laterality in ("left", "right"):
        side = "R" if laterality == "right" else "L"
        return "lateral" if code == side else "medial"
    return ANATOMICAL_TERMS[code]


def screen_axis(code: str, mapping: ScreenMapping) -> tuple[int, int]:
    """Where a world direction lands on screen: (screen axis, sign).

    Screen axis 0 = image-right, 1 = image-down, 2 = increasing frame index (the order of
    :func:`mislib.geometry.screen_offset`); sign +1 when ``code`` points along it.
    """
    offset = screen_offset(AXIS_VECTORS[code], mapping)
    axis = int(np.argmax(np.abs(offset)))
    return axis, int(np.sign(offset[axis]))


def colloquial_term(code: str, mapping: ScreenMapping) -> str:
    """The screen-relative term of a world direction under ``mapping``.

    >>> colloquial_term("R", screen_mapping("axial", "standard"))  # patient right on image left
    'left'
    >>> colloquial_term("S", screen_mapping("axial", "standard"))  # frames run I -> S
    'later'
    """
    axis, sign = screen_axis(code, mapping)
    return (("left", "right"), ("above", "below"), ("earlier", "later"))[axis][sign > 0]


def stable_hash(*parts: Any) -> int:
    """A 64-bit integer hash of ``parts`` that is the same in every process and run."""
    # repr of tuples/lists of str, int, float and None is stable across runs and platforms
    # (unlike hash(), which is salted per process) and faster than JSON.
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")


# ----------------------------------------------------------------------------------------
# Templates (wording written for this project)
# ----------------------------------------------------------------------------------------

_OPEN_INSTRUCTION = "End your reply with a line 'Answer: <option>' naming one option."
_CLOSED_INSTRUCTION = "End your reply with a line 'Answer: True' or 'Answer: False'."

_RELATION_OPEN = (
    "{context} Where does {A} lie relative to {B}? {frame} Options: {options}.\n{instr}",
    "{context} {frame} Relative to {B}, is {A} {opt0} or {opt1}? Options: {options}.\n{instr}",
    "{context} Describe the position of {A} with respect to {B} using one of these "
    "options: {options}. {frame}\n{instr}",
)
_RELATION_CLOSED = (
    "{context} Is the following statement true or false? {statement}. {frame}\n{instr}",
    "{context} {frame} Statement: {statement}. True or False?\n{instr}",
    "{context} Decide whether this is correct: {statement}. {frame}\n{instr}",
)
_PLANE_OPEN = (
    "{context} In which anatomical plane was this {thing} taken? Options: {options}.\n{instr}",
    "{context} Name the slice orientation of this {thing}. Options: {options}.\n{instr}",
    "{context} Which plane does this {thing} show: {options}?\n{instr}",
)
_PLANE_CLOSED = (
    "{context} Is the following statement true or false? This {thing} is {article} {plane} "
    "view.\n{instr}",
    "{context} Statement: the {thing} shows the {plane} plane. True or False?\n{instr}",
    "{context} Decide whether this is correct: this is {article} {plane} {thing}.\n{instr}",
)


def _statement(term: str, terminology: str, a: str, b: str) -> str:
    """``a`` relative to ``b`` as a sentence asserting ``term``."""
    if terminology == "anatomical":
        if term in ("left", "right"):
            return f"{a} lies to the patient's {term} of {b}"
        return f"{a} is {term} to {b}"
    if term in ("above", "below"):
        return f"{a} appears {term} {b} in the image"
    if term in ("left", "right"):
        return f"{a} appears to the {term} of {b} in the image"
    article = "an" if term == "earlier" else "a"
    return f"{a} is centred in {article} {term} frame than {b}"


def _frame_hint(terminology: str, dims: str) -> str:
    if terminology == "anatomical":
        return "Use the patient's anatomical directions."
    if dims == "3d":
        return "Answer by frame order in the video."
    return "Answer as the image appears on the screen."


def _volume_description(source: str, modality: str, laterality: str | None) -> str:
    """What the scan shows, for the prompt: ``brain MRI``, ``torso CT``, ``right-knee MRI``.

    Matched on the source name's stem, so the demo phantoms (``torso_ct_phantom``,
    ``knee_mri_phantom``) read like the datasets they imitate.
    """
    stem = str(source).lower()
    side = f"{laterality}-" if laterality in ("left", "right") else ""
    desc = next((d for key, d in SOURCE_DESCRIPTIONS.items() if stem.startswith(key)),
                f"{modality} scan")
    if side:  # medial/lateral are only answerable when the limb's side is known
        desc = f"{side}knee MRI" if stem.startswith("knee") else f"{side}limb {desc}"
    return desc


def _article(word: str) -> str:
    """``a`` or ``an`` by sound: acronyms such as MRI (em-) or X-ray (ex-) take ``an``."""
    if word[:2].isupper():
        return "an" if word[0] in "AEFHILMNORSX" else "a"
    return "an" if word[:1].lower() in "aeiou" else "a"


def display_statement(plane: str, convention: str, dims: str,
                      laterality: str | None = None) -> str:
    """The clause that states a view's display convention in patient terms.

    With it a reader can turn screen positions into anatomical directions without seeing
    the anatomy (the blank background), and anatomy into screen positions without seeing an
    image (text-only colloquial questions). Terms follow :func:`anatomical_term`
    (medial/lateral on a limb); the frame order is stated for a 3D stack. Callers put the
    plane before it ("an axial slice ... shown in ...").

    >>> display_statement("axial", "standard", "2d")
    "in the standard display convention: up in the image is anterior, left in the image is the patient's right"
    """
    m = screen_mapping(plane, convention)

    def patient(code: str) -> str:
        term = anatomical_term(code, laterality)
        return f"the patient's {term}" if term in ("left", "right") else term

    text = (f"in the {convention} display convention: up in the image is {patient(m.up)}, "
            f"left in the image is {patient(m.left)}")
    if dims == "3d":
        text += f", and frames run from {patient(OPPOSITE[m.frame])} to {patient(m.frame)}"
    return text


def _context(ablation: str, dims: str, desc: str, plane: str, terminology: str | None,
             prompt: str | None = None, convention: str | None = None,
             laterality: str | None = None) -> str:
    """The opening sentences of a question: what the input shows.

    On the blank background nothing shows the anatomy, so anatomical questions there state
    the plane and the display convention (:func:`display_statement`); text-only colloquial
    questions state the standard convention they follow.
    """
    if ablation == "text_only":
        shape = "series of slices" if dims == "3d" else "slice"
        text = f"Consider {_article(plane)} {plane} {shape} of {_article(desc)} {desc}"
        if terminology == "colloquial":
            view = "a video" if dims == "3d" else "an image"
            text += (f", shown as {view} "
                     + display_statement(plane, "standard", dims, laterality))
        return text + "."
    if ablation == "blank":
        if dims == "3d":
            text = ("The video shows labelled structures, slice by slice, from "
                    f"{_article(desc)} {desc} on an empty background.")
        else:
            text = (f"The image shows labelled structures from {_article(desc)} {desc} on an "
                    "empty background.")
        if terminology == "anatomical":
            shape = "series of slices" if dims == "3d" else "slice"
            text += (f" It is {_article(plane)} {plane} {shape} shown "
                     + display_statement(plane, convention, dims, laterality) + ".")
        return text
    if prompt == NO_PROMPT:  # nothing is marked: the scan alone
        if dims == "3d":
            return f"The video shows consecutive slices of {_article(desc)} {desc}."
        return f"The image is a slice of {_article(desc)} {desc}."
    if dims == "3d":
        return (f"The video shows consecutive slices of {_article(desc)} {desc}; structures "
                "are labelled.")
    return f"The image is a slice of {_article(desc)} {desc} with labelled structures."


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------

def _require(df: pd.DataFrame, columns: Iterable[str], name: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{name}: missing columns {missing}")


def _check_values(df: pd.DataFrame, column: str, allowed: Sequence[str], name: str) -> None:
    bad = sorted({str(v) for v in df[column].dropna().unique()} - set(allowed))
    if bad:
        raise ValueError(f"{name}: column {column!r} has unknown values {bad}; "
                         f"expected {list(allowed)}")


class Label(NamedTuple):
    """One structure on one render, as stage 02 drew it (a ``renders.parquet`` row).

    ``col, row``: pixel centroid; ``frame_first, frame_last, centroid_frame``: its frames in
    a 3D stack (None in 2D); ``xyz`` (3,): world centroid (mm) of what is visible.
    """

    letter: str | None
    col: float
    row: float
    frame_first: float | None
    frame_last: float | None
    centroid_frame: float | None
    xyz: np.ndarray


class UnitKey(NamedTuple):
    """A slice (``dims="2d"``) or stack (``"3d"``) of a volume: the renders that differ only
    by convention, prompt and background."""

    volume_id: str
    dims: str
    plane: str
    slice_id: str


@dataclass(frozen=True)
class View:
    """One render as the generator sees it: its factor levels and its labelled structures."""

    render_id: str
    unit: UnitKey
    plane: str
    convention: str
    dims: str
    prompt: str
    ablation: str  # "none" on the scan, "blank" on the empty background
    image_path: str
    n_frames: int
    labels: dict[str, Label]


class Cell(NamedTuple):
    """A factor cell a relation is asked in; text-only cells have no convention or prompt."""

    ablation: str
    convention: str | None
    prompt: str | None


class Relation(NamedTuple):
    """Two structures of a unit and the world axis (0=x, 1=y, 2=z) they are compared on."""

    unit: UnitKey
    c1: str
    c2: str
    axis: int

    def key(self) -> tuple:
        """Plain tuples, whose repr (and so :func:`stable_hash`) is the same in every run."""
        return (tuple(self.unit), self.c1, self.c2, self.axis)


@dataclass(frozen=True)
class Unit:
    """A unit's renders and what the wording needs about its volume."""

    key: UnitKey
    source: str
    modality: str
    laterality: str | None
    views: tuple[View, ...]

    @property
    def family(self) -> str:
        return "relation_3d" if self.key.dims == "3d" else "relation_2d"

    @property
    def axes(self) -> tuple[int, ...]:
        """World axes asked: the through-plane axis of a stack, the in-plane ones of a slice."""
        fixed, inplane = plane_axes(self.key.plane)
        return (fixed,) if self.key.dims == "3d" else inplane

    @property
    def description(self) -> str:
        return _volume_description(self.source, self.modality, self.laterality)

    @property
    def reference(self) -> View:
        """The standard view on the scan: its visible areas are the intended ones."""
        return min(self.views, key=lambda r: (r.convention != "standard", r.ablation != "none",
                                              r.render_id))

    def base(self) -> dict[str, Any]:
        """The question columns every question of this unit shares."""
        return {"volume_id": self.key.volume_id, "slice_id": self.key.slice_id or None,
                "source": self.source, "modality": self.modality, "plane": self.key.plane,
                "dims": self.key.dims}


@dataclass(frozen=True)
class QuestionParams:
    """The ``[questions]`` stage parameters, validated (see ``mislib/profiles/demo.toml``)."""

    margin: float
    seed: Any
    families: tuple[str, ...]
    forms: tuple[str, ...]
    terminologies: tuple[str, ...]
    ablations: tuple[str, ...]
    max_pairs: int | None
    n_cells: int | None
    n_terms: int | None
    n_plane_cells: int | None
    exclude_answer_in_name: bool

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any]) -> QuestionParams:
        for key, allowed in (("families", FAMILIES), ("forms", FORMS),
                             ("terminologies", TERMINOLOGIES), ("ablations", ABLATIONS)):
            bad = sorted(set(params[key]) - set(allowed))
            if bad:
                raise ValueError(f"[questions] {key}: unknown values {bad}; "
                                 f"expected {list(allowed)}")
        exclude = params.get("exclude_answer_in_name", True)
        if not isinstance(exclude, bool):
            raise ValueError(f"[questions] exclude_answer_in_name must be true or false, "
                             f"got {exclude!r}")
        return cls(
            margin=float(params["margin_mm"]), seed=params.get("seed", 0),
            families=tuple(params["families"]), forms=tuple(params["forms"]),
            terminologies=tuple(params["terminologies"]), ablations=tuple(params["ablations"]),
            max_pairs=_option_spec(params["max_pairs_per_unit"], "max_pairs_per_unit"),
            n_cells=_option_spec(params["cells_per_relation"], "cells_per_relation"),
            n_terms=_option_spec(params["terminologies_per_relation"],
                                 "terminologies_per_relation"),
            n_plane_cells=_option_spec(params["plane_cells_per_unit"], "plane_cells_per_unit"),
            exclude_answer_in_name=exclude)


@dataclass
class Usage:
    """What has been asked so far, for least-used-first balancing across the benchmark."""

    components: Counter = field(default_factory=Counter)
    cells: Counter = field(default_factory=Counter)
    terms: Counter = field(default_factory=Counter)
    answers: Counter = field(default_factory=Counter)
    false_planes: Counter = field(default_factory=Counter)
    text_only_done: set = field(default_factory=set)


def _index_renders(renders: pd.DataFrame) -> dict[str, View]:
    """``renders.parquet`` as views by render id, after checking its columns and values."""
    _require(renders, RENDER_COLUMNS, RENDERS_FILE)
    _check_values(renders, "plane", PLANES, RENDERS_FILE)
    _check_values(renders, "convention", CONVENTIONS, RENDERS_FILE)
    _check_values(renders, "dims", DIMS, RENDERS_FILE)
    _check_values(renders, "background", BACKGROUNDS, RENDERS_FILE)
    _check_values(renders, "prompt", PROMPTS, RENDERS_FILE)
    bare = renders["prompt"] == NO_PROMPT
    for bad, what in ((bare & (renders["background"] == "blank"),
                       "prompt 'none' on a blank background (an empty image)"),
                      (~bare & renders["letter"].isna(), "no letter on a prompted render")):
        if bad.any():
            ids = renders.loc[bad, "render_id"].astype(str).unique()[:5].tolist()
            raise ValueError(f"renders.parquet: {what} in renders {ids}")
    xyz = renders[["visible_x", "visible_y", "visible_z"]]
    if xyz.isna().any(axis=None):
        bad = renders.loc[xyz.isna().any(axis=1), "render_id"].astype(str).unique()[:5]
        raise ValueError(f"renders.parquet: missing visible_x/y/z in renders {list(bad)}")
    out: dict[str, View] = {}
    r = renders.sort_values(["render_id", "component"], kind="stable")
    # Plain Python lists: iterating Arrow-backed columns row by row is several times slower.
    c = {k: r[k].to_numpy(dtype=object).tolist() for k in RENDER_COLUMNS if k not in
         ("visible_x", "visible_y", "visible_z", "centroid_col", "centroid_row")}
    xyz = r[["visible_x", "visible_y", "visible_z"]].to_numpy(float)
    col = r["centroid_col"].to_numpy(float)
    row_px = r["centroid_row"].to_numpy(float)

    def opt(value, kind):
        return None if value is None or pd.isna(value) else kind(value)

    for i, rid in enumerate(c["render_id"]):
        rid = str(rid)
        view = out.get(rid)
        if view is None:
            unit = UnitKey(str(c["volume_id"][i]), str(c["dims"][i]), str(c["plane"][i]),
                           opt(c["slice_id"][i], str) or "")
            view = View(rid, unit, str(c["plane"][i]), str(c["convention"][i]),
                        str(c["dims"][i]), str(c["prompt"][i]),
                        "blank" if c["background"][i] == "blank" else "none",
                        str(c["image_path"][i]), int(c["n_frames"][i]), {})
            out[rid] = view
        comp = str(c["component"][i])
        if comp in view.labels:
            raise ValueError(f"renders.parquet: render {rid} labels {comp!r} twice")
        view.labels[comp] = Label(opt(c["letter"][i], str), col[i], row_px[i],
                                  opt(c["frame_first"][i], float), opt(c["frame_last"][i], float),
                                  opt(c["centroid_frame"][i], float), xyz[i])
    return out


def _option_spec(value: Any, name: str) -> int | None:
    """``"all"`` → None (every level), else a count >= 0."""
    if isinstance(value, str):
        if value != "all":
            raise ValueError(f"[questions] {name} must be an integer or 'all', got {value!r}")
        return None
    if value is None or int(value) < 0:
        raise ValueError(f"[questions] {name} must be >= 0 or 'all', got {value!r}")
    return int(value)


def _pick_least_used(options: Sequence, usage: Mapping, k: int | None, seed: Any) -> list:
    """Up to ``k`` options (all when ``k`` is None), least used first, ties by a stable hash.

    ``usage`` maps an option to a sortable count (a number, or a tuple of counts compared
    in order).
    """
    if k is None or k >= len(options):
        return list(options)
    chosen: list = []
    for level in sorted({usage[o] for o in options}):
        tier = [o for o in options if usage[o] == level]
        if len(chosen) + len(tier) > k:  # hash only where the counts tie
            tier.sort(key=lambda o: stable_hash(seed, o))
            return chosen + tier[:k - len(chosen)]
        chosen += tier
    return chosen


# ----------------------------------------------------------------------------------------
# Names that give the answer away
# ----------------------------------------------------------------------------------------

#: Words of a structure's name that point along a world axis (0=x, 1=y, 2=z), as
#: (words toward the positive code, words toward the negative one). On a limb the x axis is
#: asked as medial/lateral, so those words count there instead of left/right.
NAME_DIRECTION_WORDS = {
    0: ({"right"}, {"left"}),
    1: ({"anterior", "front", "ventral"}, {"posterior", "back", "dorsal"}),
    2: ({"superior", "upper", "cranial"}, {"inferior", "lower", "caudal"}),
}
LIMB_DIRECTION_WORDS = ({"medial"}, {"lateral"})


def names_decide(name_a: str, name_b: str, axis: int, laterality: str | None = None) -> bool:
    """Whether two readable names alone settle where A lies from B along ``axis``.

    True when the names carry opposite direction words for that axis ("left kidney" and
    "right kidney" on x; "upper lobe" and "lower lobe" on z; "medial meniscus" and "lateral
    meniscus" on a limb's x): a reader can answer from the names, whatever the image shows,
    and under a known display convention in screen terms too.

    >>> names_decide("left kidney", "right kidney", 0)
    True
    >>> names_decide("left kidney", "liver", 0)
    False
    """
    words = NAME_DIRECTION_WORDS[axis]
    if axis == 0 and laterality in ("left", "right"):
        words = LIMB_DIRECTION_WORDS
    a = set(re.findall(r"[a-z]+", str(name_a).lower()))
    b = set(re.findall(r"[a-z]+", str(name_b).lower()))
    pos, neg = words
    return bool((a & pos and b & neg and not a & neg and not b & pos)
                or (a & neg and b & pos and not a & pos and not b & neg))


def names_shown(ablation: str) -> bool:
    """Whether a question's text names its structures (the blank background uses letters)."""
    return ablation != "blank"


# ----------------------------------------------------------------------------------------
# The generator
# ----------------------------------------------------------------------------------------

def build_questions(renders: pd.DataFrame, volumes: pd.DataFrame, components: pd.DataFrame,
                    params: Mapping[str, Any], progress: bool = True) -> pd.DataFrame:
    """All questions for the given stage-01/02 tables (pure: no files are read or written).

    Parameters
    ----------
    renders : DataFrame
        ``renders.parquet`` (one row per render and label).
    volumes : DataFrame
        ``volumes.parquet`` (``volume_id, source, modality, laterality``).
    components : DataFrame
        ``components.parquet`` (``volume_id, component, centroid_x/y/z`` in mm); the 3D
        centroids give the truth of text-only questions.
    params : mapping
        The ``[questions]`` stage parameters (see ``mislib/profiles/demo.toml``).

    Returns
    -------
    DataFrame with the columns of :data:`QUESTION_COLUMNS`, sorted by volume, render and
    question id; the same inputs and parameters give the same table.
    """
    p = QuestionParams.from_mapping(params)
    _require(volumes, ("volume_id", "source", "modality", "laterality"), VOLUMES_FILE)
    _require(components, ("volume_id", "component", "centroid_x", "centroid_y", "centroid_z"),
             COMPONENTS_FILE)
    centroid3d = {(str(c.volume_id), str(c.component)):
                  np.array([c.centroid_x, c.centroid_y, c.centroid_z], float)
                  for c in components.itertuples(index=False)}
    units = _units(_index_renders(renders), volumes)
    usage = Usage()
    rows: list[dict] = []
    mismatches: list[str] = []
    for unit in tqdm(units, desc="questions", unit="unit", disable=not progress):
        if unit.family in p.families:
            for (c1, c2), axes in _choose_pairs(unit, p, usage):
                for axis in axes:
                    rows += _ask_relation(Relation(unit.key, c1, c2, axis), unit, p, usage,
                                          centroid3d, mismatches)
        if "plane" in p.families and p.n_plane_cells != 0:
            rows += _ask_plane(unit, p, usage)
    if mismatches:
        shown = "\n  ".join(mismatches[:8])
        raise GroundTruthMismatch(
            f"renders.parquet: {len(mismatches)} colloquial truths from the renderer's "
            f"centroids disagree with the screen mapping, e.g.\n  {shown}")
    return _finish([r for r in rows if r["form"] in p.forms])


def _units(index: Mapping[str, View], volumes: pd.DataFrame) -> list[Unit]:
    """The views grouped by unit (slice or stack), sorted, with their volume's description."""
    info = {str(v.volume_id): (str(v.source), str(v.modality),
                               None if pd.isna(v.laterality) else str(v.laterality))
            for v in volumes.itertuples(index=False)}
    unknown = sorted({v.unit.volume_id for v in index.values()} - set(info))
    if unknown:
        raise ValueError(f"renders.parquet: volumes {unknown[:5]} are not in volumes.parquet")
    grouped: dict[UnitKey, list[View]] = defaultdict(list)
    for view in index.values():
        grouped[view.unit].append(view)
    return [Unit(key, *info[key.volume_id],
                 tuple(sorted(grouped[key], key=lambda v: v.render_id)))
            for key in sorted(grouped)]


def _choose_pairs(unit: Unit, p: QuestionParams, usage: Usage) -> list[tuple[tuple[str, str],
                                                                             list[int]]]:
    """Up to ``max_pairs`` structure pairs of a unit with the axes each can be asked on.

    A pair qualifies when both structures are labelled together on some view and their
    centroids (on the reference view, else on a view showing both) are at least the margin
    apart along an axis. Pairs of the least-used structures go first (ties by a stable
    hash), so structures are balanced across the benchmark.
    """
    comps = sorted({c for v in unit.views for c in v.labels})
    together = defaultdict(set)
    for v in unit.views:
        for c in v.labels:
            together[c].update(v.labels)
    ref = unit.reference
    candidates: list[tuple[tuple[str, str], list[int]]] = []
    for i, c1 in enumerate(comps):
        for c2 in comps[i + 1:]:
            if c2 not in together[c1]:
                continue
            view = ref if c1 in ref.labels and c2 in ref.labels else next(
                v for v in unit.views if c1 in v.labels and c2 in v.labels)
            p1, p2 = view.labels[c1].xyz, view.labels[c2].xyz
            ok = [a for a in unit.axes if abs(p1[a] - p2[a]) >= p.margin]
            if ok:
                candidates.append(((c1, c2), ok))
    chosen = []
    remaining = dict(candidates)
    while remaining and (p.max_pairs is None or len(chosen) < p.max_pairs):
        load = {pair: (usage.components[pair[0]] + usage.components[pair[1]],
                       max(usage.components[pair[0]], usage.components[pair[1]]))
                for pair in remaining}
        pair = _pick_least_used(list(remaining), load, 1, (p.seed, tuple(unit.key)))[0]
        chosen.append((pair, remaining.pop(pair)))
        usage.components.update(pair)
    return chosen


def _relation_cells(rel: Relation, unit: Unit, p: QuestionParams, usage: Usage,
                    centroid3d: Mapping) -> dict[Cell, View | None]:
    """The factor cells a relation can be asked in: the first view of each (ablation,
    convention, prompt) labelling both structures, plus a text-only cell (value None) when
    the 3D centroids clear the margin and the relation was not asked text-only before.

    With ``exclude_answer_in_name``, a pair whose names settle the answer keeps only the
    cells whose text does not name them (the blank background).
    """
    decided = names_decide(display_name(rel.c1), display_name(rel.c2), rel.axis,
                           unit.laterality)
    cells: dict[Cell, View | None] = {}
    for v in unit.views:
        if v.ablation in p.ablations and rel.c1 in v.labels and rel.c2 in v.labels:
            cells.setdefault(Cell(v.ablation, v.convention, v.prompt), v)
    if "text_only" in p.ablations:
        key = (unit.key.volume_id, unit.family, unit.key.plane, rel.c1, rel.c2, rel.axis)
        g1 = centroid3d.get((unit.key.volume_id, rel.c1))
        g2 = centroid3d.get((unit.key.volume_id, rel.c2))
        if (key not in usage.text_only_done and g1 is not None and g2 is not None
                and abs(g1[rel.axis] - g2[rel.axis]) >= p.margin):
            cells[Cell("text_only", None, None)] = None
    if decided and p.exclude_answer_in_name:
        cells = {c: v for c, v in cells.items() if not names_shown(c.ablation)}
    return cells


def frame_order_agrees(view: View, c1: str, c2: str, code: str, mapping: ScreenMapping) -> bool:
    """Whether a stack's frames show ``c1`` toward world direction ``code`` from ``c2``.

    Both the structures' area-weighted mean frames and the midpoints of their frame ranges
    must lie in the frame direction that ``code`` maps to; a curved or oblique structure
    whose 3D centroid says one thing while its frames say another is not asked about.
    """
    axis, sign = screen_axis(code, mapping)
    if axis != 2:
        return False
    l1, l2 = view.labels[c1], view.labels[c2]
    if None in (l1.centroid_frame, l2.centroid_frame, l1.frame_first, l2.frame_first):
        return False
    mid1 = (l1.frame_first + l1.frame_last) / 2.0
    mid2 = (l2.frame_first + l2.frame_last) / 2.0
    return (np.sign(l1.centroid_frame - l2.centroid_frame) == sign
            and np.sign(mid1 - mid2) == sign)


def _ask_relation(rel: Relation, unit: Unit, p: QuestionParams, usage: Usage,
                  centroid3d: Mapping, mismatches: list[str]) -> list[dict]:
    """The questions of one relation: in each picked cell and terminology, three forms."""
    family = unit.family
    cells = _relation_cells(rel, unit, p, usage, centroid3d)
    # plain tuples: the tie-breaking hash reads their repr
    keys = sorted((tuple(k) for k in cells), key=lambda k: tuple(str(x) for x in k))
    picked = _pick_least_used(keys, Counter({k: usage.cells[(family, k)] for k in keys}),
                              p.n_cells, (p.seed, rel.key()))
    rows: list[dict] = []
    for cell in map(Cell._make, picked):
        usage.cells[(family, cell)] += 1
        view = cells[cell]
        if view is None:
            usage.text_only_done.add((unit.key.volume_id, family, unit.key.plane, rel.c1,
                                      rel.c2, rel.axis))
        found = _cell_direction(rel, unit, cell, view, centroid3d, p.margin)
        if found is not None:
            rows += _ask_in_cell(rel, unit, cell, view, *found, p, usage, mismatches)
    return rows


def _cell_direction(rel: Relation, unit: Unit, cell: Cell, view: View | None,
                    centroid3d: Mapping, margin: float
                    ) -> tuple[str, float, ScreenMapping] | None:
    """Where ``c1`` lies from ``c2`` in one cell: (world code, separation mm, mapping).

    The centroids are the view's visible ones (text-only: the 3D ones, under the standard
    mapping). None when they are closer than the margin along the axis, or when a stack's
    frames order the two against their 3D centroids.
    """
    if view is None:
        g1 = centroid3d[(unit.key.volume_id, rel.c1)]
        g2 = centroid3d[(unit.key.volume_id, rel.c2)]
        mapping = screen_mapping(unit.key.plane, "standard")
    else:
        g1, g2 = view.labels[rel.c1].xyz, view.labels[rel.c2].xyz
        mapping = screen_mapping(unit.key.plane, cell.convention)
    delta = float(g1[rel.axis] - g2[rel.axis])
    if abs(delta) < margin:
        return None  # this view's visible parts are closer than the margin
    code = AXIS_CODES[rel.axis] if delta > 0 else OPPOSITE[AXIS_CODES[rel.axis]]
    if (view is not None and unit.key.dims == "3d"
            and not frame_order_agrees(view, rel.c1, rel.c2, code, mapping)):
        return None
    return code, abs(delta), mapping


def _ask_in_cell(rel: Relation, unit: Unit, cell: Cell, view: View | None, code: str,
                 separation: float, mapping: ScreenMapping, p: QuestionParams, usage: Usage,
                 mismatches: list[str]) -> list[dict]:
    """The three forms of a relation in one cell, per picked terminology (least used first).

    A colloquial truth is also checked against where the renderer drew the two structures;
    a disagreement goes to ``mismatches`` (the stage then stops, naming the renders).
    """
    family = unit.family
    terms = _pick_least_used(
        [t for t in TERMINOLOGIES if t in p.terminologies],
        {t: (usage.terms[(family, cell, t)], usage.terms[(family, t)]) for t in TERMINOLOGIES},
        p.n_terms, (p.seed, rel.key(), tuple(cell)))
    rows: list[dict] = []
    for terminology in terms:
        usage.terms[(family, cell, terminology)] += 1
        usage.terms[(family, terminology)] += 1
        if terminology == "anatomical":
            t1 = anatomical_term(code, unit.laterality)  # c1 relative to c2
        else:
            t1 = colloquial_term(code, mapping)
            err = view and _check_screen(view, rel.c1, rel.c2, code, mapping, t1)
            if err:
                mismatches.append(err)
                continue
        a, b, truth = _orient(rel, cell, terminology, t1, family, p.seed, usage)
        base = _relation_base(unit, view, cell, terminology, a, b, rel.axis, separation,
                              rel.key())
        rows += _rows(base, family, _relation_forms(base, terminology, truth, _term_pair(truth),
                                                    unit, p.seed))
    return rows


def _term_pair(term: str) -> tuple[str, str]:
    return next(pair for pair in TERM_PAIRS if term in pair)


def _orient(rel: Relation, cell: Cell, terminology: str, t1: str, family: str, seed: Any,
            usage: Usage) -> tuple[str, str, str]:
    """(A, B, truth): which structure is called A, so that the open answers of each factor
    cell stay balanced across the two direction terms (ties by a stable hash)."""
    key = (family, terminology, cell.ablation, cell.convention, _term_pair(t1))
    t2 = OPPOSITE_TERM[t1]
    if usage.answers[(key, t1)] != usage.answers[(key, t2)]:
        a_first = usage.answers[(key, t1)] < usage.answers[(key, t2)]
    else:
        a_first = stable_hash(seed, rel.key(), tuple(cell), terminology) % 2 == 0
    a, b, truth = (rel.c1, rel.c2, t1) if a_first else (rel.c2, rel.c1, t2)
    usage.answers[(key, truth)] += 1
    return a, b, truth


def _ask_plane(unit: Unit, p: QuestionParams, usage: Usage) -> list[dict]:
    """``plane`` questions on ``n_plane_cells`` renders of a unit, least-used cells first.

    Never on the blank background: a box or a dot on an empty canvas cannot show the plane.
    """
    options = [v for v in unit.views if v.ablation in p.ablations and v.ablation != "blank"]
    keys = [(v.ablation, v.convention, v.prompt, v.render_id) for v in options]
    load = Counter({k: usage.cells[("plane", k[:3])] for k in keys})
    by_id = {v.render_id: v for v in options}
    plane = unit.key.plane
    rows: list[dict] = []
    for key in _pick_least_used(keys, load, p.n_plane_cells, (p.seed, tuple(unit.key),
                                                               "plane")):
        usage.cells[("plane", key[:3])] += 1
        view = by_id[key[3]]
        others = [q for q in PLANES if q != plane]
        wrong = min(others, key=lambda q: (usage.false_planes[(plane, q)],
                                                   stable_hash(p.seed, view.render_id, q)))
        usage.false_planes[(plane, wrong)] += 1
        base = {**unit.base(), "render_id": view.render_id, "convention": view.convention,
                "prompt": view.prompt, "background": _background(view.ablation),
                "ablation": view.ablation, "terminology": None, "component_a": None,
                "component_b": None, "name_a": None, "name_b": None, "letter_a": None,
                "letter_b": None, "axis": None, "separation_mm": float("nan"),
                "image_path": view.image_path, "n_frames": view.n_frames,
                "answer_in_name": False, "relation_id": _short_id("p", view.render_id)}
        rows += _rows(base, "plane", _plane_forms(base, plane, wrong, unit.description,
                                                  p.seed))
    return rows


def _background(ablation: str) -> str:
    return "blank" if ablation == "blank" else "scan"


def _rows(base: dict, family: str, forms: list[tuple]) -> list[dict]:
    return [{**base, "family": family, "form": form, "direction": direction, "answer": answer,
             "choices": choices, "text": text}
            for form, direction, answer, choices, text in forms]


def _short_id(prefix: str, *parts: Any) -> str:
    return f"{prefix}{stable_hash(*parts):016x}"


def _check_screen(view: View, c1: str, c2: str, code: str, mapping: ScreenMapping,
                  expected: str) -> str | None:
    """Check the renderer's pixel centroids (2D) or frame ranges (3D) against the mapping.

    Returns a message on disagreement, else None. For 2D the pixel centroids *are* the
    colloquial truth, so any sign disagreement is reported; for 3D only frame ranges that do
    not overlap can contradict the order.
    """
    axis, sign = screen_axis(code, mapping)
    l1, l2 = view.labels[c1], view.labels[c2]
    if view.dims == "2d":
        if axis == 2:
            return f"{view.render_id}: in-plane axis maps to the frame order"
        d = (l1.col - l2.col) if axis == 0 else (l1.row - l2.row)
        if np.sign(d) != sign:
            what = ("centroid_col", "centroid_row")[axis]
            return (f"{view.render_id}: {c1} vs {c2}: {what} difference {d:+.1f} px, "
                    f"mapping says {expected}")
        return None
    if None in (l1.frame_first, l1.frame_last, l2.frame_first, l2.frame_last):
        return None
    if (sign > 0 and l1.frame_last < l2.frame_first
            or sign < 0 and l1.frame_first > l2.frame_last):
        return (f"{view.render_id}: {c1} frames {l1.frame_first}-{l1.frame_last}, {c2} frames "
                f"{l2.frame_first}-{l2.frame_last}, mapping says {expected}")
    return None


def _relation_base(unit: Unit, view: View | None, cell: Cell, terminology: str, a: str, b: str,
                   axis: int, separation: float, relation_key: tuple) -> dict:
    text_only = view is None
    lettered = not text_only and view.prompt != NO_PROMPT
    name_a, name_b = display_name(a), display_name(b)
    return {
        **unit.base(),
        "render_id": None if text_only else view.render_id,
        "convention": cell.convention, "prompt": cell.prompt,
        "background": None if text_only else _background(cell.ablation),
        "ablation": cell.ablation, "terminology": terminology,
        "component_a": a, "component_b": b, "name_a": name_a, "name_b": name_b,
        "letter_a": view.labels[a].letter if lettered else None,
        "letter_b": view.labels[b].letter if lettered else None,
        "axis": AXIS_NAMES[axis], "separation_mm": round(separation, 3),
        "image_path": None if text_only else view.image_path,
        "n_frames": 0 if text_only else view.n_frames,
        "answer_in_name": bool(names_shown(cell.ablation)
                               and names_decide(name_a, name_b, axis, unit.laterality)),
        "relation_id": _short_id("r", relation_key, None if text_only else view.render_id,
                                 terminology, sorted((a, b))),
    }


def _reference(base: dict, side: str) -> str:
    name, letter = base[f"name_{side}"], base[f"letter_{side}"]
    if base["ablation"] == "text_only" or base["prompt"] == NO_PROMPT:
        return f"the {name}"
    if base["ablation"] == "blank":
        return f"structure {letter}"
    return f"the {name} ({letter})"


def _relation_forms(base: dict, terminology: str, truth: str, pair: tuple[str, str],
                    unit: Unit, seed: Any) -> list[tuple]:
    """(form, direction, answer, choices, text) of the three forms of one relation."""
    a, b = _reference(base, "a"), _reference(base, "b")
    context = _context(base["ablation"], base["dims"], unit.description, base["plane"],
                       terminology, base["prompt"], base["convention"], unit.laterality)
    frame = _frame_hint(terminology, base["dims"])
    key = (seed, base["relation_id"])
    order = list(pair) if stable_hash(key, "order") % 2 == 0 else list(pair)[::-1]
    out = []
    tpl = _RELATION_OPEN[stable_hash(key, "open") % len(_RELATION_OPEN)]
    text = tpl.format(context=context, A=a, B=b, frame=frame, options=", ".join(order),
                      opt0=order[0], opt1=order[1], instr=_OPEN_INSTRUCTION)
    out.append(("open", truth, truth, order, text))
    for form, direction, answer in (("closed_true", truth, "True"),
                                    ("closed_false", OPPOSITE_TERM[truth], "False")):
        tpl = _RELATION_CLOSED[stable_hash(key, form) % len(_RELATION_CLOSED)]
        statement = _statement(direction, terminology, a, b)
        statement = statement[0].upper() + statement[1:]
        text = tpl.format(context=context, statement=statement, frame=frame,
                          instr=_CLOSED_INSTRUCTION)
        out.append((form, direction, answer, ["True", "False"], text))
    return out


def _plane_forms(base: dict, plane: str, wrong: str, desc: str, seed: Any) -> tuple:
    thing = "stack of slices" if base["dims"] == "3d" else "slice"
    context = _context(base["ablation"], base["dims"], desc, plane, None, base["prompt"])
    key = (seed, base["relation_id"])
    order = [PLANES[(i + stable_hash(key, "order")) % 3] for i in range(3)]
    tpl = _PLANE_OPEN[stable_hash(key, "open") % len(_PLANE_OPEN)]
    forms = [("open", plane, plane, order,
              tpl.format(context=context, thing=thing, options=", ".join(order),
                         instr=_OPEN_INSTRUCTION))]
    for form, shown, answer in (("closed_true", plane, "True"), ("closed_false", wrong, "False")):
        tpl = _PLANE_CLOSED[stable_hash(key, form) % len(_PLANE_CLOSED)]
        forms.append((form, shown, answer, ["True", "False"],
                      tpl.format(context=context, thing=thing, plane=shown,
                                 article=_article(shown), instr=_CLOSED_INSTRUCTION)))
    return forms


def _finish(rows: list[dict]) -> pd.DataFrame:
    """The question table: ids from content, fixed column order and dtypes, sorted."""
    if not rows:
        df = pd.DataFrame({c: pd.Series(dtype=object) for c in QUESTION_COLUMNS})
        return df.astype({"separation_mm": float, "n_frames": "int64", "answer_in_name": bool})
    content = ("render_id", "volume_id", "slice_id", "family", "form", "terminology",
               "ablation", "component_a", "component_b", "letter_a", "letter_b", "axis",
               "direction", "answer", "choices", "text")
    for row in rows:
        row["question_id"] = _short_id("q", [row[c] for c in content])
    df = pd.DataFrame(rows)
    dup = df["question_id"].duplicated(keep=False)
    if dup.any():
        raise RuntimeError(f"question ids collide: {df.loc[dup, 'question_id'].head().tolist()}")
    df = df[list(QUESTION_COLUMNS)]
    for col in df.columns:  # one null spelling (None) in object columns
        if df[col].dtype == object:
            df[col] = df[col].astype(object).where(df[col].notna(), None)
    df["separation_mm"] = df["separation_mm"].astype(float)
    df["n_frames"] = df["n_frames"].astype("int64")
    df["answer_in_name"] = df["answer_in_name"].astype(bool)
    df = df.sort_values(["volume_id", "render_id", "relation_id", "question_id"],
                        na_position="last", kind="stable").reset_index(drop=True)
    return df


# ----------------------------------------------------------------------------------------
# Stage entry points
# ----------------------------------------------------------------------------------------

def load_inputs(root: str | os.PathLike | None = None
                ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``(renders, volumes, components)`` from stages 01–02, with a clear error if absent."""
    paths = project_paths(root)
    files = {"renders": paths.benchmark / RENDERS_FILE,
             "volumes": paths.prepared / VOLUMES_FILE,
             "components": paths.prepared / COMPONENTS_FILE}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"stage 03 needs the outputs of stages 01-02; missing: {missing}")
    return tuple(pd.read_parquet(files[k]) for k in ("renders", "volumes", "components"))


def generate(profile: str = "demo", root: str | os.PathLike | None = None, force: bool = False,
             **overrides: Any) -> pd.DataFrame:
    """Write ``benchmark/questions.parquet`` and ``validity.parquet``; return the questions.

    ``validity.parquet`` is :func:`mislib.validity.validity_report` of the new questions
    (with stage 02's ``letters.parquet`` when present): one row per validity rule with the
    questions (or letters) checked and the violations found. Skips the work (and reads the
    questions back) when the stage stamp matches the parameters and the input files, unless
    ``force``. ``overrides`` replace single ``[questions]`` keys (``None`` keeps the
    profile's value).
    """
    from mislib.validity import validity_report

    paths = project_paths(root)
    params = stage_params(profile, "questions", **overrides)
    out_dir = paths.benchmark
    renders, volumes, components = load_inputs(root)
    letters_path = out_dir / LETTERS_FILE
    stamp_params = {**params, "inputs": {
        "renders": file_digest(out_dir / RENDERS_FILE),
        "letters": file_digest(letters_path) if letters_path.is_file() else None,
        "volumes": file_digest(paths.prepared / VOLUMES_FILE),
        "components": file_digest(paths.prepared / COMPONENTS_FILE)}}
    target = out_dir / QUESTIONS_FILE
    outputs = [QUESTIONS_FILE, VALIDITY_FILE]
    run = StageRun(out_dir, "questions", stamp_params, outputs)  # mislib.stage
    if not force and run.fresh():
        log.info("questions: fresh for this configuration, reading %s", target)
        return pd.read_parquet(target)
    questions = build_questions(renders, volumes, components, params)
    report = validity_report(
        questions, renders, components, volumes,
        letters=pd.read_parquet(letters_path) if letters_path.is_file() else None,
        margin_mm=float(params["margin_mm"]),
        exclude_answer_in_name=bool(params.get("exclude_answer_in_name", True)))
    broken = report[report["violations"] > 0]
    if len(broken):
        log.warning("questions: validity rules violated: %s",
                    dict(zip(broken["rule"], broken["violations"], strict=True)))
    with run:
        for frame, name in ((questions, QUESTIONS_FILE), (report, VALIDITY_FILE)):
            frame.to_parquet(run.path(name), index=False, engine="pyarrow", compression="zstd")
    return questions


def export(profile: str = "demo", root: str | os.PathLike | None = None,
           check: bool = True, force: bool = False) -> dict[str, Any]:
    """Export ``questions.parquet`` for Hugging Face ``datasets``, lmms-eval and VLMEvalKit.

    What ``make export`` runs. Writes ``benchmark/export/`` as a stage of its own (see
    :mod:`mislib.export`: re-written only when the questions, the renders or the settings
    changed, or with ``force``), then, with ``check``, loads the exports back and compares
    every row and image with the sources (:func:`mislib.export.check_export`; the result is
    under ``"check"``).
    """
    from mislib.export import check_export, export_benchmark

    info = export_benchmark(profile=profile, root=root, force=force)
    if check:
        info["check"] = check_export(root)
    # `make export` shows this line; the notebook shows it under its export cell.
    done = "export is fresh:" if info["reused"] else "exported"
    print(f"{done} {info['rows']} questions ({info['bytes'] / 1e6:.1f} MB) in "
          f"{project_paths(root).relative(info['dir'])}"
          + (f"; check passed: {info['check']}" if check else ""))
    return info


# ----------------------------------------------------------------------------------------
# Summaries for the notebook
# ----------------------------------------------------------------------------------------

def factor_counts(questions: pd.DataFrame, rows: Sequence[str] = ("family", "ablation",
                  "convention"), columns: Sequence[str] = ("terminology", "form")) -> pd.DataFrame:
    """Questions per factor cell: a cross table of ``rows`` × ``columns`` (nulls shown as ``—``)."""
    q = questions.fillna({c: "—" for c in (*rows, *columns)})
    return pd.crosstab([q[c] for c in rows], [q[c] for c in columns], margins=True)


def answer_balance(questions: pd.DataFrame) -> pd.DataFrame:
    """Answers per family, terminology and form: True/False and each direction term."""
    q = questions.fillna({"terminology": "—"})
    return (q.groupby(["family", "terminology", "form", "answer"]).size()
            .rename("questions").reset_index())


def factor_figure(questions: pd.DataFrame, factors: Sequence[str] = FIGURE_FACTORS,
                  columns: int = 4, width: float = 7.5):
    """Questions per level of each factor, one bar panel per factor (``—``: the factor does
    not apply, e.g. terminology of a plane question), as a grid of ``columns`` panels a row,
    ``width`` inches wide (a page). Returns a matplotlib Figure."""
    import matplotlib.pyplot as plt

    columns = max(1, min(columns, len(factors)))
    n_rows = -(-len(factors) // columns)
    fig, axes = plt.subplots(n_rows, columns, figsize=(width, 2.3 * n_rows), sharey=True,
                             squeeze=False)
    for ax in axes.flat[len(factors):]:
        ax.set_visible(False)
    for ax, factor in zip(axes.flat, factors, strict=False):
        counts = questions[factor].fillna("—").value_counts()
        # the benchmark's level order (vocabulary.ordered), "—" (does not apply) last
        counts = counts.reindex([*ordered(factor, counts.index.drop("—", errors="ignore")),
                                 *(["—"] if "—" in counts.index else [])])
        ax.bar(range(len(counts)), counts.to_numpy(), color="#4477AA")
        ax.set_xticks(range(len(counts)), counts.index, rotation=60, ha="right", fontsize=7)
        ax.set_title(factor, fontsize=9)
    for ax in axes[:, 0]:
        ax.set_ylabel("questions")
    fig.tight_layout()
    return fig


def separation_figure(questions: pd.DataFrame, margin_mm: float):
    """Histogram of the separation along the asked axis of every relation question, with
    the margin below which no relation is asked. Returns a matplotlib Figure."""
    import matplotlib.pyplot as plt

    rel = questions[questions["family"] != "plane"]
    fig, ax = plt.subplots(figsize=(5, 2.6))
    ax.hist(rel["separation_mm"], bins=40, color="#228833")
    ax.axvline(margin_mm, color="k", ls="--", label=f"margin {margin_mm:g} mm")
    ax.set_xlabel("separation along the asked axis (mm)")
    ax.set_ylabel("questions")
    ax.legend()
    fig.tight_layout()
    return fig
