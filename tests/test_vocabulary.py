"""mislib.vocabulary: one home for factors, levels, arms, statuses and contrast names."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pandas as pd
import pytest

from mislib import vocabulary as V


def test_ordered_puts_known_levels_in_benchmark_order_then_unknown_ones_sorted():
    assert V.ordered("prompt", ["point", "zeta", None, "none", "alpha", "mask"]) == [
        "none", "mask", "point", "alpha", "zeta"]


def test_ordered_sorts_the_levels_of_a_factor_without_a_fixed_order():
    assert V.ordered("model", pd.Series(["m2", "m1", np.nan, "m2"])) == ["m1", "m2"]


def test_every_factor_but_model_has_a_level_order():
    assert set(V.LEVEL_ORDER) == set(V.FACTORS) - {"model"}


def test_the_prompt_levels_include_the_no_prompt_baseline_first():
    assert V.LEVEL_ORDER["prompt"][0] == V.NO_PROMPT == "none"


def test_the_arms_include_greedy_beside_baseline_and_semsam():
    assert set(V.ARMS) == {"baseline", "semsam", "greedy"}


def test_question_factors_are_the_factors_that_are_not_trial_factors():
    assert set(V.QUESTION_FACTORS) | set(V.TRIAL_FACTORS) == set(V.FACTORS)
    assert not set(V.QUESTION_FACTORS) & set(V.TRIAL_FACTORS)


def test_model_factors_leave_out_only_the_background_that_the_ablation_determines():
    assert set(V.FACTORS) - set(V.MODEL_FACTORS) == {"background"}


def test_question_factors_are_columns_of_questions_parquet():
    from mislib.questions import QUESTION_COLUMNS

    assert set(V.QUESTION_FACTORS) <= set(QUESTION_COLUMNS)


@pytest.mark.parametrize(("value", "missing"), [
    (None, True), (float("nan"), True), (np.float64("nan"), True), (0.0, False), ("", False),
    ("nan", False), (math.inf, False)])
def test_is_missing_is_true_only_for_none_and_float_nan(value, missing):
    assert V.is_missing(value) is missing


def test_cell_names_list_the_factors_in_the_order_given():
    assert V.cell_name(prompt="box", terminology="colloquial") == \
        "p[prompt=box,terminology=colloquial]"
    assert V.cell_name(dims="3d") == "p[dims=3d]"


def test_difference_names_join_two_cells_with_a_minus():
    assert V.difference_name("p[dims=3d]", "p[dims=2d]") == "p[dims=3d] - p[dims=2d]"


def test_structure_pair_is_order_free_and_names_a_missing_structure_none():
    a = pd.Series(["spleen", "liver", None])
    b = pd.Series(["liver", "spleen", None])
    assert V.structure_pair(a, b).tolist() == ["liver|spleen", "liver|spleen", "none"]


def test_the_stages_use_the_vocabulary_instead_of_their_own_copies():
    from mislib import analysis, answers, questions, render, scoring, simulate

    assert questions.FAMILIES is V.FAMILIES and answers.FAMILIES is V.FAMILIES
    assert questions.PROMPTS is V.PROMPTS and render.PROMPTS is V.PROMPTS
    assert analysis.LEVEL_ORDER is V.LEVEL_ORDER
    assert scoring.FACTORS is V.QUESTION_FACTORS
    assert simulate.LEVELS["prompt"] is V.PROMPTS


def test_docstring_examples_run():
    assert doctest.testmod(V).failed == 0
