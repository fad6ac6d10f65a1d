"""mislib.answers: the answer parser on adversarial outputs."""

from __future__ import annotations

import doctest

import pandas as pd
import pytest

from mislib import answers
from mislib.answers import is_correct, parse_answer
from mislib.scoring import rescore

ANATOMICAL = {"question_id": "q-ana", "family": "relation_2d", "form": "open",
              "terminology": "anatomical", "choices": ["superior", "inferior"],
              "answer": "superior", "letter_a": "A", "letter_b": "B",
              "component_a": "liver", "component_b": "kidney_left"}
COLLOQUIAL = {"question_id": "q-col", "family": "relation_2d", "form": "open",
              "terminology": "colloquial", "choices": ["to the left", "to the right"],
              "answer": "to the left", "letter_a": "C", "letter_b": "D"}
THROUGH = {"question_id": "q-3d", "family": "relation_3d", "form": "open",
           "terminology": "colloquial", "choices": ["in an earlier frame", "in a later frame"],
           "answer": "in a later frame"}
CLOSED = {"question_id": "q-tf", "family": "relation_2d", "form": "closed_true",
          "terminology": "anatomical", "choices": ["True", "False"], "answer": "True"}
PLANE = {"question_id": "q-pl", "family": "plane", "form": "open", "terminology": None,
         "choices": ["axial", "coronal", "sagittal"], "answer": "axial"}
LETTERS = {"question_id": "q-let", "family": "relation_2d", "form": "open",
           "terminology": "anatomical", "choices": ["A", "B", "C"], "answer": "A"}

