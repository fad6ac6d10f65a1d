"""The VLMEvalKit export: TSVs in its stock multiple-choice and yes/no formats, and the 3D class.

``make export`` writes ``benchmark/export/vlmevalkit/`` (``data/README.md``, benchmark/export,
lists the VLMEvalKit loader rules each file relies on):

=========================  ===========================  ======================================
file                       questions                    VLMEvalKit class
=========================  ===========================  ======================================
``MIS-Ground_2D_MCQ.tsv``  open, one image              ``CustomMCQDataset`` (chosen from the
                                                        ``A``/``B`` + ``image`` columns)
``MIS-Ground_2D_YN.tsv``   closed, one image            ``ImageYORNDataset`` (named in the
                                                        config)
``MIS-Ground_3D_MCQ.tsv``  open, a stack                ``MISGroundVideoMCQ`` (ours)
``MIS-Ground_3D_YN.tsv``   closed, a stack              ``MISGroundVideoYORN`` (ours)
``MIS-Ground_TEXT_MCQ.tsv``  text-only, every form      ``CustomTextMCQDataset`` (``A``/``B``,
                                                        no ``image`` column)
=========================  ===========================  ======================================

plus ``mis_ground_vlmeval.py`` (the two 3D classes: the stack goes to the model as a video),
``run_mis_ground.py`` (runs VLMEvalKit's ``run.py`` with those classes registered),
``config.json`` (the five datasets, Qwen3-VL as the model) and ``README.md`` (how to run).

Questions are rewritten for these formats (the ``question`` column; ``question_id`` links
back to ``questions.parquet``):

- the answer instruction line ("End your reply with a line 'Answer: ...'") is dropped: the
  stock prompts add their own ("Please select the correct answer from the options above.");
- open questions lose their inline "Options: ...": the options are the ``A``, ``B``, ...
  columns in the order of ``choices``, and ``answer`` is the letter;
- closed questions ask whether the statement is correct and end with "Please answer yes or
  no."; ``answer`` is ``Yes`` (true statement) or ``No``; in the text-only file they are
  multiple choice with the options ``Yes`` and ``No``;
- a structure's label is written ``label-B`` ("the liver (label-B)", "structure label-B")
  instead of a bare ``B``: VLMEvalKit's option matching (``can_infer_option``) reads any
  whitespace-separated capital letter of a reply as an option letter, and a reply echoing
  "the liver (B)" would otherwise read as option B. The letters drawn on the images stay
  A-F. :func:`rewrite_question` checks that no bare capital letter is left in the text.
"""

from __future__ import annotations

import base64
import csv
import json
import re
import shutil
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from mislib.export._common import ImageCache, input_kind, none

#: VLMEvalKit reads an image field of at most this many characters as another row's index.
REF_MAX = 64
#: name -> (input path, forms, VLMEvalKit class, kind of file)
FILES: dict[str, tuple[str, tuple[str, ...], str, str]] = {
    "MIS-Ground_2D_MCQ": ("image", ("open",), "CustomMCQDataset", "mcq"),
    "MIS-Ground_2D_YN": ("image", ("closed",), "ImageYORNDataset", "yn"),
    "MIS-Ground_3D_MCQ": ("video", ("open",), "MISGroundVideoMCQ", "mcq"),
    "MIS-Ground_3D_YN": ("video", ("closed",), "MISGroundVideoYORN", "yn"),
    "MIS-Ground_TEXT_MCQ": ("text", ("open", "closed"), "CustomTextMCQDataset", "mcq"),
}
#: Columns VLMEvalKit gives a meaning to; question columns of these names are not copied.
RESERVED = {"index", "image", "image_path", "question", "answer", "category", "l2-category",
            "hint", "split", "prediction", "text", "choices", *string.ascii_uppercase}
YES_NO = ("Yes", "No")
# What can_infer_option strips before splitting a reply into whitespace-separated tokens.
_OPTION_PUNCTUATION = re.compile(r"[.()\[\],:;!*#{}]")


def option_tokens(text: str) -> list[str]:
    """The tokens VLMEvalKit's ``can_infer_option`` compares with option letters."""
    return _OPTION_PUNCTUATION.sub(" ", text).split()


def _closed(form: Any) -> bool:
    return str(form).startswith("closed")


