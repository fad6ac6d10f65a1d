"""Simulated benchmark questions and model responses drawn from KNOWN effects.

The factor model of stage 07 is checked by simulation: draw questions shaped like stage 03's
``questions.parquet``, give every (model, arm, question) a logit built from known fixed effects
and random intercepts, draw ``n_trials`` Bernoulli answers and write them as stage 04's
``responses.parquet``. Refitting must then recover the effects (``tests/test_analysis.py``),
and ``bench/bench_analysis.py`` times the fit at the paper's scale (33,864 questions).

The default effects are shaped like the paper's findings (:data:`DEFAULT_MAIN`,
:data:`DEFAULT_INTERACTIONS`; every visual prompt is drawn, ``none`` included), so stage 07's
recovery study (:mod:`mislib.analysis.recovery`) plants what the paper reports.

Effects live on the logit scale as sum-to-zero deviations, the same coding the factor model
uses, so the fitted ``factor_effects.parquet`` and :attr:`SimulatedStudy.truth` share term
names: ``Intercept``, ``<factor>[<level>]`` and ``<f1>[<l1>]:<f2>[<l2>]``. A factor that does
not apply to a question (no visual prompt on a text-only question, no direction terminology
on a plane-naming question) is null there and contributes nothing, again as in the model.

>>> study = simulate_study(n_questions=200, n_trials=2, seed=1)
>>> sorted(study.responses["arm"].unique())
['baseline', 'semsam']
>>> bool(study.responses["correct"].isin([True, False]).all())
True
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mislib.paths import QUESTIONS_FILE, RESPONSES_FILE, RUN_FILE, SCORED_FILE, project_paths
from mislib.vocabulary import ABLATIONS, DIMS, LEVEL_ORDER, NO_PROMPT, structure_pair

# The paper's benchmark: 33,864 questions over 1,160 volumes, 77 structures (67 CT, 10 MRI).
PAPER_N_QUESTIONS = 33_864
PAPER_N_VOLUMES = 1_160
N_CT_STRUCTURES = 67
N_MRI_STRUCTURES = 10
CT_SHARE = 0.84

#: The question factors' levels (the benchmark's, :data:`mislib.vocabulary.LEVEL_ORDER`).
LEVELS: dict[str, tuple[str, ...]] = {f: lv for f, lv in LEVEL_ORDER.items() if f != "arm"}

# Default effects (logit scale, before centring), shaped like the paper's findings (the
# claims of mislib.claims, at an intercept of ~0.4, i.e. ~60 % correct):
# - SemSam helps (53.4 % -> 66.5 %: ~+0.55 logit), more for the later model (arm x model);
# - convention x terminology reverses: anatomical terms win in the standard view (69.4 vs
#   57.8 %) and lose in the storage view (50.2 vs 59.9 %);
# - visual prompt x terminology: with no prompt (``none``) anatomical terms win by far
#   (75.3 vs 45.1 %); a box helps colloquial terms (+8.2) and hurts anatomical ones (-13.3);
# - the text-only prior: without the image anatomical terms still score 69.3 % (74.0 with
#   it) and colloquial ones fall to 40.4 % (ablation x terminology);
# - plane naming is easiest (77.6 %), cross-slice (3D) relations harder than in-plane (2D)
#   (68.0 vs 71.7 %), 3D stacks a little below 2D slices (56.9 vs 58.8 %).
DEFAULT_MAIN: dict[str, dict[str, float]] = {
    "arm": {"baseline": -0.275, "semsam": 0.275},
    "modality": {"CT": 0.1, "MRI": -0.1},
    "plane": {"axial": 0.15, "coronal": 0.0, "sagittal": -0.15},
    "dims": {"2d": 0.05, "3d": -0.05},
    "convention": {"standard": 0.18, "storage": -0.18},
    "prompt": {"none": 0.05, "mask": 0.1, "box": -0.05, "point": -0.1},
    "terminology": {"anatomical": 0.1, "colloquial": -0.1},
    "form": {"open": -0.2, "closed_true": 0.1, "closed_false": 0.1},
    "family": {"relation_2d": -0.05, "relation_3d": -0.2, "plane": 0.25},
    "ablation": {"none": 0.2, "text_only": -0.1, "blank": -0.1},
}
DEFAULT_INTERACTIONS: dict[tuple[str, str], dict[tuple[str, str], float]] = {
    ("convention", "terminology"): {("standard", "anatomical"): 0.25,
                                    ("standard", "colloquial"): -0.25,
                                    ("storage", "anatomical"): -0.25,
                                    ("storage", "colloquial"): 0.25},
    ("prompt", "terminology"): {("none", "anatomical"): 0.45, ("none", "colloquial"): -0.45,
                                ("box", "anatomical"): -0.25, ("box", "colloquial"): 0.25},
    ("ablation", "terminology"): {("text_only", "anatomical"): 0.4,
                                  ("text_only", "colloquial"): -0.4},
}
#: The planted effects that carry the paper's findings (terms of :attr:`SimulatedStudy.truth`
#: as the default effects name them), for the recovery study's figure.
HEADLINE_TERMS = (
    "arm[semsam]", "convention[standard]:terminology[anatomical]",
    "convention[storage]:terminology[anatomical]", "prompt[none]:terminology[anatomical]",
    "prompt[box]:terminology[anatomical]", "ablation[text_only]:terminology[anatomical]",
    "family[plane]", "family[relation_3d]",
)
DEFAULT_ARM_MODEL_GAIN = 0.15  # extra SemSam gain (logit) for each later model in the list
DEFAULT_SD = {"question": 0.6, "pair": 0.3, "volume": 0.2}

ANATOMICAL_TERMS = {"R/L": ("right", "left"), "A/P": ("anterior", "posterior"),
                    "S/I": ("superior", "inferior")}
COLLOQUIAL_INPLANE = (("above", "below"), ("to the left", "to the right"))
COLLOQUIAL_THROUGH = ("in an earlier frame", "in a later frame")
PLANE_AXES = {"axial": ("R/L", "A/P", "S/I"), "coronal": ("R/L", "S/I", "A/P"),
              "sagittal": ("A/P", "S/I", "R/L")}  # in-plane, in-plane, through-plane


@dataclass
class SimulatedStudy:
    """Questions, responses and the effects they were drawn from.

    Attributes
    ----------
    questions : DataFrame, one row per question (stage-03 columns).
    responses : DataFrame, one row per (model, arm, question, trial) (stage-04 columns).
    truth : DataFrame with ``term`` and ``value``: the fixed effects on the logit scale
        (sum-to-zero deviations), named like ``factor_effects.parquet``.
    sd : dict, standard deviation of the random intercepts (question, pair, volume).
    """

    questions: pd.DataFrame
    responses: pd.DataFrame
    truth: pd.DataFrame
    sd: dict[str, float] = field(default_factory=dict)


def _centre(effects: Mapping[str, float], levels: Sequence[str]) -> dict[str, float]:
    values = np.array([float(effects.get(lv, 0.0)) for lv in levels])
    return dict(zip(levels, values - values.mean(), strict=True))


def _double_centre(effects: Mapping[tuple[str, str], float], levels1: Sequence[str],
                   levels2: Sequence[str]) -> dict[tuple[str, str], float]:
    grid = np.array([[float(effects.get((a, b), 0.0)) for b in levels2] for a in levels1])
    grid = grid - grid.mean(axis=0, keepdims=True) - grid.mean(axis=1, keepdims=True) + grid.mean()
    return {(a, b): grid[i, j] for i, a in enumerate(levels1) for j, b in enumerate(levels2)}


def simulate_questions(n_questions: int, seed: int = 0, n_volumes: int | None = None,
                       ablation_share: float = 0.2,
                       n_structures: tuple[int, int] = (N_CT_STRUCTURES, N_MRI_STRUCTURES),
                       ) -> pd.DataFrame:
    """Questions in the stage-03 schema (the columns the scorer and the factor model use).

    Parameters
    ----------
    n_questions : number of questions (the paper: 33,864).
    seed : the random seed; the same seed gives the same table.
    n_volumes : volumes to spread them over (default: the paper's ratio, 1,160 per 33,864).
    ablation_share : share of relation questions in the text-only and blank ablations.
    n_structures : (CT, MRI) structures to draw pairs from (the paper: 67 and 10). Fewer
        give each structure pair more questions, as in the paper, in a small simulation.

    Returns
    -------
    DataFrame with ``question_id, render_id, volume_id, source, modality, plane, dims,
    convention, prompt, background, terminology, form, family, ablation, component_a,
    component_b, letter_a, letter_b, direction, axis, text, answer, choices, n_frames,
    image_path, separation_mm``. Text-only questions have no render, image, prompt,
    background or convention; plane-naming questions have no terminology and no second
    structure.
    """
    if min(n_structures) < 2:
        raise ValueError(f"n_structures needs at least 2 per modality, got {n_structures}")
    rng = np.random.default_rng(seed)
    n = int(n_questions)
    if n_volumes is None:
        n_volumes = max(2, round(n * PAPER_N_VOLUMES / PAPER_N_QUESTIONS))
    vol_ids, vol, modality = _draw_volumes(rng, n, n_volumes)
    f = _draw_factors(rng, n, ablation_share)
    is_plane, text_only = f["family"] == "plane", f["ablation"] == "text_only"
    comp_a, comp_b = _draw_structures(rng, modality, is_plane, n_structures)
    axis, direction, choices, answer = _draw_relations(rng, f)

    qid = np.array([f"simq-{i:06d}" for i in range(n)])
    render_id = np.where(text_only, None,
                         np.char.add(np.char.add(vol_ids[vol], "-r"),
                                     np.char.mod("%05d", np.arange(n)))).astype(object)
    letters = np.array(list("ABCDEF"))
    bare = f["prompt"] == NO_PROMPT  # a scan without marks names structures by name only
    text = [(f"Which plane is this image? ({comp_a[i]})" if is_plane[i]
             else f"Is {comp_a[i]} {direction[i]} relative to {comp_b[i]}?")
            for i in range(n)]
    return pd.DataFrame({
        "question_id": qid, "render_id": render_id, "volume_id": vol_ids[vol],
        "source": np.where(modality == "CT", "sim_ct", "sim_mri"), "modality": modality,
        **f, "component_a": comp_a, "component_b": comp_b,
        "letter_a": np.where(text_only | bare, None, letters[rng.integers(0, 3, n)]),
        "letter_b": np.where(text_only | bare | is_plane, None, letters[rng.integers(3, 6, n)]),
        "direction": direction, "axis": axis, "text": text, "answer": answer,
        "choices": choices, "n_frames": np.where(f["dims"] == "3d", 16, 1),
        "image_path": [None if rid is None else
                       (f"stacks/{rid}/" if d == "3d" else f"images/{rid}.png")
                       for rid, d in zip(render_id, f["dims"], strict=True)],
        "separation_mm": np.where(is_plane, np.nan, rng.uniform(10, 80, n)),
    })


def _draw_volumes(rng: np.random.Generator, n: int, n_volumes: int):
    """Volume ids (both modalities present, CT at the paper's share) and each question's."""
    vol_modality = np.where(rng.random(n_volumes) < CT_SHARE, "CT", "MRI")
    vol_modality[:2] = ["CT", "MRI"]  # both modalities even in tiny simulations
    vol_ids = np.array([f"sim_{m.lower()}-v{i:04d}" for i, m in enumerate(vol_modality)])
    vol = rng.integers(0, n_volumes, n)
    return vol_ids, vol, vol_modality[vol]


def _draw_factors(rng: np.random.Generator, n: int,
                  ablation_share: float) -> dict[str, np.ndarray]:
    """Each question's factor levels, null where a factor does not apply (as stage 03)."""
    family = rng.choice(LEVELS["family"], n, p=[0.45, 0.35, 0.20])
    is_plane = family == "plane"
    dims = np.where(family == "relation_3d", "3d",
                    np.where(family == "relation_2d", "2d", rng.choice(DIMS, n)))
    ablation = np.where(
        is_plane, rng.choice(["none", "blank"], n, p=[0.85, 0.15]),
        rng.choice(ABLATIONS, n,
                   p=[1 - ablation_share, ablation_share / 2, ablation_share / 2]))
    text_only = ablation == "text_only"
    plane = rng.choice(LEVELS["plane"], n)
    convention = np.where(text_only, None, rng.choice(LEVELS["convention"], n)).astype(object)
    prompt = rng.choice(LEVELS["prompt"], n)
    # As stage 02 renders it: no unmarked (``none``) prompt on the blank background.
    marked = [p for p in LEVELS["prompt"] if p != NO_PROMPT]
    bare_blank = (prompt == NO_PROMPT) & (ablation == "blank")
    prompt[bare_blank] = rng.choice(marked, int(bare_blank.sum()))
    prompt = np.where(text_only, None, prompt).astype(object)
    background = np.where(text_only, None,
                          np.where(ablation == "blank", "blank", "scan")).astype(object)
    terminology = np.where(is_plane, None, rng.choice(LEVELS["terminology"], n)).astype(object)
    form = rng.choice(LEVELS["form"], n)
    return {"plane": plane, "dims": dims, "convention": convention, "prompt": prompt,
            "background": background, "terminology": terminology, "form": form,
            "family": family, "ablation": ablation}


def _draw_structures(rng: np.random.Generator, modality: np.ndarray, is_plane: np.ndarray,
                     n_structures: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Two different structures of the question's modality (one for a plane question)."""
    pools = {"CT": np.array([f"ct_structure_{j:02d}" for j in range(n_structures[0])]),
             "MRI": np.array([f"mri_structure_{j:02d}" for j in range(n_structures[1])])}
    comp_a = np.empty(len(modality), dtype=object)
    comp_b = np.empty(len(modality), dtype=object)
    for mod, pool in pools.items():
        rows = np.flatnonzero(modality == mod)
        a = rng.integers(0, len(pool), rows.size)
        b = (a + rng.integers(1, len(pool), rows.size)) % len(pool)  # never a == b
        comp_a[rows] = pool[a]
        comp_b[rows] = np.where(is_plane[rows], None, pool[b])
    return comp_a, comp_b


def _draw_relations(rng: np.random.Generator, f: Mapping[str, np.ndarray]):
    """Each question's axis, direction term, options and answer, from its factor levels."""
    n = len(f["family"])
    axis = np.empty(n, dtype=object)
    direction = np.empty(n, dtype=object)
    choices = np.empty(n, dtype=object)
    answer = np.empty(n, dtype=object)
    pick = rng.integers(0, 2, n)
    for i in range(n):
        if f["family"][i] == "plane":
            axis[i] = "plane"
            direction[i] = f["plane"][i]
            options = list(LEVELS["plane"])
        else:
            axes = PLANE_AXES[f["plane"][i]]
            through = f["family"][i] == "relation_3d"
            axis[i] = axes[2] if through else axes[pick[i]]
            if f["terminology"][i] == "anatomical":
                options = list(ANATOMICAL_TERMS[axis[i]])
            elif through:
                options = list(COLLOQUIAL_THROUGH)
            else:
                options = list(COLLOQUIAL_INPLANE[pick[i]])
            direction[i] = options[rng.integers(0, 2)]
        if f["form"][i] == "open":
            choices[i] = options
            answer[i] = direction[i]
        else:
            choices[i] = ["True", "False"]
            answer[i] = "True" if f["form"][i] == "closed_true" else "False"
    return axis, direction, choices, answer

def default_effects(models: Sequence[str], arms: Sequence[str] = ("baseline", "semsam"),
                    ) -> tuple[dict[str, dict[str, float]], dict[tuple[str, str], dict]]:
    """The default main effects and interactions (centred later), including arm × model."""
    main = {k: dict(v) for k, v in DEFAULT_MAIN.items()}
    main["model"] = {m: 0.3 * (i - (len(models) - 1) / 2) for i, m in enumerate(models)}
    inter = {k: dict(v) for k, v in DEFAULT_INTERACTIONS.items()}
    if len(arms) > 1 and len(models) > 1:
        inter[("arm", "model")] = {(arms[-1], m): DEFAULT_ARM_MODEL_GAIN * i
                                   for i, m in enumerate(models)}
    return main, inter


def simulate_study(n_questions: int = 2000, n_trials: int = 5,
                   models: Sequence[str] = ("sim-vlm-small", "sim-vlm-large"),
                   arms: Sequence[str] = ("baseline", "semsam"), seed: int = 0,
                   intercept: float = 0.4,
                   main: Mapping[str, Mapping[str, float]] | None = None,
                   interactions: Mapping[tuple[str, str], Mapping] | None = None,
                   sd: Mapping[str, float] | None = None, unparseable_rate: float = 0.05,
                   questions: pd.DataFrame | None = None) -> SimulatedStudy:
    """Simulate a whole run: questions, then ``n_trials`` answers per (model, arm, question).

    Parameters
    ----------
    n_questions, n_trials : sizes; the paper's run is 33,864 questions × 5 trials × 2 arms.
    models, arms : the models and decoding arms that answer every question.
    seed : random seed (questions use ``seed``, answers ``seed + 1``).
    intercept : logit of accuracy at the average level of every factor.
    main, interactions : effects on the logit scale by factor level (missing levels = 0);
        default :func:`default_effects`. They are centred to sum to zero here.
    sd : standard deviations of the random intercepts ``question``, ``pair``, ``volume``.
    unparseable_rate : share of wrong answers written as text no parser can read.
    questions : reuse these questions instead of simulating new ones.

    Returns
    -------
    SimulatedStudy
    """
    if questions is None:
        questions = simulate_questions(n_questions, seed=seed)
    q = questions.reset_index(drop=True)
    rng = np.random.default_rng(seed + 1)
    d_main, d_inter = default_effects(models, arms)
    main = d_main if main is None else main
    interactions = d_inter if interactions is None else interactions
    sd = dict(DEFAULT_SD if sd is None else sd)
    levels = dict(LEVELS, model=tuple(models), arm=tuple(arms))

    truth = [("Intercept", float(intercept))]
    centred_main = {}
    for factor, eff in main.items():
        centred_main[factor] = _centre(eff, levels[factor])
        truth += [(f"{factor}[{lv}]", v) for lv, v in centred_main[factor].items()]
    centred_inter = {}
    for (f1, f2), eff in interactions.items():
        centred_inter[(f1, f2)] = _double_centre(eff, levels[f1], levels[f2])
        truth += [(f"{f1}[{a}]:{f2}[{b}]", v) for (a, b), v in centred_inter[(f1, f2)].items()]

    # Question-level part of the logit: question factors + random intercepts.
    eta_q = np.full(len(q), float(intercept))
    for factor, eff in centred_main.items():
        if factor in q:
            eta_q += q[factor].map(eff).fillna(0.0).to_numpy(float)
    pair = structure_pair(q["component_a"], q["component_b"])
    for group, keys in (("question", q["question_id"]), ("pair", pair),
                        ("volume", q["volume_id"])):
        codes, uniques = pd.factorize(keys)
        eta_q += rng.normal(0.0, sd.get(group, 0.0), len(uniques))[codes]

    frames = []
    for model in models:
        for arm in arms:
            cell = {"model": model, "arm": arm}
            eta = eta_q + centred_main.get("model", {}).get(model, 0.0) \
                + centred_main.get("arm", {}).get(arm, 0.0)
            for (f1, f2), eff in centred_inter.items():
                a = q[f1] if f1 in q else pd.Series(cell[f1], index=q.index)
                b = q[f2] if f2 in q else pd.Series(cell[f2], index=q.index)
                eta = eta + pd.Series(list(zip(a, b, strict=True))).map(eff).fillna(0.0).to_numpy()
            p = 1.0 / (1.0 + np.exp(-eta))
            correct = rng.random((n_trials, len(q))) < p
            frames.append(_responses(q, model, arm, correct, rng, unparseable_rate, seed))
    responses = pd.concat(frames, ignore_index=True)
    return SimulatedStudy(q, responses, pd.DataFrame(truth, columns=["term", "value"]), sd)


def _responses(q: pd.DataFrame, model: str, arm: str, correct: np.ndarray,
               rng: np.random.Generator, unparseable_rate: float, seed: int) -> pd.DataFrame:
    """Stage-04 rows for one (model, arm): ``correct[trial, question]`` turned into text."""
    n_trials, n_q = correct.shape
    answers = q["answer"].astype(str).to_numpy()
    # A wrong answer is another valid option of the same question.
    wrong = np.array([next((c for c in ch if c != ans), ans)
                      for ch, ans in zip(q["choices"], answers, strict=True)], dtype=object)
    ok = correct.ravel()
    qi = np.tile(np.arange(n_q), n_trials)
    trial = np.repeat(np.arange(n_trials), n_q)
    garbled = ~ok & (rng.random(ok.size) < unparseable_rate)
    parsed = np.where(ok, answers[qi], wrong[qi]).astype(object)
    parsed[garbled] = None
    raw = np.where(garbled, "I cannot tell from this image.",
                   np.char.add(np.char.add("The answer is ", parsed.astype(str)), "."))
    run_id = f"sim-{model}-{arm}"
    return pd.DataFrame({
        "run_id": run_id, "model": model, "arm": arm,
        "question_id": q["question_id"].to_numpy()[qi], "trial": trial,
        "seed": (seed * 1_000_003 + qi * 16 + trial) % (2**31 - 1),
        "raw_text": raw, "parsed": parsed,
        "parse_status": np.where(garbled, "unparseable", "ok"), "correct": ok,
        "n_tokens": rng.integers(3, 40, ok.size), "latency_s": rng.gamma(2.0, 0.05, ok.size),
    })


def scored_table(study: SimulatedStudy) -> pd.DataFrame:
    """What stage 06 writes as ``scored.parquet``: responses joined with the question factors."""
    factors = [c for c in study.questions.columns if c not in ("text", "choices")]
    return study.responses.merge(study.questions[factors], on="question_id", how="left")


def write_study(study: SimulatedStudy, root: str | os.PathLike | None = None,
                scored: bool = False) -> dict[str, list]:
    """Write the study where the pipeline expects it (for running stages 06–07 on it).

    ``data/benchmark/questions.parquet``, one ``data/results/<run_id>/`` per (model, arm) with
    ``run.json`` and ``responses.parquet``, and with ``scored=True`` also
    ``data/analysis/scored.parquet`` (for when stage 06 is not run). Returns the paths.
    """
    paths = project_paths(root)
    paths.benchmark.mkdir(parents=True, exist_ok=True)
    qpath = paths.benchmark / QUESTIONS_FILE
    study.questions.to_parquet(qpath, index=False)
    written = {"questions": [qpath], "responses": []}
    for run_id, rows in study.responses.groupby("run_id", sort=True):
        run_dir = paths.results / str(run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        rows.to_parquet(run_dir / RESPONSES_FILE, index=False)
        meta = {"run_id": run_id, "model": rows["model"].iat[0], "arm": rows["arm"].iat[0],
                "simulated": True, "n_trials": int(rows["trial"].max()) + 1}
        (run_dir / RUN_FILE).write_text(json.dumps(meta, indent=2))
        written["responses"].append(run_dir / RESPONSES_FILE)
    if scored:
        paths.analysis.mkdir(parents=True, exist_ok=True)
        spath = paths.analysis / SCORED_FILE
        scored_table(study).to_parquet(spath, index=False)
        written["scored"] = [spath]
    return written