# (question, model output, expected value, expected status)
CASES = [
    # plain and declared answers
    (ANATOMICAL, "superior", "superior", "ok"),
    (ANATOMICAL, "Superior.", "superior", "ok"),
    (ANATOMICAL, "ANSWER: INFERIOR", "inferior", "ok"),
    (ANATOMICAL, "Answer = inferior", "inferior", "ok"),
    (ANATOMICAL, "Answer:\n\nSuperior", "superior", "ok"),
    (ANATOMICAL, "Answer: cranial", "superior", "ok"),
    (ANATOMICAL, "Answer: it lies caudally", "inferior", "ok"),
    # the last declared answer wins; explanations after it do not count
    (ANATOMICAL, "Answer: superior\nAnswer: inferior", "inferior", "ok"),
    (ANATOMICAL, "The answer is inferior. Wait, actually the answer is superior.",
     "superior", "ok"),
    (ANATOMICAL, "Answer: inferior\n\nExplanation: it is not superior.", "inferior", "ok"),
    (ANATOMICAL, "Answer: superior.\n\nNote: some might say inferior.", "superior", "ok"),
    # negations
    (ANATOMICAL, "It is not inferior; it is superior.", "superior", "ok"),
    (ANATOMICAL, "The answer is superior, not inferior.", "superior", "ok"),
    (ANATOMICAL, "I think that it is inferior to B, rather than superior.", "inferior", "ok"),
    (ANATOMICAL, "The liver isn't superior to the kidney.", None, "unparseable"),
    (ANATOMICAL, "Answer: Neither superior nor inferior", None, "unparseable"),
    (CLOSED, "Answer: not true", "False", "ok"),
    (CLOSED, "Answer: Not correct", "False", "ok"),
    (CLOSED, "No, it is not.", "False", "ok"),
    (PLANE, "It's not axial, it's coronal.", "coronal", "ok"),
    (PLANE, "This is a coronal slice, not sagittal.", "coronal", "ok"),
    (COLLOQUIAL, "Answer: right, not left", "to the right", "ok"),
    # both options named
    (ANATOMICAL, "Answer: superior or inferior", None, "ambiguous"),
    (CLOSED, "Answer: True or False", None, "ambiguous"),
    (CLOSED, "Answer: yes and no", None, "ambiguous"),
    (PLANE, "Axial or coronal", None, "ambiguous"),
    (LETTERS, "Answer: A and B", None, "ambiguous"),
    # the relation stated with B as subject is turned round
    (ANATOMICAL, "Answer: B is inferior to A", "superior", "ok"),
    (ANATOMICAL, "A is superior to B, i.e. B is inferior to A.", "superior", "ok"),
    (ANATOMICAL, "Answer: kidney_left is inferior to liver", "superior", "ok"),
    # markdown, tags, reasoning blocks
    (ANATOMICAL, "**Answer:** *Inferior*", "inferior", "ok"),
    (ANATOMICAL, "## Final Answer\nSuperior", "superior", "ok"),
    (ANATOMICAL, "- **Answer**: inferior\n- Explanation: the liver is above, superior...",
     "inferior", "ok"),
    (ANATOMICAL, "| structure | position |\n|---|---|\n| liver | superior |", "superior", "ok"),
    (ANATOMICAL, "\\boxed{inferior}", "inferior", "ok"),
    (ANATOMICAL, "<answer>superior</answer>", "superior", "ok"),
    (ANATOMICAL, "<think>superior, surely</think>\nAnswer: inferior", "inferior", "ok"),
    (ANATOMICAL, "Hmm, superior.</think>\n\nInferior.", "inferior", "ok"),
    (ANATOMICAL, "<think>\nLet me think. It could be superior.\n", None, "unparseable"),
    (ANATOMICAL, "<|im_start|>assistant\nsuperior<|im_end|>", "superior", "ok"),
    (CLOSED, "**False**", "False", "ok"),
    (LETTERS, "Answer: **B**", "B", "ok"),
    # other languages and their punctuation
    (ANATOMICAL, "Réponse : inferior", "inferior", "ok"),
    (ANATOMICAL, "Respuesta: superior", "superior", "ok"),
    (ANATOMICAL, "Antwort: superior", "superior", "ok"),
    (ANATOMICAL, "答案：superior", "superior", "ok"),
    (ANATOMICAL, "答案是inferior", "inferior", "ok"),
    (ANATOMICAL, "Answer：inferior。", "inferior", "ok"),
    (ANATOMICAL, "Answer: «inférieur»", None, "unparseable"),
    (CLOSED, "答案：正确", "True", "ok"),
    (CLOSED, "答案：不正确", "False", "ok"),
    (CLOSED, "Respuesta: Verdadero", "True", "ok"),
    (CLOSED, "Réponse : faux", "False", "ok"),
    (CLOSED, "Answer：False", "False", "ok"),
    # truth words and their synonyms
    (CLOSED, "Yes.", "True", "ok"),
    (CLOSED, "No", "False", "ok"),
    (CLOSED, "Nope", "False", "ok"),
    (CLOSED, "That is incorrect.", "False", "ok"),
    (CLOSED, "No doubt, true", "True", "ok"),
    (CLOSED, "Answer: The statement is false because A is inferior to B.", "False", "ok"),
    # colloquial terms, frames and planes with synonyms
    (COLLOQUIAL, "Answer: left", "to the left", "ok"),
    (COLLOQUIAL, "It is on the right side.", "to the right", "ok"),
    (COLLOQUIAL, "Answer: Right-hand side", "to the right", "ok"),
    (THROUGH, "Answer: later", "in a later frame", "ok"),
    (THROUGH, "Answer: earlier frame", "in an earlier frame", "ok"),
    (THROUGH, "It appears in a later frame.", "in a later frame", "ok"),
    (PLANE, "This is a transverse slice.", "axial", "ok"),
    (PLANE, "Answer: frontal", "coronal", "ok"),
    (PLANE, "Answer: parasagittal", "sagittal", "ok"),
    # the other terminology's words are not this question's options
    (ANATOMICAL, "Answer: above", None, "unparseable"),
    (COLLOQUIAL, "Answer: anterior", None, "unparseable"),
    # letters only as whole upper-case tokens in an answer context, never the article
    (LETTERS, "Answer: A", "A", "ok"),
    (LETTERS, "The answer is B.", "B", "ok"),
    (LETTERS, "Answer: (C)", "C", "ok"),
    (LETTERS, "Answer: option C", "C", "ok"),
    (LETTERS, "(B)", "B", "ok"),
    (LETTERS, "A", "A", "ok"),
    (LETTERS, "Answer: a", None, "unparseable"),
    (LETTERS, "A structure is visible near the top.", None, "unparseable"),
    (LETTERS, "Answer: A structure", None, "unparseable"),
    (LETTERS, "Final answer: D", None, "unparseable"),
    # an echoed instruction quotes the answer format: an example, not an answer
    (CLOSED, "Is it true? End your reply with a line 'Answer: True' or 'Answer: False'.",
     None, "ambiguous"),
    (ANATOMICAL, "Options: superior, inferior.\nEnd your reply with a line 'Answer: <option>' "
     "naming one option.", None, "ambiguous"),
    (CLOSED, "End your reply with a line 'Answer: True' or 'Answer: False'.\n\nFalse",
     "False", "ok"),
    (ANATOMICAL, "'Answer: superior'", "superior", "ok"),
    # empty and very long output
    (ANATOMICAL, "", None, "unparseable"),
    (ANATOMICAL, "   \n\t ", None, "unparseable"),
    (ANATOMICAL, None, None, "unparseable"),
    (ANATOMICAL, float("nan"), None, "unparseable"),
    (ANATOMICAL, "I don't know", None, "unparseable"),
    (ANATOMICAL, "blah " * 20_000 + "Answer: inferior", "inferior", "ok"),
    (ANATOMICAL, "superior " * 5_000, "superior", "ok"),
    (ANATOMICAL, ("The image is hard to read. " * 3_000) + "\nsuperior", "superior", "ok"),
]