def rewrite_question(row: Mapping[str, Any], kind: str) -> str:
    """The question text of ``row`` for a VLMEvalKit file (``kind``: ``"mcq"`` or ``"yn"``).

    Raises
    ------
    ValueError
        When a bare capital letter is left in the rewritten text (it would be read as an
        option letter), naming the question.
    """
    text = str(row["text"])
    lines = [ln for ln in text.split("\n")
             if not re.match(r"\s*End your reply\b", ln) and "'Answer:" not in ln]
    text = " ".join(ln.strip() for ln in lines if ln.strip())
    text = re.sub(r"\s*Options:\s*[^\n]*?\.(?=\s|$)", "", text)
    for side in ("a", "b"):
        letter = none(row.get(f"letter_{side}"))
        if letter is None or len(str(letter)) != 1:
            continue
        letter = str(letter)
        text = text.replace(f"({letter})", f"(label-{letter})")
        text = re.sub(rf"\b([Ss]tructure) {letter}\b", rf"\1 label-{letter}", text)
        # any other bare mention of the letter ("B lies"), but not the article ("A structure")
        article = r"(?!\s+[a-z])" if letter == "A" else ""
        text = re.sub(rf"(?<![\w-]){letter}(?![\w-]){article}", f"label-{letter}", text)
    if _closed(row["form"]):
        text = re.sub(r"\b(t)rue or false\?",
                      lambda m: "Correct?" if m.group(1) == "T" else "correct?", text,
                      flags=re.IGNORECASE)
        if kind == "yn":
            text = f"{text.rstrip()} Please answer yes or no."
    bare = [t for t in option_tokens(text) if len(t) == 1 and t in string.ascii_uppercase]
    if bare:
        raise ValueError(f"question {row.get('question_id')!r}: the VLMEvalKit text keeps bare "
                         f"capital letter(s) {bare}, which its option matching reads as options: "
                         f"{text!r}")
    return text


def options_and_answer(row: Mapping[str, Any], kind: str) -> tuple[list[str], str]:
    """The options (in order; for ``"yn"`` none) and the answer of ``row`` in a VLMEvalKit file.

    Raises
    ------
    ValueError
        When the answer is not one of the question's choices (names the question).
    """
    answer = str(row["answer"])
    if _closed(row["form"]):
        truth = {"true": "Yes", "false": "No"}.get(answer.strip().lower())
        if truth is None:
            raise ValueError(f"question {row.get('question_id')!r}: closed-form answer "
                             f"{answer!r} is not True/False")
        if kind == "yn":
            return [], truth
        return list(YES_NO), "A" if truth == "Yes" else "B"
    choices = [str(c) for c in (row["choices"] if row["choices"] is not None else [])]
    folded = [c.strip().casefold() for c in choices]
    if answer.strip().casefold() not in folded:
        raise ValueError(f"question {row.get('question_id')!r}: answer {answer!r} is not one of "
                         f"its choices {choices}")
    if len(choices) > 26:
        raise ValueError(f"question {row.get('question_id')!r}: more than 26 choices")
    return choices, string.ascii_uppercase[folded.index(answer.strip().casefold())]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def write_vlmevalkit(questions: pd.DataFrame, benchmark_dir: Path, out_dir: Path,
                     progress: bool = True) -> dict[str, Any]:
    """Write the five TSVs, the 3D dataset classes, the launcher, the config and a README.

    ``index`` is the question's row number in ``questions.parquet`` (unique across files).
    An image already written in the same file is stored as the ``index`` of that row, which
    VLMEvalKit resolves on loading; a stack is a JSON list of base64 PNG frames.

    Returns
    -------
    dict with ``files`` (name -> path) and ``rows`` (name -> number of rows).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    records = questions.to_dict("records")
    images = ImageCache(benchmark_dir)
    extra = [c for c in questions.columns if c not in RESERVED]
    files, rows_out = {}, {}
    for name, (kind_in, forms, _cls, kind) in FILES.items():
        picked = [i for i, r in enumerate(records)
                  if input_kind(r) == kind_in and ("closed" if _closed(r["form"]) else "open")
                  in forms]
        if not picked:
            continue
        prepared = []
        for i in picked:
            row = records[i]
            options, answer = options_and_answer(row, kind)
            prepared.append((i, row, rewrite_question(row, kind), options, answer))
        n_opt = max(len(p[3]) for p in prepared)
        letters = list(string.ascii_uppercase[:n_opt])
        columns = ["index", *(["image"] if kind_in != "text" else []), "question", "answer",
                   *letters, "category", "l2-category", "question_id", "source_answer",
                   *[c for c in extra if c not in ("question_id",)],
                   *(["render_path"] if kind_in != "text" else [])]
        target = out_dir / f"{name}.tsv"
        tmp = target.with_suffix(".tsv.tmp")
        first: dict[str, int] = {}
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, delimiter="\t", quoting=csv.QUOTE_MINIMAL,
                                lineterminator="\n")
            writer.writerow(columns)
            for i, row, question, options, answer in tqdm(prepared, desc=f"export {name}",
                                                          unit="question",
                                                          disable=not progress):
                cells: dict[str, Any] = {"index": i, "question": question, "answer": answer,
                                         "category": row["family"],
                                         "l2-category": row["ablation"],
                                         "question_id": row["question_id"],
                                         "source_answer": row["answer"]}
                for k, letter in enumerate(letters):
                    cells[letter] = options[k] if k < len(options) else ""
                if kind_in != "text":
                    path = str(row["image_path"])
                    cells["render_path"] = path
                    if path in first:
                        cells["image"] = str(first[path])
                    else:
                        first[path] = i
                        data = images.of_row(row)
                        cells["image"] = (json.dumps([_b64(d) for d in data]) if kind_in == "video"
                                          else _b64(data[0]))
                for c in extra:
                    if c != "question_id":
                        value = none(row[c])
                        if isinstance(value, np.ndarray | list | tuple):
                            value = json.dumps([str(v) for v in value])
                        cells[c] = "" if value is None else value
                writer.writerow([cells[c] for c in columns])
        tmp.replace(target)
        files[name], rows_out[name] = target, len(prepared)
    shutil.copyfile(Path(__file__).with_name("vlmeval_dataset.py"),
                    out_dir / "mis_ground_vlmeval.py")
    (out_dir / "run_mis_ground.py").write_text(_LAUNCHER)
    config = {"model": {"Qwen3-VL-8B-Instruct": {"class": "Qwen3VLChat",
                                                 "model_path": "Qwen/Qwen3-VL-8B-Instruct"}},
              "data": {name: {"class": FILES[name][2], "dataset": name} for name in files}}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "README.md").write_text(_readme(rows_out))
    return {"files": files, "rows": rows_out, "dir": out_dir}


def read_tsv(path: str | Path) -> pd.DataFrame:
    """A TSV as VLMEvalKit's ``load`` reads it (``pandas.read_csv(sep="\\t")``)."""
    return pd.read_csv(path, sep="\t")


