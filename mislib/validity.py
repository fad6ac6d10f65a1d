"""Validity rules of the benchmark, checked independently of the code that generates it.

The generator (:mod:`mislib.render`, :mod:`mislib.questions`) is built to obey these rules;
the checkers here re-derive each rule from the written tables — ``letters.parquet``,
``renders.parquet``, ``questions.parquet`` — with their own code, never by reading a flag
the generator set, so a generator bug shows up as a violation instead of being trusted.
Stage 03 writes their summary to ``benchmark/validity.parquet`` (:func:`validity_report`:
``rule, checked, violations, description``); the project's ``docs/design.md`` states the rules.

Each checker takes the tables and returns ``(checked, violations)``: how many items it
looked at and a DataFrame of the offending rows (empty when the rule holds).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mislib.geometry import AXIS_VECTORS, OPPOSITE, screen_mapping
from mislib.paths import VALIDITY_FILE, project_paths


def check_letters_on_marks(letters: pd.DataFrame) -> tuple[int, pd.DataFrame]:
    """Every letter is nearer its own anchor than any other structure's anchor.

    Parameters
    ----------
    letters : DataFrame
        ``letters.parquet``: one row per (render, frame, letter) with the glyph's centre
        ``letter_col, letter_row`` and its mark's anchor ``anchor_col, anchor_row`` (pixels).

    Returns
    -------
    (letters checked, violating rows with ``own_px`` and ``other_px`` distances and the
    ``nearer`` letter whose anchor is closer).
    """
    need = {"render_id", "frame", "letter", "letter_col", "letter_row", "anchor_col",
            "anchor_row"}
    missing = sorted(need - set(letters.columns))
    if missing:
        raise ValueError(f"letters.parquet: missing columns {missing}")
    bad = []
    for (_, _), group in letters.groupby(["render_id", "frame"], sort=False):
        centre = group[["letter_col", "letter_row"]].to_numpy(float)
        anchor = group[["anchor_col", "anchor_row"]].to_numpy(float)
        dist = np.linalg.norm(centre[:, None, :] - anchor[None, :, :], axis=2)  # letter x anchor
        own = np.diag(dist).copy()
        np.fill_diagonal(dist, np.inf)
        nearest = dist.argmin(axis=1)
        other = dist[np.arange(len(group)), nearest]
        for i in np.flatnonzero(other <= own):
            row = group.iloc[i].to_dict()
            bad.append({**row, "own_px": float(own[i]), "other_px": float(other[i]),
                        "nearer": group["letter"].iloc[nearest[i]]})
    return len(letters), pd.DataFrame(bad)


# ---------------------------------------------------------------------------------------
# Questions: answerable from their input
# ---------------------------------------------------------------------------------------

#: The checker's own vocabulary (written apart from mislib.questions on purpose).
_ANATOMICAL_ONLY = {"superior", "inferior", "anterior", "posterior", "medial", "lateral"}
_SCREEN_ONLY = {"above", "below", "earlier", "later"}
_PATIENT_TERM = {"R": "right", "L": "left", "A": "anterior", "P": "posterior",
                 "S": "superior", "I": "inferior"}
_STATEMENT = re.compile(
    r"\b(axial|coronal|sagittal) (?:slice|series of slices)\b[^.]*?\bin the (standard|storage) "
    r"display convention: up in the image is (?:the patient's )?(\w+), left in the image is "
    r"(?:the patient's )?(\w+)(?:, and frames run from (?:the patient's )?(\w+) to "
    r"(?:the patient's )?(\w+))?\.")


def _patient_term(code: str, laterality: str | None) -> str:
    if code in ("R", "L") and laterality in ("left", "right"):
        return "lateral" if code == laterality[0].upper() else "medial"
    return _PATIENT_TERM[code]


def asks_anatomical(row: Mapping[str, Any]) -> bool:
    """Whether a relation question asks patient-relative directions, read from its wording.

    Superior/inferior, anterior/posterior and medial/lateral are anatomical; above/below and
    earlier/later are screen terms; left/right are anatomical when the text asks for the
    patient's directions.
    """
    words = {str(row["direction"]), *map(str, row["choices"])}
    if words & _ANATOMICAL_ONLY:
        return True
    if words & _SCREEN_ONLY:
        return False
    return "anatomical directions" in str(row["text"])


def states_display(row: Mapping[str, Any], convention: str,
                   laterality: str | None = None) -> bool:
    """Whether the text states the view's plane and ``convention`` correctly.

    The statement must name the question's plane and the convention and give, in patient
    terms, what lies up and to the left in the image (and the frame order of a stack) as
    :func:`mislib.geometry.screen_mapping` defines them.
    """
    found = _STATEMENT.search(str(row["text"]))
    if found is None:
        return False
    plane, conv, up, left, back, front = found.groups()
    if plane != row["plane"] or conv != convention:
        return False
    m = screen_mapping(plane, conv)
    if (up, left) != (_patient_term(OPPOSITE[m.down], laterality),
                      _patient_term(OPPOSITE[m.right], laterality)):
        return False
    if row["dims"] == "3d":
        return (back, front) == (_patient_term(OPPOSITE[m.frame], laterality),
                                 _patient_term(m.frame, laterality))
    return True


def _laterality(volumes: pd.DataFrame | None) -> dict[str, str | None]:
    if volumes is None or "laterality" not in volumes.columns:
        return {}
    return {str(v): (None if pd.isna(s) else str(s))
            for v, s in zip(volumes["volume_id"], volumes["laterality"], strict=True)}


def _render_background(renders: pd.DataFrame) -> dict[str, str]:
    return dict(zip(renders["render_id"].astype(str), renders["background"].astype(str),
                    strict=False))


def check_blank_terms(questions: pd.DataFrame, renders: pd.DataFrame,
                      volumes: pd.DataFrame | None = None) -> tuple[int, pd.DataFrame]:
    """On the blank background, anatomical terms only when the text states plane and
    convention: nothing else in the input says which way is anterior.

    The background is read from ``renders.parquet`` (what the image shows), not from the
    question's own column.
    """
    background = _render_background(renders)
    side = _laterality(volumes)
    rel = questions[(questions["family"] != "plane") & questions["render_id"].notna()]
    blank = rel[rel["render_id"].map(background) == "blank"]
    bad = [i for i, row in blank.iterrows()
           if asks_anatomical(row)
           and not states_display(row, row["convention"], side.get(row["volume_id"]))]
    return len(blank), blank.loc[bad]


def check_no_plane_on_blank(questions: pd.DataFrame,
                            renders: pd.DataFrame) -> tuple[int, pd.DataFrame]:
    """No plane-naming question on the blank background, where a box or a dot cannot show
    the plane."""
    background = _render_background(renders)
    plane = questions[questions["family"] == "plane"]
    return len(plane), plane[plane["render_id"].map(background) == "blank"]


def check_text_only(questions: pd.DataFrame,
                    volumes: pd.DataFrame | None = None) -> tuple[int, pd.DataFrame]:
    """Text-only questions have no image, and ask anatomical directions (answerable from
    anatomical knowledge) or screen terms under a stated standard display convention."""
    side = _laterality(volumes)
    text = questions[questions["render_id"].isna() & (questions["family"] != "plane")]
    bad = []
    for i, row in text.iterrows():
        has_image = not pd.isna(row["image_path"]) or int(row["n_frames"]) != 0
        if has_image or (not asks_anatomical(row)
                         and not states_display(row, "standard", side.get(row["volume_id"]))):
            bad.append(i)
    return len(text), text.loc[bad]


# ---------------------------------------------------------------------------------------
# Questions: names that give the answer away
# ---------------------------------------------------------------------------------------

_NAME_PAIRS = {"R/L": [("left", "right")],
               "A/P": [("anterior", "posterior"), ("front", "back"), ("ventral", "dorsal")],
               "S/I": [("superior", "inferior"), ("upper", "lower"), ("cranial", "caudal")]}


def names_give_answer(row: Mapping[str, Any], laterality: str | None = None) -> bool:
    """Whether the question's text names both structures and their names carry opposite
    words along the asked axis (left/right twins; medial/lateral on a limb; upper/lower,
    superior/inferior, anterior/posterior), so the names alone settle the answer."""
    if row["family"] == "plane" or pd.isna(row["name_a"]) or pd.isna(row["name_b"]):
        return False
    text = str(row["text"])
    if str(row["name_a"]) not in text or str(row["name_b"]) not in text:
        return False
    a = set(re.findall(r"[a-z]+", str(row["name_a"]).lower()))
    b = set(re.findall(r"[a-z]+", str(row["name_b"]).lower()))
    pairs = _NAME_PAIRS[str(row["axis"])]
    if row["axis"] == "R/L" and laterality in ("left", "right"):
        pairs = [("medial", "lateral")]
    for one, other in pairs:
        if (one in a and other in b and other not in a and one not in b) or \
                (other in a and one in b and one not in a and other not in b):
            return True
    return False


def check_answer_in_name(questions: pd.DataFrame, volumes: pd.DataFrame | None = None,
                         excluded: bool = True) -> dict[str, tuple[int, pd.DataFrame]]:
    """Two rules on answer-in-name questions, derived from the text and names.

    ``answer_in_name_flag``: the ``answer_in_name`` column agrees with
    :func:`names_give_answer`. ``answer_in_name_excluded`` (with ``excluded``, the
    profiles' default): no question whose names give the answer is left.
    """
    side = _laterality(volumes)
    derived = pd.Series([names_give_answer(row, side.get(row["volume_id"]))
                         for _, row in questions.iterrows()], index=questions.index, dtype=bool)
    flag = questions["answer_in_name"].astype(bool) if "answer_in_name" in questions else \
        pd.Series(False, index=questions.index)
    out = {"answer_in_name_flag": (len(questions), questions[derived != flag])}
    if excluded:
        out["answer_in_name_excluded"] = (len(questions), questions[derived])
    return out


# ---------------------------------------------------------------------------------------
# Questions: ground truth re-derived from the geometry
# ---------------------------------------------------------------------------------------

def _labels(renders: pd.DataFrame) -> dict[tuple[str, str], dict[str, Any]]:
    cols = ["render_id", "component", "centroid_col", "centroid_row", "frame_first",
            "frame_last", "centroid_frame", "visible_x", "visible_y", "visible_z"]
    have = [c for c in cols if c in renders.columns]
    return {(str(r["render_id"]), str(r["component"])): r
            for r in renders[have].to_dict("records")}


def check_frame_order(questions: pd.DataFrame, renders: pd.DataFrame) -> tuple[int, pd.DataFrame]:
    """3D relations are asked only when the frame order agrees with the 3D centroids.

    For each stack question, both the area-weighted mean frames and the midpoints of the
    frame ranges of A and B must order the two as the 3D centroids do along the frame
    direction of the stack's (plane, convention).
    """
    labels = _labels(renders)
    stack = questions[(questions["family"] == "relation_3d") & questions["render_id"].notna()]
    bad = []
    for i, row in stack.iterrows():
        la = labels.get((row["render_id"], row["component_a"]))
        lb = labels.get((row["render_id"], row["component_b"]))
        if la is None or lb is None:
            bad.append(i)
            continue
        frame = AXIS_VECTORS[screen_mapping(row["plane"], row["convention"]).frame]
        xyz = np.array([la[f"visible_{k}"] - lb[f"visible_{k}"] for k in "xyz"], float)
        want = np.sign(xyz @ frame)
        by_mean = np.sign(float(la["centroid_frame"]) - float(lb["centroid_frame"]))
        by_mid = np.sign((la["frame_first"] + la["frame_last"])
                         - (lb["frame_first"] + lb["frame_last"]))
        if want == 0 or by_mean != want or by_mid != want:
            bad.append(i)
    return len(stack), stack.loc[bad]


_AXIS_OF = {"R/L": 0, "A/P": 1, "S/I": 2}
_CODES = ("R", "A", "S")


def _truth(row: Mapping[str, Any], labels, centroids, laterality) -> tuple[str, float] | None:
    """(term for A relative to B, separation mm) re-derived from the tables, or None."""
    axis = _AXIS_OF[str(row["axis"])]
    anatomical = asks_anatomical(row)
    if pd.isna(row["render_id"]):
        ga = centroids.get((row["volume_id"], row["component_a"]))
        gb = centroids.get((row["volume_id"], row["component_b"]))
        if ga is None or gb is None:
            return None
        delta = ga - gb
        convention = "standard"
        la = lb = None
    else:
        la = labels.get((row["render_id"], row["component_a"]))
        lb = labels.get((row["render_id"], row["component_b"]))
        if la is None or lb is None:
            return None
        delta = np.array([la[f"visible_{k}"] - lb[f"visible_{k}"] for k in "xyz"], float)
        convention = row["convention"]
    code = _CODES[axis] if delta[axis] > 0 else OPPOSITE[_CODES[axis]]
    separation = abs(float(delta[axis]))
    if anatomical:
        return _patient_term(code, laterality), separation
    m = screen_mapping(row["plane"], convention)
    if code in (m.right, OPPOSITE[m.right]):
        if la is not None:  # where the renderer drew them
            return ("right" if la["centroid_col"] > lb["centroid_col"] else "left"), separation
        return ("right" if code == m.right else "left"), separation
    if code in (m.down, OPPOSITE[m.down]):
        if la is not None:
            return ("below" if la["centroid_row"] > lb["centroid_row"] else "above"), separation
        return ("below" if code == m.down else "above"), separation
    if la is not None:
        return ("later" if la["centroid_frame"] > lb["centroid_frame"] else "earlier"), \
            separation
    return ("later" if code == m.frame else "earlier"), separation


_OPPOSITE_TERM = {"superior": "inferior", "anterior": "posterior", "left": "right",
                  "medial": "lateral", "above": "below", "earlier": "later"}
_OPPOSITE_TERM.update({v: k for k, v in list(_OPPOSITE_TERM.items())})


def check_ground_truth(questions: pd.DataFrame, renders: pd.DataFrame,
                       components: pd.DataFrame, volumes: pd.DataFrame | None = None,
                       margin_mm: float = 0.0) -> dict[str, tuple[int, pd.DataFrame]]:
    """Every answer re-derived from the geometry, and every relation clear of the margin.

    Relations: anatomical terms from the world centroids (visible ones on a render, 3D ones
    text-only), screen terms from the renderer's pixel centroids and mean frames (text-only:
    the standard mapping); the open answer must be that term, ``closed_true`` must state it
    and ``closed_false`` its opposite. Plane questions: the open answer is the render's plane.
    Returns ``{"ground_truth": ..., "margin": ...}``.
    """
    labels = _labels(renders)
    centroids = {(str(c["volume_id"]), str(c["component"])):
                 np.array([c["centroid_x"], c["centroid_y"], c["centroid_z"]], float)
                 for c in components.to_dict("records")}
    plane_of = dict(zip(renders["render_id"].astype(str), renders["plane"].astype(str),
                        strict=False))
    side = _laterality(volumes)
    wrong, close = [], []
    rel_count = 0
    for i, row in questions.iterrows():
        if row["family"] == "plane":
            truth = plane_of.get(str(row["render_id"]))
            sep = None
        else:
            rel_count += 1
            got = _truth(row, labels, centroids, side.get(row["volume_id"]))
            truth, sep = (None, None) if got is None else got
            if sep is not None and sep < margin_mm:
                close.append(i)
        if truth is None:
            wrong.append(i)
            continue
        form, answer, direction = row["form"], str(row["answer"]), str(row["direction"])
        ok = ((form == "open" and answer == truth and direction == truth)
              or (form == "closed_true" and answer == "True" and direction == truth)
              or (form == "closed_false" and answer == "False" and direction != truth
                  and (row["family"] == "plane" or direction == _OPPOSITE_TERM.get(truth))))
        if not ok:
            wrong.append(i)
    return {"ground_truth": (len(questions), questions.loc[wrong]),
            "margin": (rel_count, questions.loc[close])}


# ---------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------

RULES = {
    "letters_on_marks": "every letter is nearer its own mark's anchor than any other "
                        "structure's, on every frame of every render",
    "blank_terms": "on the blank background, anatomical terms only when the text states the "
                   "plane and the display convention",
    "no_plane_on_blank": "no plane-naming question on the blank background",
    "text_only": "text-only questions: no image; anatomical terms, or screen terms under the "
                 "stated standard convention",
    "answer_in_name_flag": "answer_in_name marks exactly the questions whose names settle "
                           "the answer",
    "answer_in_name_excluded": "no question whose names settle the answer (the profile "
                               "excludes them)",
    "frame_order_3d": "3D relations only where frame order and 3D centroids agree",
    "ground_truth": "every answer re-derived from the geometry",
    "margin": "every relation at least margin_mm apart along its axis",
}
VALIDITY_COLUMNS = ["rule", "checked", "violations", "description"]


def validity_report(questions: pd.DataFrame, renders: pd.DataFrame,
                    components: pd.DataFrame, volumes: pd.DataFrame | None = None,
                    letters: pd.DataFrame | None = None, margin_mm: float = 0.0,
                    exclude_answer_in_name: bool = True) -> pd.DataFrame:
    """All validity rules as one table: ``rule, checked, violations, description``.

    ``letters`` is stage 02's ``letters.parquet`` (None: the letters rule reports 0 checked).
    The report of the demo benchmark has 0 violations; a nonzero count names a defect of the
    generator, to be fixed rather than filtered.
    """
    results: dict[str, tuple[int, pd.DataFrame]] = {}
    results["letters_on_marks"] = (check_letters_on_marks(letters) if letters is not None
                                   else (0, pd.DataFrame()))
    results["blank_terms"] = check_blank_terms(questions, renders, volumes)
    results["no_plane_on_blank"] = check_no_plane_on_blank(questions, renders)
    results["text_only"] = check_text_only(questions, volumes)
    results.update(check_answer_in_name(questions, volumes, exclude_answer_in_name))
    results["frame_order_3d"] = check_frame_order(questions, renders)
    results.update(check_ground_truth(questions, renders, components, volumes, margin_mm))
    return pd.DataFrame([{"rule": rule, "checked": int(results[rule][0]),
                          "violations": int(len(results[rule][1])), "description": RULES[rule]}
                         for rule in RULES if rule in results], columns=VALIDITY_COLUMNS)


# ---------------------------------------------------------------------------------------
# What a reader checks by eye
# ---------------------------------------------------------------------------------------

def read_report(root: str | os.PathLike | None = None) -> pd.DataFrame:
    """Stage 03's ``benchmark/validity.parquet``, with a clear error when it is missing."""
    path = project_paths(root).benchmark / VALIDITY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}; run stage 03 (python -m mislib questions)")
    return pd.read_parquet(path)