@pytest.mark.parametrize(("question", "text", "value", "status"), CASES,
                         ids=[f"{i:02d}" for i in range(len(CASES))])
def test_parse_answer_reads_adversarial_outputs(question, text, value, status):
    assert parse_answer(text, question) == (value, status)


def test_parse_answer_returns_the_question_spelling_of_the_option():
    value, status = parse_answer("Answer: LEFT", COLLOQUIAL)
    assert (value, status) == ("to the left", "ok")
    assert value in COLLOQUIAL["choices"]


def test_parse_answer_rejects_a_question_of_unknown_family():
    with pytest.raises(ValueError, match="unknown family"):
        parse_answer("superior", {**ANATOMICAL, "family": "volume_3d"})


def test_parse_answer_falls_back_to_the_default_options_without_choices():
    question = {k: v for k, v in CLOSED.items() if k != "choices"}
    assert parse_answer("Yes", question) == ("True", "ok")


def test_is_correct_counts_only_ok_parses_naming_the_answer():
    assert is_correct("superior", "ok", ANATOMICAL)
    assert not is_correct("inferior", "ok", ANATOMICAL)
    assert not is_correct("superior", "ambiguous", ANATOMICAL)
    assert not is_correct(None, "unparseable", ANATOMICAL)
    assert is_correct("to the left", "ok", {**COLLOQUIAL, "answer": "To the left"})


def test_a_question_without_letters_is_read_by_the_names_its_text_uses():
    # the scan without a visual prompt names structures only: "the left kidney", not "(B)"
    bare = {**ANATOMICAL, "letter_a": None, "letter_b": None, "name_a": "liver",
            "name_b": "left kidney", "prompt": "none"}
    turned = "Answer: the left kidney is inferior to the liver"
    assert parse_answer(turned, bare) == ("superior", "ok")
    assert parse_answer("Answer: the liver lies superior to the left kidney", bare) == \
        ("superior", "ok")
    questions = pd.DataFrame([{**bare, "choices": list(bare["choices"])}])
    responses = pd.DataFrame([{"run_id": "r", "model": "m", "arm": "baseline",
                               "question_id": bare["question_id"], "trial": 0,
                               "raw_text": turned}])
    out = rescore(responses, questions, progress=False)  # re-scoring sees the names too
    assert out["parsed"].tolist() == ["superior"] and out["correct"].tolist() == [True]


@pytest.mark.parametrize(("text", "expected"), [
    ("Answer: The left cerebral white matter lies to the right of the right putamen.",
     "to the right"),
    ("Left_Cerebral_White_Matter (A) is left of Right_Putamen (B). Answer: to the left",
     "to the left"),
])
def test_direction_words_inside_structure_names_are_not_answers(text, expected):
    question = {"question_id": "q-names", "family": "relation_2d", "form": "open",
                "terminology": "colloquial", "choices": ["to the left", "to the right"],
                "component_a": "Left_Cerebral_White_Matter", "component_b": "Right_Putamen",
                "name_a": "left cerebral white matter", "name_b": "right putamen",
                "letter_a": "A", "letter_b": "B"}
    assert parse_answer(text, question) == (expected, "ok")


def test_docstring_examples_run():
    assert doctest.testmod(answers).failed == 0