def resolve_images(tsv: pd.DataFrame) -> list[list[bytes]]:
    """Each row's image bytes, resolving index references as ``ImageBaseDataset`` does."""
    raw = {str(k): ("" if pd.isna(v) else str(v)) for k, v in zip(tsv["index"], tsv["image"],
                                                                  strict=True)}
    out = []
    for idx in tsv["index"].astype(str):
        value = raw[idx]
        if 0 < len(value) <= REF_MAX:
            value = raw[value]
            if len(value) <= REF_MAX:
                raise ValueError(f"TSV row {idx}: image reference to a row without an image")
        if value.startswith("["):
            out.append([base64.b64decode(v) for v in json.loads(value)])
        else:
            out.append([base64.b64decode(value)] if value else [])
    return out


def check_vlmevalkit(questions: pd.DataFrame, benchmark_dir: Path, out_dir: Path
                     ) -> dict[str, Any]:
    """Read every TSV back the way VLMEvalKit does and check it against ``questions``.

    Checks the column rules VLMEvalKit's loaders apply (see ``data/README.md``): which class
    the columns select, ``Yes``/``No`` answers, answer letters among the row's options, no
    bare capital letter in a question, every question in exactly one file, and every image
    byte (index references resolved). Raises ``AssertionError`` naming the file and
    question of the first failure; returns the rows per file.
    """
    by_id = {q["question_id"]: q for q in questions.to_dict("records")}
    images = ImageCache(benchmark_dir, size=256)
    seen: dict[str, str] = {}
    counts = {}
    for name, (kind_in, _forms, _cls, kind) in FILES.items():
        path = out_dir / f"{name}.tsv"
        if not path.is_file():
            continue
        tsv = read_tsv(path)
        counts[name] = len(tsv)
        letters = [c for c in tsv.columns if len(c) == 1 and c in string.ascii_uppercase]
        assert "question" in tsv.columns, f"{name}: no question column"
        if kind == "mcq":  # build_dataset: A and B -> Custom(Text)MCQDataset
            assert {"A", "B"} <= set(letters), f"{name}: no A/B option columns"
            assert ("image" in tsv) == (kind_in != "text"), f"{name}: image column rule"
        else:
            assert letters == [], f"{name}: a yes/no file with option columns {letters}"
            assert set(tsv["answer"]) <= set(YES_NO), f"{name}: answers other than Yes/No"
        assert "image_path" not in tsv, f"{name}: an image_path column (VLMEvalKit reads it)"
        resolved = resolve_images(tsv) if "image" in tsv else [[] for _ in range(len(tsv))]
        assert len(tsv) == len(resolved)
        for row, got in zip(tsv.to_dict("records"), resolved, strict=True):
            qid = row["question_id"]
            assert qid in by_id, f"{name}: question {qid} not in questions.parquet"
            assert qid not in seen, f"{name}: question {qid} also in {seen.get(qid)}"
            seen[qid] = name
            q = by_id[qid]
            bare = [t for t in option_tokens(row["question"])
                    if len(t) == 1 and t in string.ascii_uppercase]
            assert not bare, f"{name}, question {qid}: bare letters {bare} in the question"
            options, answer = options_and_answer(q, kind)
            assert str(row["answer"]) == answer, f"{name}, question {qid}: answer differs"
            if kind == "mcq":
                got_opts = [str(row[c]) for c in letters if not pd.isna(row[c])]
                assert got_opts == options, f"{name}, question {qid}: options {got_opts}"
                assert answer in letters[:len(options)], f"{name}, question {qid}: answer letter"
            assert got == images.of_row(q), f"{name}, question {qid}: image bytes differ"
    missing = set(by_id) - set(seen)
    assert not missing, f"questions in no TSV, e.g. {sorted(missing)[:3]}"
    return {"tsv_rows": counts}