def pick_examples(questions: pd.DataFrame, per_source: int = 3) -> pd.DataFrame:
    """A few open questions per source for the gallery, one of each kind where it exists:
    a 2D relation on the scan, a 3D relation, a blank-background relation, a plane question
    (in that order), first by question id so the choice is the same every run."""
    kinds = [("relation_2d", "none"), ("relation_3d", "none"), ("relation_2d", "blank"),
             ("relation_3d", "blank"), ("plane", "none")]
    shown = questions[(questions["form"] == "open") & questions["render_id"].notna()]
    picks = []
    for _, group in shown.sort_values("question_id").groupby("source", sort=True):
        chosen = []
        for family, ablation in kinds:
            hit = group[(group["family"] == family) & (group["ablation"] == ablation)]
            if len(hit) and len(chosen) < per_source:
                chosen.append(hit.iloc[0])
        picks += chosen
    return pd.DataFrame(picks).reset_index(drop=True)


def example_image(row: Mapping[str, Any], renders: pd.DataFrame,
                  benchmark: str | os.PathLike) -> tuple[np.ndarray, str]:
    """The picture a question refers to, as an (H, W, 3) uint8 array, and a caption.

    2D: the rendered image. 3D: the stack's frame where both structures show (the middle of
    the overlap of their frame ranges); when their ranges do not overlap, the frame of each
    side by side. Plane questions of a stack: its middle frame.
    """
    from PIL import Image

    path = Path(benchmark) / str(row["image_path"])
    if row["dims"] == "2d":
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB")), ""
    frames: list[int]
    if row["family"] == "plane" or pd.isna(row["component_a"]):
        frames = [int(row["n_frames"]) // 2]
    else:
        mine = renders[renders["render_id"] == row["render_id"]].set_index("component")
        a, b = mine.loc[row["component_a"]], mine.loc[row["component_b"]]
        lo, hi = max(a["frame_first"], b["frame_first"]), min(a["frame_last"], b["frame_last"])
        frames = [int((lo + hi) // 2)] if lo <= hi else [int(a["letter_frame"]
                                                              if pd.notna(a.get("letter_frame"))
                                                              else a["frame_first"]),
                                                          int(b["letter_frame"]
                                                              if pd.notna(b.get("letter_frame"))
                                                              else b["frame_first"])]
    images = []
    for f in frames:
        with Image.open(path / f"frame_{f:03d}.png") as img:
            images.append(np.asarray(img.convert("RGB")))
    caption = " | ".join(f"frame {f}" for f in frames)
    return np.concatenate(images, axis=1), caption


def example_gallery(questions: pd.DataFrame, renders: pd.DataFrame,
                    benchmark: str | os.PathLike, per_source: int = 3, wrap: int = 58):
    """Per source, a few questions as a reader meets them: image, question text, answer.

    Rows are sources, columns the examples of :func:`pick_examples`; each panel shows the
    image (:func:`example_image`: for a stack the frame where both structures show) above
    the full question text and the answer. Returns a matplotlib Figure.
    """
    import textwrap

    import matplotlib.pyplot as plt

    examples = pick_examples(questions, per_source)
    if examples.empty:
        raise ValueError("no question with an image to show")
    sources = list(dict.fromkeys(examples["source"]))
    fig, axes = plt.subplots(2 * len(sources), per_source,
                             figsize=(3.4 * per_source, 5.4 * len(sources)),
                             gridspec_kw={"height_ratios": [1.0, 0.62] * len(sources)},
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, source in enumerate(sources):
        mine = examples[examples["source"] == source]
        for c, row in enumerate(mine.to_dict("records")):
            image, caption = example_image(row, renders, benchmark)
            top, bottom = axes[2 * r, c], axes[2 * r + 1, c]
            top.imshow(image)
            what = f"{row['family']}, {row['dims']}, {row['convention']}, {row['prompt']}"
            if row["ablation"] == "blank":
                what += ", blank"
            top.set_title(f"{source}\n{what}" + (f"\n{caption}" if caption else ""),
                          fontsize=7)
            body = "\n".join(textwrap.fill(line, wrap) for line in
                             str(row["text"]).splitlines())
            bottom.text(0.0, 1.0, f"{body}\n\nAnswer: {row['answer']}", va="top", ha="left",
                        fontsize=6, family="monospace", transform=bottom.transAxes)
    fig.tight_layout()
    return fig
