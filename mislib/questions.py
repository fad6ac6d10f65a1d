"""Stage 03: the factorial MIS-Ground questions, with ground truth from one geometry mapping.

Inputs (``data/README.md``): ``prepared/volumes.parquet`` (source, modality, laterality),
``prepared/components.parquet`` (3D centroids, used by the text-only ablation) and
``benchmark/renders.parquet`` (one row per labelled structure of every render). Output:
``benchmark/questions.parquet``, one row per question, and a stage stamp.

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
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from mislib.config import file_digest, is_fresh, stage_params, write_stamp
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
from mislib.paths import project_paths
from mislib.structures import readable_name as display_name  # the one readable-name map

log = logging.getLogger(__name__)

FAMILIES = ("relation_2d", "relation_3d", "plane")
FORMS = ("open", "closed_true", "closed_false")
TERMINOLOGIES = ("anatomical", "colloquial")
ABLATIONS = ("none", "text_only", "blank")
PROMPTS = ("none", "mask", "box", "point")
#: The prompt level of a scan drawn without marks or letters (the no-prompt baseline).
NO_PROMPT = "none"

QUESTIONS_FILE = "questions.parquet"
RENDER_COLUMNS = ("render_id", "volume_id", "slice_id", "plane", "convention", "dims",
                  "prompt", "background", "image_path", "n_frames", "letter", "component",
                  "centroid_col", "centroid_row", "frame_first", "frame_last",
                  "visible_x", "visible_y", "visible_z")
QUESTION_COLUMNS = (
    "question_id", "render_id", "volume_id", "slice_id", "source", "modality", "plane", "dims",
    "convention", "prompt", "background", "terminology", "form", "family", "ablation",
    "component_a", "component_b", "name_a", "name_b", "letter_a", "letter_b", "axis",
    "direction", "separation_mm", "text", "answer", "choices", "image_path", "n_frames",
    "relation_id")

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


def _context(ablation: str, dims: str, desc: str, plane: str, terminology: str | None,
             prompt: str | None = None) -> str:
    if ablation == "text_only":
        view = ""
        if terminology == "colloquial":
            view = (" shown as a video in the standard radiological frame order" if dims == "3d"
                    else " shown in the standard radiological display")
        shape = "series of slices" if dims == "3d" else "slice"
        return f"Consider {_article(plane)} {plane} {shape} of {_article(desc)} {desc}{view}."
    if ablation == "blank":
        if dims == "3d":
            return ("The video shows labelled structures, slice by slice, from "
                    f"{_article(desc)} {desc} on an empty background.")
        return (f"The image shows labelled structures from {_article(desc)} {desc} on an "
                "empty background.")
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


@dataclass(frozen=True)
class _Render:
    render_id: str
    unit: tuple
    plane: str
    convention: str
    dims: str
    prompt: str
    ablation: str
    image_path: str
    n_frames: int
    labels: dict  # component -> (letter, col, row, frame_first, frame_last, xyz)


def _index_renders(renders: pd.DataFrame) -> dict[str, _Render]:
    _require(renders, RENDER_COLUMNS, "renders.parquet")
    _check_values(renders, "plane", PLANES, "renders.parquet")
    _check_values(renders, "convention", CONVENTIONS, "renders.parquet")
    _check_values(renders, "dims", ("2d", "3d"), "renders.parquet")
    _check_values(renders, "background", ("scan", "blank"), "renders.parquet")
    _check_values(renders, "prompt", PROMPTS, "renders.parquet")
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
    out: dict[str, _Render] = {}
    r = renders.sort_values(["render_id", "component"], kind="stable")
    # Plain Python lists: iterating Arrow-backed columns row by row is several times slower.
    c = {k: r[k].to_numpy(dtype=object).tolist() for k in RENDER_COLUMNS if k not in
         ("visible_x", "visible_y", "visible_z", "centroid_col", "centroid_row")}
    xyz = r[["visible_x", "visible_y", "visible_z"]].to_numpy(float)
    col = r["centroid_col"].to_numpy(float)
    row_px = r["centroid_row"].to_numpy(float)
    for i, rid in enumerate(c["render_id"]):
        rid = str(rid)
        rend = out.get(rid)
        if rend is None:
            slice_id = c["slice_id"][i]
            unit = (str(c["volume_id"][i]), str(c["dims"][i]), str(c["plane"][i]),
                    "" if pd.isna(slice_id) else str(slice_id))
            rend = _Render(rid, unit, str(c["plane"][i]), str(c["convention"][i]),
                           str(c["dims"][i]), str(c["prompt"][i]),
                           "blank" if c["background"][i] == "blank" else "none",
                           str(c["image_path"][i]), int(c["n_frames"][i]), {})
            out[rid] = rend
        comp = str(c["component"][i])
        if comp in rend.labels:
            raise ValueError(f"renders.parquet: render {rid} labels {comp!r} twice")
        letter = c["letter"][i]  # null on a render without a visual prompt
        rend.labels[comp] = (None if pd.isna(letter) else str(letter), col[i], row_px[i],
                             c["frame_first"][i], c["frame_last"][i], xyz[i])
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
    margin = float(params["margin_mm"])
    seed = params.get("seed", 0)
    families = list(params["families"])
    forms = list(params["forms"])
    terminologies = list(params["terminologies"])
    ablations = list(params["ablations"])
    for key, allowed in (("families", FAMILIES), ("forms", FORMS),
                         ("terminologies", TERMINOLOGIES), ("ablations", ABLATIONS)):
        bad = sorted(set(params[key]) - set(allowed))
        if bad:
            raise ValueError(f"[questions] {key}: unknown values {bad}; expected {list(allowed)}")
    max_pairs = _option_spec(params["max_pairs_per_unit"], "max_pairs_per_unit")
    n_cells = _option_spec(params["cells_per_relation"], "cells_per_relation")
    n_terms = _option_spec(params["terminologies_per_relation"], "terminologies_per_relation")
    n_plane_cells = _option_spec(params["plane_cells_per_unit"], "plane_cells_per_unit")

    _require(volumes, ("volume_id", "source", "modality", "laterality"), "volumes.parquet")
    _require(components, ("volume_id", "component", "centroid_x", "centroid_y", "centroid_z"),
             "components.parquet")
    vol_info = {str(v.volume_id): (str(v.source), str(v.modality),
                                   None if pd.isna(v.laterality) else str(v.laterality))
                for v in volumes.itertuples(index=False)}
    centroid3d = {(str(c.volume_id), str(c.component)):
                  np.array([c.centroid_x, c.centroid_y, c.centroid_z], float)
                  for c in components.itertuples(index=False)}

    index = _index_renders(renders)
    unknown = sorted({r.unit[0] for r in index.values()} - set(vol_info))
    if unknown:
        raise ValueError(f"renders.parquet: volumes {unknown[:5]} are not in volumes.parquet")
    units: dict[tuple, list[_Render]] = defaultdict(list)
    for rend in index.values():
        units[rend.unit].append(rend)

    rows: list[dict] = []
    mismatches: list[str] = []
    comp_usage: Counter = Counter()
    cell_usage: Counter = Counter()
    term_usage: Counter = Counter()
    answer_usage: Counter = Counter()
    false_plane_usage: Counter = Counter()
    text_only_done: set = set()

    def emit(base: dict, family: str, form_rows: list[tuple]) -> None:
        for form, direction, answer, choices, text in form_rows:
            if form in forms:
                rows.append({**base, "family": family, "form": form, "direction": direction,
                             "answer": answer, "choices": choices, "text": text})

    for ukey in tqdm(sorted(units), desc="questions", unit="unit", disable=not progress):
        volume_id, dims, plane, slice_id = ukey
        source, modality, laterality = vol_info[volume_id]
        desc = _volume_description(source, modality, laterality)
        rends = sorted(units[ukey], key=lambda r: r.render_id)
        # The reference render gives the unit's centroids for choosing pairs: the standard
        # view on the scan, where the renderer's visible areas are the intended ones.
        ref = min(rends, key=lambda r: (r.convention != "standard", r.ablation != "none",
                                        r.render_id))
        fixed, inplane = plane_axes(plane)
        family = "relation_3d" if dims == "3d" else "relation_2d"
        axes = (fixed,) if dims == "3d" else inplane
        unit_base = {"volume_id": volume_id, "slice_id": slice_id or None, "source": source,
                     "modality": modality, "plane": plane, "dims": dims}

        # ---- relations --------------------------------------------------------------------
        if family in families:
            comps = sorted({c for r in rends for c in r.labels})
            labelled_with = defaultdict(set)
            for r in rends:
                for c in r.labels:
                    labelled_with[c].update(r.labels)
            candidates = []
            for i, c1 in enumerate(comps):
                for c2 in comps[i + 1:]:
                    if c2 not in labelled_with[c1]:
                        continue
                    p1 = ref.labels[c1][5] if c1 in ref.labels else None
                    p2 = ref.labels[c2][5] if c2 in ref.labels else None
                    if p1 is None or p2 is None:
                        src = next(r for r in rends if c1 in r.labels and c2 in r.labels)
                        p1, p2 = src.labels[c1][5], src.labels[c2][5]
                    ok = [a for a in axes if abs(p1[a] - p2[a]) >= margin]
                    if ok:
                        candidates.append(((c1, c2), ok))
            chosen = []
            remaining = list(candidates)
            while remaining and (max_pairs is None or len(chosen) < max_pairs):
                usage = {pc[0]: (comp_usage[pc[0][0]] + comp_usage[pc[0][1]],
                                 max(comp_usage[pc[0][0]], comp_usage[pc[0][1]]))
                         for pc in remaining}
                pick = _pick_least_used([pc[0] for pc in remaining], usage, 1, (seed, ukey))[0]
                best = next(pc for pc in remaining if pc[0] == pick)
                remaining.remove(best)
                chosen.append(best)
                comp_usage.update(best[0])

            for (c1, c2), rel_axes in chosen:
                for axis in rel_axes:
                    relation_key = (ukey, c1, c2, axis)
                    cells: dict[tuple, _Render | None] = {}
                    for r in rends:
                        if r.ablation in ablations and c1 in r.labels and c2 in r.labels:
                            cells.setdefault((r.ablation, r.convention, r.prompt), r)
                    if "text_only" in ablations:
                        tkey = (volume_id, family, plane, c1, c2, axis)
                        g1 = centroid3d.get((volume_id, c1))
                        g2 = centroid3d.get((volume_id, c2))
                        if (tkey not in text_only_done and g1 is not None and g2 is not None
                                and abs(g1[axis] - g2[axis]) >= margin):
                            cells[("text_only", None, None)] = None
                    cell_keys = sorted(cells, key=lambda k: tuple(str(x) for x in k))
                    picked = _pick_least_used(
                        cell_keys, Counter({k: cell_usage[(family, k)] for k in cell_keys}),
                        n_cells, (seed, relation_key))
                    for cell in picked:
                        cell_usage[(family, cell)] += 1
                        rend = cells[cell]
                        ablation, convention, prompt = cell
                        if rend is None:
                            text_only_done.add((volume_id, family, plane, c1, c2, axis))
                            g = {c1: centroid3d[(volume_id, c1)], c2: centroid3d[(volume_id, c2)]}
                            mapping = screen_mapping(plane, "standard")
                        else:
                            g = {c: rend.labels[c][5] for c in (c1, c2)}
                            mapping = screen_mapping(plane, convention)
                        delta = g[c1][axis] - g[c2][axis]
                        separation = abs(float(delta))
                        if separation < margin:
                            continue  # this render's visible parts are closer than the margin
                        code = AXIS_CODES[axis] if delta > 0 else OPPOSITE[AXIS_CODES[axis]]
                        # least used in this cell, then overall, so both stay balanced
                        terms_here = _pick_least_used(
                            [t for t in TERMINOLOGIES if t in terminologies],
                            {t: (term_usage[(family, cell, t)], term_usage[(family, t)])
                             for t in TERMINOLOGIES},
                            n_terms, (seed, relation_key, cell))
                        for terminology in terms_here:
                            term_usage[(family, cell, terminology)] += 1
                            term_usage[(family, terminology)] += 1
                            if terminology == "anatomical":
                                t1 = anatomical_term(code, laterality)  # c1 relative to c2
                            else:
                                t1 = colloquial_term(code, mapping)
                                if rend is not None:
                                    err = _check_screen(rend, c1, c2, code, mapping, t1)
                                    if err:
                                        mismatches.append(err)
                                        continue
                            pair = next(p for p in TERM_PAIRS if t1 in p)
                            bal_key = (family, terminology, ablation, convention, pair)
                            t2 = OPPOSITE_TERM[t1]
                            # Choose A so that this cell's open answers stay balanced.
                            if answer_usage[(bal_key, t1)] != answer_usage[(bal_key, t2)]:
                                a_first = answer_usage[(bal_key, t1)] < answer_usage[(bal_key, t2)]
                            else:
                                a_first = stable_hash(seed, relation_key, cell,
                                                      terminology) % 2 == 0
                            a, b, truth = (c1, c2, t1) if a_first else (c2, c1, t2)
                            answer_usage[(bal_key, truth)] += 1
                            rows_base = _relation_base(
                                unit_base, rend, ablation, convention, prompt, terminology,
                                a, b, axis, separation, relation_key)
                            emit(rows_base, family, _relation_forms(
                                rows_base, family, terminology, truth, pair, desc, seed))

        # ---- plane questions --------------------------------------------------------------
        if "plane" in families and n_plane_cells != 0:
            options = [r for r in rends if r.ablation in ablations]
            keys = [(r.ablation, r.convention, r.prompt, r.render_id) for r in options]
            usage = Counter({k: cell_usage[("plane", k[:3])] for k in keys})
            for key in _pick_least_used(keys, usage, n_plane_cells, (seed, ukey, "plane")):
                cell_usage[("plane", key[:3])] += 1
                rend = index[key[3]]
                others = [p for p in PLANES if p != plane]
                wrong = min(others, key=lambda p: (false_plane_usage[(plane, p)],
                                                   stable_hash(seed, rend.render_id, p)))
                false_plane_usage[(plane, wrong)] += 1
                base = {**unit_base, "render_id": rend.render_id, "convention": rend.convention,
                        "prompt": rend.prompt,
                        "background": "blank" if rend.ablation == "blank" else "scan",
                        "ablation": rend.ablation, "terminology": None, "component_a": None,
                        "component_b": None, "name_a": None, "name_b": None,
                        "letter_a": None, "letter_b": None, "axis": None,
                        "separation_mm": float("nan"), "image_path": rend.image_path,
                        "n_frames": rend.n_frames,
                        "relation_id": _short_id("p", rend.render_id)}
                emit(base, "plane", _plane_forms(base, plane, wrong, desc, seed))

    if mismatches:
        shown = "\n  ".join(mismatches[:8])
        raise GroundTruthMismatch(
            f"renders.parquet: {len(mismatches)} colloquial truths from the renderer's "
            f"centroids disagree with the screen mapping, e.g.\n  {shown}")
    return _finish(rows)


def _short_id(prefix: str, *parts: Any) -> str:
    return f"{prefix}{stable_hash(*parts):016x}"


def _check_screen(rend: _Render, c1: str, c2: str, code: str, mapping: ScreenMapping,
                  expected: str) -> str | None:
    """Check the renderer's pixel centroids (2D) or frame ranges (3D) against the mapping.

    Returns a message on disagreement, else None. For 2D the pixel centroids *are* the
    colloquial truth, so any sign disagreement is reported; for 3D only frame ranges that do
    not overlap can contradict the order.
    """
    axis, sign = screen_axis(code, mapping)
    l1, l2 = rend.labels[c1], rend.labels[c2]
    if rend.dims == "2d":
        if axis == 2:
            return f"{rend.render_id}: in-plane axis maps to the frame order"
        d = (l1[1] - l2[1]) if axis == 0 else (l1[2] - l2[2])
        if np.sign(d) != sign:
            what = ("centroid_col", "centroid_row")[axis]
            return (f"{rend.render_id}: {c1} vs {c2}: {what} difference {d:+.1f} px, "
                    f"mapping says {expected}")
        return None
    f1, l1_last, f2, l2_last = l1[3], l1[4], l2[3], l2[4]
    if any(pd.isna(v) for v in (f1, l1_last, f2, l2_last)):
        return None
    if sign > 0 and l1_last < f2 or sign < 0 and f1 > l2_last:
        return (f"{rend.render_id}: {c1} frames {f1}-{l1_last}, {c2} frames {f2}-{l2_last}, "
                f"mapping says {expected}")
    return None


def _relation_base(unit_base: dict, rend: _Render | None, ablation: str, convention,
                   prompt, terminology: str, a: str, b: str, axis: int, separation: float,
                   relation_key: tuple) -> dict:
    text_only = rend is None
    return {
        **unit_base,
        "render_id": None if text_only else rend.render_id,
        "convention": None if text_only else convention,
        "prompt": None if text_only else prompt,
        "background": None if text_only else ("blank" if ablation == "blank" else "scan"),
        "ablation": ablation, "terminology": terminology,
        "component_a": a, "component_b": b, "name_a": display_name(a), "name_b": display_name(b),
        "letter_a": None if text_only or prompt == NO_PROMPT else rend.labels[a][0],
        "letter_b": None if text_only or prompt == NO_PROMPT else rend.labels[b][0],
        "axis": AXIS_NAMES[axis], "separation_mm": round(separation, 3),
        "image_path": None if text_only else rend.image_path,
        "n_frames": 0 if text_only else rend.n_frames,
        "relation_id": _short_id("r", relation_key, rend.render_id if rend else None,
                                 terminology, sorted((a, b))),
    }


def _reference(base: dict, side: str) -> str:
    name, letter = base[f"name_{side}"], base[f"letter_{side}"]
    if base["ablation"] == "text_only" or base["prompt"] == NO_PROMPT:
        return f"the {name}"
    if base["ablation"] == "blank":
        return f"structure {letter}"
    return f"the {name} ({letter})"


def _relation_forms(base: dict, family: str, terminology: str, truth: str,
                    pair: tuple[str, str], desc: str, seed: Any) -> list[tuple]:
    a, b = _reference(base, "a"), _reference(base, "b")
    context = _context(base["ablation"], base["dims"], desc, base["plane"], terminology,
                       base["prompt"])
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
        return df.astype({"separation_mm": float, "n_frames": "int64"})
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
    files = {"renders": paths.benchmark / "renders.parquet",
             "volumes": paths.prepared / "volumes.parquet",
             "components": paths.prepared / "components.parquet"}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"stage 03 needs the outputs of stages 01-02; missing: {missing}")
    return tuple(pd.read_parquet(files[k]) for k in ("renders", "volumes", "components"))


def generate(profile: str = "demo", root: str | os.PathLike | None = None, force: bool = False,
             **overrides: Any) -> pd.DataFrame:
    """Write ``benchmark/questions.parquet`` for a profile; return the question table.

    Skips the work (and reads the file back) when the stage stamp matches the parameters
    and the input files, unless ``force``. ``overrides`` replace single ``[questions]``
    keys (``None`` keeps the profile's value).
    """
    paths = project_paths(root)
    params = stage_params(profile, "questions", **overrides)
    out_dir = paths.benchmark
    renders, volumes, components = load_inputs(root)
    stamp_params = {**params, "inputs": {
        "renders": file_digest(out_dir / "renders.parquet"),
        "volumes": file_digest(paths.prepared / "volumes.parquet"),
        "components": file_digest(paths.prepared / "components.parquet")}}
    target = out_dir / QUESTIONS_FILE
    if not force and is_fresh(out_dir, "questions", stamp_params, [QUESTIONS_FILE]):
        log.info("questions: fresh for this configuration, reading %s", target)
        return pd.read_parquet(target)
    questions = build_questions(renders, volumes, components, params)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".parquet.tmp")
    questions.to_parquet(tmp, index=False, engine="pyarrow", compression="zstd")
    os.replace(tmp, target)
    write_stamp(out_dir, "questions", stamp_params, [QUESTIONS_FILE])
    return questions


def export(profile: str = "demo", root: str | os.PathLike | None = None,
           check: bool = True) -> dict[str, Any]:
    """Export ``questions.parquet`` as a HF ``datasets`` parquet dataset and a VLMEvalKit TSV.

    What ``make export`` runs. Writes ``benchmark/export/`` (see :mod:`mislib.export`), then,
    with ``check``, loads both exports back and compares every row and image with the
    sources (:func:`mislib.export.check_export`; the result is under ``"check"``).
    """
    from mislib.export import check_export, export_benchmark

    info = export_benchmark(profile=profile, root=root)
    if check:
        info["check"] = check_export(root)
    # `make export` shows this line; the notebook shows it under its export cell.
    print(f"exported {info['rows']} questions ({info['bytes'] / 1e6:.1f} MB) to "
          f"{info['tsv'].parent}" + (f"; check passed: {info['check']}" if check else ""))
    return info


# ----------------------------------------------------------------------------------------
# Summaries for the notebook
# ----------------------------------------------------------------------------------------

FACTORS = ("family", "modality", "dims", "plane", "convention", "prompt", "ablation",
           "terminology", "form")


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