_LAUNCHER = '''"""Run VLMEvalKit's run.py with the MIS-Ground 3D dataset classes registered.

Usage (from a VLMEvalKit checkout, with this folder's TSVs copied into $LMUData):

    python /path/to/export/vlmevalkit/run_mis_ground.py --config /path/to/config.json \\
        --judge exact_matching

Arguments are passed to run.py unchanged; VLMEVALKIT names the checkout if it is not the
current folder.
"""

import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mis_ground_vlmeval  # noqa: E402,F401  (adds MISGroundVideoMCQ/YORN to vlmeval.dataset)

checkout = os.environ.get("VLMEVALKIT", os.getcwd())
sys.argv = [os.path.join(checkout, "run.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def _readme(rows: Mapping[str, int]) -> str:
    table = "\n".join(f"| `{name}.tsv` | {n} | `{FILES[name][2]}` |" for name, n in rows.items())
    return f"""# MIS-Ground for VLMEvalKit (written by `make export`)

| file | rows | VLMEvalKit class |
|---|---|---|
{table}

1. Copy the `.tsv` files into VLMEvalKit's data folder (`$LMUData`, by default `~/LMUData`).
2. From a VLMEvalKit checkout (opencv-python and qwen-vl-utils installed, as Qwen3-VL needs):

       python /path/to/this/folder/run_mis_ground.py --config /path/to/this/folder/config.json \\
           --judge exact_matching

   `config.json` names Qwen3-VL-8B-Instruct (`Qwen3VLChat`); put any VLMEvalKit model there.
   `--judge exact_matching` keeps the scoring rule-based: option letters by `can_infer`,
   yes/no by `YOrN_Extraction`, no LLM judge.

The 2D and text files also load without the launcher (`run.py --data MIS-Ground_2D_MCQ`
picks `CustomMCQDataset` from their columns; the 2D yes/no file needs the config, which names
`ImageYORNDataset`). The 3D files need `mis_ground_vlmeval.py`: it writes each stack's
frames once as a lossless video (PNG frames in AVI at 2 frames per second, the rate at which
VLMEvalKit's Qwen3-VL wrapper samples a video by default) and hands it to the model, so
Qwen3-VL sees every frame, in order, as one video (decord reads it; keep it installed).

Structure labels are written `label-B` in the questions (the images show the bare letter) so
that a reply echoing a label is not read as an option letter. `question_id` links each row to
`questions.parquet`; `source_answer` is the original answer (True/False or the option).
"""
