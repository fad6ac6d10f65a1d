"""mislib.inference.prompts: what a model is shown for one question."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from mislib.inference.prompts import input_kind, load_media, question_dict, question_prompt
from mislib.smoke import write_smoke_benchmark


def test_load_media_gives_a_picture_a_frame_stack_or_nothing(tmp_path):
    path = write_smoke_benchmark(tmp_path, n_questions=30, seed=2, image_size=40, n_frames=4)
    questions = pd.read_parquet(path).to_dict("records")
    kinds = {input_kind(q): q for q in questions}
    assert set(kinds) == {"text", "image", "video"}
    assert load_media(kinds["text"], path.parent) is None
    image = load_media(kinds["image"], path.parent)
    assert image.mode == "RGB" and image.size == (40, 40)
    stack = load_media(kinds["video"], path.parent)
    assert stack.shape == (4, 40, 40, 3) and stack.dtype == np.uint8


def test_load_media_names_the_missing_file(tmp_path):
    question = {"question_id": "q9", "image_path": "images/none.png", "dims": "2d"}
    with pytest.raises(FileNotFoundError, match=r"q9.*images/none\.png"):
        load_media(question, tmp_path)
    stack = {"question_id": "q8", "image_path": "stacks/r1", "dims": "3d"}
    (tmp_path / "stacks" / "r1").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no frame_"):
        load_media(stack, tmp_path)


def test_question_prompt_appends_the_instruction_with_the_options():
    question = {"text": "Is A superior to B? ", "choices": np.array(["True", "False"])}
    assert question_prompt(question) == "Is A superior to B?"
    assert question_prompt(question, "Answer with one of: {options}.") == \
        "Is A superior to B?\nAnswer with one of: True, False."


def test_a_no_prompt_question_reaches_the_model_with_its_scan_and_names_only(tmp_path):
    from test_questions import make_inputs

    from mislib.questions import generate

    make_inputs(tmp_path, conventions=("standard",), prompts=("none", "mask"))
    questions = generate("demo", root=tmp_path, force=True)
    bench = tmp_path / "data" / "benchmark"
    bare = questions[(questions.prompt == "none") & (questions.family != "plane")]
    for dims, kind in (("2d", "image"), ("3d", "video")):
        q = bare[bare.dims == dims].iloc[0].to_dict()
        assert input_kind(q) == kind and load_media(q, bench) is not None
        text = question_prompt(q, "Answer with one of: {options}.")
        assert f"the {q['name_a']}" in text.lower() and f"the {q['name_b']}" in text.lower()
        assert not re.search(r"\([A-F]\)|[Ss]tructure [A-F]\b|labelled", text)


def test_question_dict_turns_numpy_values_into_python_ones():
    row = {"choices": np.array(["True", "False"]), "n": np.int64(3), "text": "x"}
    out = question_dict(row)
    assert out == {"choices": ["True", "False"], "n": 3, "text": "x"}
    assert type(out["n"]) is int
