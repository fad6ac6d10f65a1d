"""Stage 06: parse model outputs, score them, and summarise accuracy with Bayes@N.

Parsing
-------
:func:`parse_answer` reads one raw model output against the question it answers and
returns ``(value, status)``: ``value`` is one of the question's ``choices`` (spelled as in
``choices``) or ``None``; ``status`` is ``"ok"``, ``"unparseable"`` (no valid option found)
or ``"ambiguous"`` (several different options declared). Both non-``ok`` statuses score
as wrong (:func:`is_correct`) and are counted on their own (``unparseable.parquet``).

The rule, in order:

1. Normalise: Unicode NFKC (full-width ``：`` becomes ``:``), drop reasoning blocks
   (``<think>…</think>``; an unclosed ``<think>`` drops the rest; a lone ``</think>``
   drops what precedes it), drop chat special tokens, unwrap ``\\boxed{…}`` and
   ``<answer>…</answer>``, drop markdown emphasis.
2. Find the **last declared answer**: ``Answer: …`` (also ``Final answer -``,
   ``Réponse :``, ``答案：``) up to the end of its line (or the next line when the
   marker ends its line), or ``the answer is …`` up to the end of its sentence. A
   declaration quoted inside a sentence is an echoed instruction ("end with a line
   'Answer: True' or 'Answer: False'"), not an answer.
   Without any declaration, the last line that names a valid option is read instead
   (letters are never read outside a declaration, except an output that is nothing but
   one upper-case letter, such as ``(B)`` or ``Option C.``).
3. In that segment, find the question's valid options only: True/False with
   yes/no/correct/incorrect synonyms; the direction terms of the question's terminology
   with their synonyms (``cranial`` → superior, ``higher`` → above, ``ventral`` →
   anterior, ...); plane names with synonyms (``transverse`` → axial, ``frontal`` →
   coronal); letters A–F only as whole upper-case tokens, never the article "A".
4. A negated option (``not superior``, ``rather than below``) is dropped; a negated
   truth word is flipped (``not true`` → False). When the segment *starts* with an
   option that is closed off (end, full stop, bracket, "because"), that option is the
   answer. Otherwise the distinct options named decide: one → ok, none → unparseable,
   several → ambiguous. A relation stated with structure B as its subject ("B is
   inferior to A") is turned round, since relation questions ask where A lies relative
   to B; so "A is superior to B, i.e. B is inferior to A" is one answer, not two.

Scoring
-------
:func:`rescore` re-parses every raw output of stage 04 against ``questions.parquet`` (so a
run can be re-scored with a newer parser) and joins the question factors;
:func:`score_runs` is what notebook 06 calls: it reads ``data/results/*/responses.parquet``
and writes ``data/analysis/{scored,bayes_by_factor,semsam_effect,unparseable}.parquet``.

Bayes@N
-------
Accuracy is summarised with Bayes@N (Hariri et al., 2026) as implemented by the
``scorio`` package: per question a Dirichlet(1, ..., 1) prior updated by its N trials, and
the posterior mean ``mu`` and standard deviation ``sigma`` of the average score over the
question set. Credible intervals are scorio's central normal approximation, clipped to
the score's range. The SemSam effect (:func:`semsam_effect`) compares the two arms on the
same questions and trials (they share per-(question, trial) seeds).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import unicodedata
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from mislib.config import is_fresh, stage_params, write_stamp
from mislib.paths import project_paths

PARSE_STATUSES = ("ok", "unparseable", "ambiguous")
FAMILIES = ("relation_2d", "relation_3d", "plane")
TERMINOLOGIES = ("anatomical", "colloquial")

# ----------------------------------------------------------------------------------------
# Option vocabularies. Keys are canonical option names; values are regex fragments matched
# case-insensitively as whole words. Synonyms are those a model plausibly writes for the
# same meaning *within one terminology*: "above" is deliberately not a synonym of
# "superior", because anatomical vs screen-relative wording is the factor being measured.
# ----------------------------------------------------------------------------------------
_TRUTH: dict[str, tuple[str, ...]] = {
    "true": (r"true", r"yes", r"correct", r"accurate", r"vrai", r"verdadero", r"wahr",
             r"vero", r"正确"),
    # "no" only when it stands alone ("No." / "No, ..."), not in "no doubt".
    "false": (r"false", r"no(?=\s*(?:$|[.,;:!)\]]))", r"nope", r"incorrect", r"wrong",
              r"inaccurate", r"faux", r"falso", r"falsch", r"不正确", r"错误"),
}
_ANATOMICAL: dict[str, tuple[str, ...]] = {
    "superior": (r"superior(?:ly)?", r"cranial(?:ly)?", r"cephalad", r"cephalic(?:ally)?"),
    "inferior": (r"inferior(?:ly)?", r"caudal(?:ly)?", r"caudad"),
    "anterior": (r"anterior(?:ly)?", r"ventral(?:ly)?"),
    "posterior": (r"posterior(?:ly)?", r"dorsal(?:ly)?"),
    "left": (r"left(?:-sided|-hand|wards?)?", r"sinistral"),
    "right": (r"right(?:-sided|-hand|wards?)?", r"dextral"),
    "medial": (r"medial(?:ly)?", r"mesial(?:ly)?"),
    "lateral": (r"lateral(?:ly)?",),
}
_COLLOQUIAL: dict[str, tuple[str, ...]] = {
    "above": (r"above", r"higher", r"upper", r"top"),
    "below": (r"below", r"lower", r"beneath", r"underneath", r"under", r"bottom"),
    "left": (r"left(?:-hand|wards?)?",),
    "right": (r"right(?:-hand|wards?)?",),
    "earlier": (r"earlier", r"before", r"preceding", r"previous"),
    "later": (r"later", r"after", r"subsequent"),
}
_PLANES: dict[str, tuple[str, ...]] = {
    "axial": (r"axial(?:ly)?", r"trans-?axial", r"transverse", r"horizontal"),
    "coronal": (r"coronal(?:ly)?", r"frontal"),
    "sagittal": (r"(?:mid-?|para-?)?sagittal(?:ly)?",),
}
_OPPOSITE = {
    "superior": "inferior", "inferior": "superior", "anterior": "posterior",
    "posterior": "anterior", "left": "right", "right": "left", "medial": "lateral",
    "lateral": "medial", "above": "below", "below": "above", "earlier": "later",
    "later": "earlier", "true": "false", "false": "true",
}
_LETTERS = "ABCDEF"

# Words between a negator and the option it negates ("is not located more superior").
_NEGATION = re.compile(
    r"(?:\b(?:not|never|neither|nor|cannot|rather\s+than|instead\s+of)\b|n't|不)"
    r"(?:\s+[\w'-]+){0,3}\s*$", re.IGNORECASE)
# Where a clause starts: a negator before it does not reach the option.
_CLAUSE_BREAK = re.compile(r"[.;:!?,()\n]|\b(?:but|however|whereas|while)\b", re.IGNORECASE)
# What may close off an option at the head of a segment.
_HEAD_END = re.compile(
    r"\s*(?:$|[.!?;)\]]|\(|—|–|-\s|,?\s*(?:because|since|as|given|so|which|i\.e\.|e\.g\.)\b)",
    re.IGNORECASE)
_HEAD_LEAD = re.compile(r"^[\s\"'“”‘’«»「」『』(\[]*(?:(?:option|choice|the)\s+)?", re.IGNORECASE)

# Answer declarations. Colon forms run to the end of the line; "the answer is" forms to
# the end of the sentence.
_DECL_COLON = re.compile(
    r"(?:\b(?:final|correct|my|short)\s+)?\banswer\b\s*(?:is\s*)?(?:[:=]|\s[-–—](?=\s))"
    r"|\b(?:réponse|reponse|respuesta|antwort|risposta|resposta)\b\s*[:=]"
    r"|(?:答案|回答|答)\s*(?:[:=]|是|为)",
    re.IGNORECASE)
_DECL_IS = re.compile(
    r"\banswer\s+(?:is|would\s+be|will\s+be|should\s+be|must\s+be)\b(?!\s*[:=])",
    re.IGNORECASE)
# A whole output that is one option letter ("B", "(C)", "Option A.") is an answer context.
_BARE_LETTER = re.compile(r"^\s*(?:(?:option|choice)\s+)?[(\[]?([A-F])[)\]]?[.:!]?\s*$",
                          re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?。](?=\s|$)|\n")

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.IGNORECASE | re.DOTALL)
_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)
_SPECIAL_TOKEN = re.compile(r"<\|[^|>]{1,40}\|>")
_BOXED = re.compile(r"\\boxed\s*\{\s*(?:\\text(?:bf)?\s*\{)?([^{}]*)\}?\s*\}")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_MARKDOWN = re.compile(r"\*\*|__|\*|`+|~~|^\s{0,3}#{1,6}\s*|^\s*>\s?", re.MULTILINE)


def _word(fragment: str) -> str:
    """Whole-word form of a regex fragment (CJK fragments need no boundaries)."""
    if fragment and ord(fragment[0]) > 0x2E80:
        return f"(?:{fragment})"
    return rf"(?<![A-Za-z0-9])(?:{fragment})(?![A-Za-z0-9])"


def _vocabulary(kind: str) -> dict[str, tuple[str, ...]]:
    return {"truth": _TRUTH, "anatomical": _ANATOMICAL, "colloquial": _COLLOQUIAL,
            "plane": _PLANES}[kind]


def _normalise_choice(choice: str) -> str:
    text = unicodedata.normalize("NFKC", str(choice)).strip().casefold()
    # "in an earlier frame" and "to the left" name the same options as "earlier", "left".
    text = re.sub(r"^(?:to\s+the|on\s+the|in\s+the|in\s+an?|the|more)\s+"
                  r"|\s+(?:side|plane|frame|view|slice)$", "", text)
    return text.strip()


def _match_kind(norm: str, kinds: Sequence[str]) -> tuple[str, str] | None:
    """The (vocabulary kind, canonical name) whose canonical name or synonym is ``norm``."""
    for kind in kinds:
        for canonical in _vocabulary(kind):
            if norm == canonical:
                return kind, canonical
    for kind in kinds:
        for canonical, fragments in _vocabulary(kind).items():
            if any(re.fullmatch(f, norm) for f in fragments):
                return kind, canonical
    return None


@functools.lru_cache(maxsize=512)
def _option_table(terminology: str, choices: tuple[str, ...]) -> tuple[tuple, ...]:
    """Per valid option: ``(choice, canonical, kind, compiled pattern)``.

    The pattern covers the option's synonyms in its vocabulary; a choice outside every
    vocabulary is matched literally, as a whole word.
    """
    direction_kinds = ([terminology] if terminology in TERMINOLOGIES else []) + [
        k for k in TERMINOLOGIES if k != terminology]
    table = []
    for choice in choices:
        raw = str(choice).strip()
        if len(raw) == 1 and raw in _LETTERS:
            # A capital letter, not followed by a lower-case word unless that word is a
            # verb of a statement about it ("A is", "B lies"): "A structure" is an article.
            pattern = re.compile(
                rf"(?<![A-Za-z0-9]){raw}(?![A-Za-z0-9])"
                r"(?!\s+(?!(?:is|lies|sits|appears|was|has|and|or|in|on|at|to|by)\b)[a-z])")
            table.append((raw, raw, "letter", pattern))
            continue
        norm = _normalise_choice(raw)
        found = _match_kind(norm, ("truth", "plane", *direction_kinds))
        if found is None:
            pattern = re.compile(_word(re.escape(norm)), re.IGNORECASE)
            table.append((raw, norm, "literal", pattern))
            continue
        kind, canonical = found
        alternatives = "|".join(_word(f) for f in _vocabulary(kind)[canonical])
        table.append((raw, canonical, kind, re.compile(alternatives, re.IGNORECASE)))
    return tuple(table)


def _default_choices(question: Mapping[str, Any]) -> tuple[str, ...]:
    """Valid options when a question carries no ``choices`` (older tables)."""
    form = str(question.get("form", ""))
    if form.startswith("closed"):
        return ("True", "False")
    if question.get("family") == "plane":
        return tuple(_PLANES)
    vocab = _COLLOQUIAL if question.get("terminology") == "colloquial" else _ANATOMICAL
    return tuple(vocab)


def _question_choices(question: Mapping[str, Any]) -> tuple[str, ...]:
    choices = question.get("choices")
    if choices is None or (isinstance(choices, float) and math.isnan(choices)):
        return _default_choices(question)
    if isinstance(choices, str):
        choices = [choices]
    out = tuple(str(c) for c in list(choices) if c is not None and str(c).strip())
    return out or _default_choices(question)


def _normalise_text(text: Any) -> str:
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return ""
    text = unicodedata.normalize("NFKC", str(text))
    text = _THINK_BLOCK.sub(" ", text)
    close = list(_THINK_CLOSE.finditer(text))
    if close:  # the opening tag was in the prompt: the reasoning is everything before it
        text = text[close[-1].end():]
    opened = _THINK_OPEN.search(text)
    if opened:  # reasoning cut off by the token limit: no answer after it
        text = text[:opened.start()]
    text = _SPECIAL_TOKEN.sub(" ", text)
    text = _BOXED.sub(lambda m: f"\nAnswer: {m.group(1)}\n", text)
    text = _ANSWER_TAG.sub(lambda m: f"\nAnswer: {m.group(1)}\n", text)
    text = _MARKDOWN.sub("", text)
    return text.replace("_", " ")


_QUOTES = "'\"‘“«「『"


def _quoted_in_sentence(text: str, start: int) -> bool:
    """True for a declaration quoted inside a sentence, as in an echoed instruction
    ("End your reply with a line 'Answer: True' or 'Answer: False'."): an example of the
    format, not an answer."""
    if start == 0 or text[start - 1] not in _QUOTES:
        return False
    line_start = text.rfind("\n", 0, start) + 1
    return re.search(r"\w", text[line_start:start - 1]) is not None


def _last_declared_segment(text: str) -> str | None:
    """The text of the last answer declaration, or None when there is none."""
    candidates = []
    for m in _DECL_COLON.finditer(text):
        if _quoted_in_sentence(text, m.start()):
            continue
        rest = text[m.end():]
        line, _, after = rest.partition("\n")
        if not re.search(r"\w", line):
            # "Answer:" alone on its line: the answer is on the next non-empty line.
            line = next((ln for ln in after.split("\n") if re.search(r"\w", ln)), "")
        candidates.append((m.start(), line))
    for m in _DECL_IS.finditer(text):
        rest = text[m.end():]
        end = _SENTENCE_END.search(rest)
        candidates.append((m.start(), rest[:end.start()] if end else rest))
    candidates = [(pos, seg) for pos, seg in candidates if re.search(r"\w", seg)]
    if not candidates:
        return None
    return max(candidates, key=lambda c: c[0])[1]


def _entity_patterns(question: Mapping[str, Any]) -> tuple[re.Pattern | None, re.Pattern | None]:
    """Patterns for structure A and structure B (letter or name), when the question has them.

    A name matches as stored (``kidney_left``) and as the question text reads it
    (``name_a``: "left kidney"), the only handle a question without letters gives.
    """
    out = []
    for side in ("a", "b"):
        parts = []
        letter = question.get(f"letter_{side}")
        if isinstance(letter, str) and len(letter.strip()) == 1:
            parts.append(rf"(?<![A-Za-z0-9]){re.escape(letter.strip())}(?![A-Za-z0-9])"
                         r"(?!\s+(?!(?:is|lies|sits|appears|was)\b)[a-z])")
        for key in (f"component_{side}", f"name_{side}"):
            name = question.get(key)
            if isinstance(name, str) and len(name.strip()) > 2:
                words = name.replace("_", " ").strip().split()
                part = r"(?i:" + r"\s+".join(re.escape(w) for w in words) + r")"
                if part not in parts:
                    parts.append(part)
        out.append(re.compile("|".join(parts)) if parts else None)
    return out[0], out[1]


def _subject_is_b(segment: str, start: int, end: int, ent_a, ent_b) -> bool:
    """True when the clause around an option states B's position relative to A."""
    if ent_b is None:
        return False
    # A bounded window: a clause is short, and scanning the whole prefix for every option
    # named would be quadratic in a very long output.
    before = segment[max(0, start - 200):start]
    breaks = list(_CLAUSE_BREAK.finditer(before))
    clause_start = breaks[-1].end() if breaks else 0
    before = before[clause_start:]
    after = segment[end:end + 200]
    stop = _CLAUSE_BREAK.search(after)
    after = after[:stop.start()] if stop else after
    subjects = []
    for name, pat in (("a", ent_a), ("b", ent_b)):
        if pat is not None:
            subjects += [(m.start(), name) for m in pat.finditer(before)]
    if not subjects or max(subjects)[1] != "b":
        return False
    # "B is inferior" or "B is inferior to A": turn round; "B is inferior to C": leave.
    objects = [m for pat in (ent_a, ent_b) if pat is not None for m in pat.finditer(after)]
    return not objects or (ent_a is not None and ent_a.search(after) is not None)


@functools.lru_cache(maxsize=4096)
def _name_pattern(names: tuple[str, ...]) -> re.Pattern | None:
    """Whole-word pattern of structure names, ``_`` or space between their words."""
    alternatives = []
    for name in sorted(set(names), key=len, reverse=True):
        words = re.split(r"[\s_]+", name.strip())
        if len(words) > 1 or len(words[0]) > 2:
            alternatives.append(r"[\s_]+".join(re.escape(w) for w in words))
    if not alternatives:
        return None
    return re.compile(r"(?i)(?<![A-Za-z0-9])(?:" + "|".join(alternatives) + r")(?![A-Za-z0-9])")


def _inside_names(segment: str, question) -> list[tuple[int, int]]:
    """Spans of the question's structure names in ``segment`` ("left kidney", "Left_Putamen"):
    a direction word inside a name is part of the name, not an answer."""
    names = tuple(str(question.get(k)) for k in ("component_a", "component_b", "name_a", "name_b")
                  if isinstance(question.get(k), str))
    pattern = _name_pattern(names) if names else None
    return [m.span() for m in pattern.finditer(segment)] if pattern else []


def _mentions(segment: str, table, question, allow_letters: bool = True) -> list[tuple]:
    """Non-overlapping option mentions ``(start, end, choice, canonical, kind, negated)``."""
    found = []
    names = _inside_names(segment, question)
    for choice, canonical, kind, pattern in table:
        if kind == "letter" and not allow_letters:
            continue
        for m in pattern.finditer(segment):
            if any(a <= m.start() and m.end() <= b for a, b in names):
                continue
            found.append((m.start(), m.end(), choice, canonical, kind))
    # Longest match wins where two overlap ("不正确" over "正确").
    found.sort(key=lambda f: (f[0], -(f[1] - f[0])))
    kept, last_end = [], -1
    for f in found:
        if f[0] >= last_end:
            kept.append(f)
            last_end = f[1]
    out = []
    for start, end, choice, canonical, kind in kept:
        window = segment[max(0, start - 80):start]
        breaks = list(_CLAUSE_BREAK.finditer(window))
        if breaks:
            window = window[breaks[-1].end():]
        negated = _NEGATION.search(window) is not None
        out.append((start, end, choice, canonical, kind, negated))
    return out


def _resolve(segment: str, table, question, allow_letters: bool = True) -> tuple[Any, str]:
    mentions = _mentions(segment, table, question, allow_letters)
    if not mentions:
        return None, "unparseable"
    by_canonical = {canonical: choice for choice, canonical, *_ in table}
    # A segment that opens with one option, closed off, is that option.
    lead = _HEAD_LEAD.match(segment)
    first = mentions[0]
    if (first[0] == (lead.end() if lead else 0) and not first[5]
            and _HEAD_END.match(segment, first[1])):
        return first[2], "ok"
    ent_a, ent_b = _entity_patterns(question)
    values = set()
    for start, end, _choice, canonical, kind, negated in mentions:
        if kind in ("anatomical", "colloquial") and _subject_is_b(segment, start, end,
                                                                    ent_a, ent_b):
            canonical = _OPPOSITE.get(canonical, canonical)
        if negated:
            if kind != "truth":
                continue  # "not superior" may mean "at the same level": no claim
            canonical = _OPPOSITE[canonical]
        if canonical not in by_canonical:
            continue  # turned round into an option this question does not offer
        values.add(by_canonical[canonical])
    if not values:
        return None, "unparseable"
    if len(values) > 1:
        return None, "ambiguous"
    return values.pop(), "ok"


def parse_answer(text: str | None, question: Mapping[str, Any]) -> tuple[str | None, str]:
    """Read the answer a model declared, against one question's valid options.

    Parameters
    ----------
    text : str or None
        The model's raw output (may hold reasoning blocks, markdown, any language).
    question : mapping
        At least ``family`` (``relation_2d|relation_3d|plane``), ``form``
        (``open|closed_true|closed_false``), ``terminology`` (``anatomical|colloquial``),
        ``choices`` (the valid option strings) and ``answer``. Optional ``letter_a``,
        ``letter_b``, ``component_a``, ``component_b`` let "B is below A" be read as
        the answer "above" for A.

    Returns
    -------
    (value, status)
        ``value`` is one of ``question["choices"]`` or None; ``status`` is one of
        :data:`PARSE_STATUSES`.

    Raises
    ------
    ValueError
        When the question's ``family`` is not one of :data:`FAMILIES`.

    Examples
    --------
    >>> q = {"family": "relation_2d", "form": "open", "terminology": "anatomical",
    ...      "choices": ["superior", "inferior"], "answer": "superior"}
    >>> parse_answer("<think>maybe inferior?</think>It lies cranially.\\nAnswer: **Superior**", q)
    ('superior', 'ok')
    >>> parse_answer("Answer: superior or inferior", q)
    (None, 'ambiguous')
    """
    family = question.get("family")
    if family not in FAMILIES:
        raise ValueError(f"question {question.get('question_id', '?')!r}: unknown family "
                         f"{family!r}; expected one of {FAMILIES}")
    table = _option_table(str(question.get("terminology") or ""), _question_choices(question))
    clean = _normalise_text(text)
    if not clean.strip():
        return None, "unparseable"
    segment = _last_declared_segment(clean)
    bare = _BARE_LETTER.match(clean)
    if segment is None and bare and bare.group(1).isupper():
        segment = bare.group(1)
    if segment is not None:
        return _resolve(segment, table, question)
    # No declaration: read the last line that names an option (letters need a declaration).
    for line in reversed(clean.splitlines()):
        if _mentions(line, table, question, allow_letters=False):
            return _resolve(line, table, question, allow_letters=False)
    return None, "unparseable"


def is_correct(value: Any, status: str, question: Mapping[str, Any]) -> bool:
    """True when a parse is ``ok`` and names the question's answer (case-insensitive).

    ``unparseable`` and ``ambiguous`` parses are wrong.
    """
    if status != "ok" or value is None:
        return False
    answer = question.get("answer")
    if answer is None:
        return False
    return _normalise_choice(value) == _normalise_choice(answer)


# ----------------------------------------------------------------------------------------
# Bayes@N
# ----------------------------------------------------------------------------------------

#: The factors whose levels get their own Bayes@N rows (columns of ``questions.parquet``).
FACTORS = ("modality", "plane", "dims", "convention", "prompt", "background", "terminology",
           "form", "family", "ablation")
#: Category scores of the paired SemSam coding ``2 * baseline_correct + semsam_correct``.
PAIRED_WEIGHTS = np.array([0.0, 1.0, -1.0, 0.0])
#: The columns of stage 04's ``responses.parquet`` this stage needs.
RESPONSE_COLUMNS = ("run_id", "model", "arm", "question_id", "trial", "raw_text")
#: What :func:`score_runs` writes under ``data/analysis/``.
OUTPUTS = ("scored.parquet", "bayes_by_factor.parquet", "semsam_effect.parquet",
           "unparseable.parquet")


def bayes_at_n(R: Any, w: Any = None) -> tuple[float, float]:
    """Bayes@N posterior mean and standard deviation of the average score.

    Parameters
    ----------
    R : array-like of int, shape (M, N)
        Outcome category of each of N trials of M questions; binary (0 wrong, 1 right)
        unless ``w`` is given. A boolean matrix is read as 0/1.
    w : array-like of float, shape (C + 1,), optional
        Score of each category ``0..C`` (default ``[0, 1]``: accuracy).

    Returns
    -------
    (mu, sigma) : floats, in the units of ``w`` (accuracy in [0, 1] by default).

    Raises
    ------
    ValueError
        When ``R`` is not a non-empty 2-D matrix or holds a category ``w`` does not score.

    Examples
    --------
    >>> mu, sigma = bayes_at_n([[1, 1, 0], [0, 0, 0]])
    >>> round(mu, 4), round(sigma, 4)
    (0.4, 0.1414)
    """
    from scorio.eval import bayes

    R = np.asarray(R)
    if R.ndim != 2 or R.shape[0] == 0 or R.shape[1] == 0:
        raise ValueError(f"R must be a non-empty (questions, trials) matrix; got shape {R.shape}")
    if R.dtype == bool:
        R = R.astype(np.int64)
    mu, sigma = bayes(R, None if w is None else np.asarray(w, dtype=float))
    return float(mu), float(sigma)


def bayes_interval(R: Any, w: Any = None, level: float = 0.95) -> tuple[float, float, float,
                                                                       float]:
    """``(mu, sigma, lo, hi)``: Bayes@N with a central credible interval at ``level``.

    The interval is scorio's normal approximation, clipped to ``[min(w), max(w)]``.
    """
    from scorio.eval import bayes_ci

    R = np.asarray(R)
    if R.ndim != 2 or R.shape[0] == 0 or R.shape[1] == 0:
        raise ValueError(f"R must be a non-empty (questions, trials) matrix; got shape {R.shape}")
    if R.dtype == bool:
        R = R.astype(np.int64)
    weights = np.array([0.0, 1.0]) if w is None else np.asarray(w, dtype=float)
    mu, sigma, lo, hi = bayes_ci(R, weights, confidence=level,
                                 bounds=(float(weights.min()), float(weights.max())))
    return mu, sigma, lo, hi


def outcome_matrix(rows: pd.DataFrame, value: str = "correct") -> tuple[np.ndarray, np.ndarray,
                                                                        int]:
    """The (question, trial) matrix of one group of scored rows.

    Parameters
    ----------
    rows : DataFrame with ``question_id``, ``trial`` and ``value`` (one row per
        (question, trial); duplicates are an error).
    value : the column to place in the matrix (bool or small int).

    Returns
    -------
    R : ndarray, shape (M, N), int64 — the first N = (most trials any question has) trials
        of every question that has all of them.
    question_ids : ndarray, shape (M,) — the row labels.
    n_incomplete : int — questions left out because they have fewer than N trials (an
        unfinished run); Bayes@N needs the same N for every question.
    """
    dup = rows.duplicated(["question_id", "trial"])
    if dup.any():
        first = rows.loc[dup, ["question_id", "trial"]].iloc[0].tolist()
        raise ValueError(f"{int(dup.sum())} duplicated (question_id, trial) rows, e.g. {first}; "
                         "two runs of the same model and arm? choose one with [scoring] runs")
    wide = rows.pivot(index="question_id", columns="trial", values=value)
    complete = wide.notna().all(axis=1)
    wide = wide[complete]
    return (wide.to_numpy(dtype=np.int64), wide.index.to_numpy(),
            int((~complete).sum()))


def _bayes_row(rows: pd.DataFrame, level: float) -> dict[str, Any]:
    R, qids, n_incomplete = outcome_matrix(rows)
    if R.size == 0:
        return {"n_questions": 0, "n_trials": 0, "n_incomplete": n_incomplete,
                "accuracy": np.nan, "mu": np.nan, "sigma": np.nan, "lo": np.nan, "hi": np.nan}
    mu, sigma, lo, hi = bayes_interval(R, level=level)
    return {"n_questions": int(R.shape[0]), "n_trials": int(R.shape[1]),
            "n_incomplete": n_incomplete, "accuracy": float(R.mean()),
            "mu": mu, "sigma": sigma, "lo": lo, "hi": hi}


def bayes_by(scored: pd.DataFrame, by: Sequence[str], level: float = 0.95) -> pd.DataFrame:
    """Bayes@N accuracy of every group of ``scored`` rows.

    Parameters
    ----------
    scored : the ``scored.parquet`` table (``question_id, trial, correct`` + factors).
    by : grouping columns, e.g. ``["model", "arm", "convention", "terminology"]``; rows
        where a grouping column is null (the factor does not apply) are left out. Without
        ``model`` (or ``arm``) in ``by`` the models (arms) are pooled, each (model, arm,
        question) counting as one question of Bayes@N.
    level : credible level of ``lo``/``hi``.

    Returns
    -------
    DataFrame, one row per group: the ``by`` columns, ``n_questions, n_trials,
    n_incomplete, accuracy`` (raw mean), ``mu, sigma, lo, hi`` (Bayes@N, fractions).
    """
    missing = [c for c in (*by, "question_id", "trial", "correct") if c not in scored]
    if missing:
        raise ValueError(f"scored table lacks columns {missing}")
    table = scored.dropna(subset=list(by))
    # Pooling over models or arms: each (model, arm, question) is its own Bayes@N row.
    pooled = [c for c in ("model", "arm") if c in table and c not in by]
    if pooled and len(table.drop_duplicates(pooled)) > 1:
        key = table["question_id"].astype(str)
        for c in pooled:
            key = table[c].astype(str) + "\x1f" + key
        table = table.assign(question_id=key)
    rows = []
    for key, group in table.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(by, key, strict=True)), **_bayes_row(group, level)})
    columns = [*by, "n_questions", "n_trials", "n_incomplete", "accuracy", "mu", "sigma",
               "lo", "hi"]
    return pd.DataFrame(rows, columns=columns)


def bayes_by_factor(scored: pd.DataFrame, factors: Sequence[str] = FACTORS,
                    level: float = 0.95, per_model: bool = True) -> pd.DataFrame:
    """Bayes@N per model × arm overall (``factor == level == "all"``) and per factor level.

    Parameters
    ----------
    per_model : False pools the models (``model`` is then ``"all models"``).

    Returns
    -------
    DataFrame with ``model, arm, factor, level`` and the columns of :func:`bayes_by`.
    Factors absent from ``scored`` are skipped; a factor's null rows (not applicable to
    that question) are left out of its levels.
    """
    keys = ["model", "arm"] if per_model else ["arm"]
    parts = []
    overall = bayes_by(scored, keys, level)
    parts.append(overall.assign(factor="all", level="all"))
    for factor in factors:
        if factor not in scored:
            continue
        table = bayes_by(scored, [*keys, factor], level)
        parts.append(table.rename(columns={factor: "level"}).assign(factor=factor))
    out = pd.concat(parts, ignore_index=True)
    if not per_model:
        out["model"] = "all models"
    out["level"] = out["level"].astype(str)
    out["credible_level"] = level
    first = ["model", "arm", "factor", "level"]
    return out[first + [c for c in out.columns if c not in first]]


def semsam_effect(scored: pd.DataFrame, baseline: str = "baseline", treated: str = "semsam",
                  level: float = 0.95) -> pd.DataFrame:
    """The paired SemSam effect per model: SemSam minus baseline on the same (question, trial).

    Only (question, trial) pairs answered in both arms enter, so the two arms are compared
    on identical questions with identical per-(question, trial) seeds. Two estimates:

    - ``effect_*``: the difference of the two arms' Bayes@N posteriors on that shared set
      (``semsam_mu - baseline_mu``; ``effect_sigma`` adds the two variances, the arms'
      outcomes being independent given the question). It is consistent with the arm
      accuracies shown beside it and is what the claims and figures use.
    - ``paired_*``: Bayes@N (scorio) of the trial-paired outcome coded in four categories
      (baseline wrong/right × SemSam wrong/right, scores ``0, +1, -1, 0``). It uses the
      trial pairing, so shared per-trial noise cancels, but its Dirichlet(1,1,1,1) prior
      shrinks the difference by N/(N+4) per question where the arms' priors shrink by
      N/(N+2): with few trials it is closer to zero than ``effect_mu``.

    Returns
    -------
    DataFrame, one row per model answered in both arms: ``model, n_questions, n_trials,
    baseline_mu, baseline_sigma, baseline_lo, baseline_hi, semsam_mu, ..., effect_mu,
    effect_sigma, effect_lo, effect_hi, paired_mu, paired_sigma, paired_lo, paired_hi``
    (fractions), ``baseline_accuracy, semsam_accuracy`` (plain means of the shared
    trials), ``n_fixed`` (trials baseline got wrong and SemSam right), ``n_broken``
    (the reverse) and ``credible_level``.
    """
    from scorio.eval.utils import normal_credible_interval

    rows = []
    for model, group in scored.groupby("model", sort=True):
        arms = {arm: g.set_index(["question_id", "trial"])["correct"]
                for arm, g in group.groupby("arm") if arm in (baseline, treated)}
        if len(arms) < 2:
            continue
        both = pd.concat({"b": arms[baseline], "s": arms[treated]}, axis=1, join="inner")
        if both.empty:
            continue
        code = (2 * both["b"].astype(int) + both["s"].astype(int)).rename("code")
        R, _, _ = outcome_matrix(code.reset_index(), "code")
        if R.size == 0:
            continue
        b_mu, b_sigma, b_lo, b_hi = bayes_interval(R // 2, level=level)
        s_mu, s_sigma, s_lo, s_hi = bayes_interval(R % 2, level=level)
        e_mu, e_sigma = s_mu - b_mu, math.hypot(s_sigma, b_sigma)
        e_lo, e_hi = normal_credible_interval(e_mu, e_sigma, credibility=level,
                                              bounds=(-1.0, 1.0))
        p_mu, p_sigma, p_lo, p_hi = bayes_interval(R, PAIRED_WEIGHTS, level)
        rows.append({"model": model, "n_questions": R.shape[0], "n_trials": R.shape[1],
                     "baseline_mu": b_mu, "baseline_sigma": b_sigma, "baseline_lo": b_lo,
                     "baseline_hi": b_hi, "semsam_mu": s_mu, "semsam_sigma": s_sigma,
                     "semsam_lo": s_lo, "semsam_hi": s_hi, "effect_mu": e_mu,
                     "effect_sigma": e_sigma, "effect_lo": e_lo, "effect_hi": e_hi,
                     "paired_mu": p_mu, "paired_sigma": p_sigma, "paired_lo": p_lo,
                     "paired_hi": p_hi, "baseline_accuracy": float((R // 2).mean()),
                     "semsam_accuracy": float((R % 2).mean()), "n_fixed": int((R == 1).sum()),
                     "n_broken": int((R == 2).sum()), "credible_level": level})
    columns = ["model", "n_questions", "n_trials", "baseline_mu", "baseline_sigma",
               "baseline_lo", "baseline_hi", "semsam_mu", "semsam_sigma", "semsam_lo",
               "semsam_hi", "effect_mu", "effect_sigma", "effect_lo", "effect_hi", "paired_mu",
               "paired_sigma", "paired_lo", "paired_hi", "baseline_accuracy",
               "semsam_accuracy", "n_fixed", "n_broken", "credible_level"]
    return pd.DataFrame(rows, columns=columns)


def unparseable_rates(scored: pd.DataFrame) -> pd.DataFrame:
    """Parse outcomes per model × arm.

    Returns
    -------
    DataFrame: ``model, arm, n_responses`` (answered records), ``n_ok, n_unparseable,
    n_ambiguous, unparseable_rate, ambiguous_rate`` (of the answered records),
    ``n_reparsed_differently`` (re-parse differs from the status or value stored at
    inference time), ``n_not_answered`` (records stage 04 could not answer, or questions
    of an unknown family) and ``not_answered`` (JSON counts per record status).
    """
    rows = []
    for (model, arm), g in scored.groupby(["model", "arm"], sort=True):
        answered = g["answered"].to_numpy(bool) if "answered" in g else np.ones(len(g), bool)
        status = g["parse_status"][answered]
        n = int(answered.sum())
        changed = int(g["reparsed_differently"].sum()) if "reparsed_differently" in g else 0
        not_answered = (g.loc[~answered, "status"].value_counts().to_dict()
                        if "status" in g else {})
        rows.append({"model": model, "arm": arm, "n_responses": n,
                     "n_ok": int((status == "ok").sum()),
                     "n_unparseable": int((status == "unparseable").sum()),
                     "n_ambiguous": int((status == "ambiguous").sum()),
                     "unparseable_rate": float((status == "unparseable").mean()) if n else np.nan,
                     "ambiguous_rate": float((status == "ambiguous").mean()) if n else np.nan,
                     "n_reparsed_differently": changed,
                     "n_not_answered": int((~answered).sum()),
                     "not_answered": json.dumps(not_answered, sort_keys=True)})
    return pd.DataFrame(rows, columns=["model", "arm", "n_responses", "n_ok", "n_unparseable",
                                       "n_ambiguous", "unparseable_rate", "ambiguous_rate",
                                       "n_reparsed_differently", "n_not_answered",
                                       "not_answered"])


# ----------------------------------------------------------------------------------------
# Re-scoring raw outputs
# ----------------------------------------------------------------------------------------

_QUESTION_KEYS = ("question_id", "family", "form", "terminology", "choices", "answer",
                  "letter_a", "letter_b", "component_a", "component_b", "name_a", "name_b")


def _null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def rescore(responses: pd.DataFrame, questions: pd.DataFrame,
            progress: bool = True) -> pd.DataFrame:
    """Parse every raw output again and score it against its question.

    Parameters
    ----------
    responses : stage 04 rows (``run_id, model, arm, question_id, trial, raw_text``; the
        stored ``parsed, parse_status, correct`` are kept as ``*_at_inference``).
    questions : stage 03's ``questions.parquet``.
    progress : show a progress bar.

    Returns
    -------
    DataFrame, one row per response: the response columns with ``parsed, parse_status,
    correct`` from this parser, ``reparsed_differently`` (bool), ``status`` (stage 04's
    record status, ``unknown_family`` for a question of an unknown family), ``answered``
    (``status == "ok"``: the model produced an answer; other rows are not parsed, have a
    null ``parse_status`` and are not scored), and the question's factor columns
    (everything of ``questions.parquet`` but ``text`` and ``choices``).

    Raises
    ------
    ValueError
        When a response names a question that ``questions`` lacks, or a required column
        is missing.
    """
    missing = [c for c in RESPONSE_COLUMNS if c not in responses]
    if missing:
        raise ValueError(f"responses lack columns {missing}")
    if "question_id" not in questions:
        raise ValueError("questions lack the column 'question_id'")
    qtable = questions.drop_duplicates("question_id").set_index("question_id", drop=False)
    unknown = ~responses["question_id"].isin(qtable.index)
    if unknown.any():
        ids = responses.loc[unknown, "question_id"].unique()[:5].tolist()
        raise ValueError(f"{int(unknown.sum())} responses name questions absent from "
                         f"questions.parquet, e.g. {ids}: was the benchmark regenerated "
                         "after the run?")
    # A record stage 04 could not answer (missing input, out of memory) or a question of
    # an unknown family is no answer of the model: it is kept out of the accuracy and
    # counted per status in unparseable.parquet instead.
    record_status = (responses["status"].fillna("ok").astype(str) if "status" in responses
                     else pd.Series("ok", index=responses.index))
    known = qtable["family"].isin(FAMILIES)
    bad_family = ~responses["question_id"].map(known).astype(bool)
    if bad_family.any():
        ids = responses.loc[bad_family, "question_id"].unique()[:5].tolist()
        warnings.warn(f"{int(bad_family.sum())} responses answer questions of an unknown "
                      f"family (e.g. {ids}; expected one of {FAMILIES}): not scored",
                      stacklevel=2)
        record_status = record_status.where(~bad_family, "unknown_family")
    answered = (record_status == "ok").to_numpy()

    records = {qid: {k: row.get(k) for k in _QUESTION_KEYS}
               for qid, row in zip(qtable.index, qtable.to_dict("records"), strict=True)}
    cache: dict[tuple[str, str], tuple[Any, str]] = {}
    parsed, status, correct = [], [], []
    texts = responses["raw_text"].to_numpy(dtype=object)
    qids = responses["question_id"].to_numpy(dtype=object)
    for qid, text, ok in tqdm(zip(qids, texts, answered, strict=True), total=len(texts),
                              desc="re-parsing", unit="resp", disable=not progress,
                              mininterval=1.0):
        if not ok:
            parsed.append(None)
            status.append(None)
            correct.append(False)
            continue
        key = (qid, "" if _null(text) else str(text))
        if key not in cache:  # trials often repeat the same text
            cache[key] = parse_answer(key[1], records[qid])
        value, st = cache[key]
        parsed.append(value)
        status.append(st)
        correct.append(is_correct(value, st, records[qid]))

    out = responses.copy()
    for col in ("parsed", "parse_status", "correct"):
        if col in out:
            out = out.rename(columns={col: f"{col}_at_inference"})
    out["parsed"] = pd.Series(parsed, index=out.index, dtype=object)
    out["parse_status"] = pd.Series(status, index=out.index, dtype=object)
    out["correct"] = np.asarray(correct, dtype=bool)
    out["status"] = record_status.to_numpy()
    out["answered"] = answered
    if "parse_status_at_inference" in out:
        def as_text(col: pd.Series) -> np.ndarray:
            return np.array(["" if _null(v) else str(v) for v in col], dtype=object)

        differs = as_text(out["parse_status_at_inference"]) != as_text(out["parse_status"])
        if "parsed_at_inference" in out:
            differs |= as_text(out["parsed_at_inference"]) != as_text(out["parsed"])
        out["reparsed_differently"] = differs.astype(bool) & answered
    else:
        out["reparsed_differently"] = False
    factors = [c for c in questions.columns if c not in ("text", "choices", "question_id")
               and c not in out.columns]
    return out.merge(qtable[["question_id", *factors]].reset_index(drop=True),
                     on="question_id", how="left", validate="many_to_one")


def find_runs(root: str | os.PathLike | None = None,
              runs: Iterable[str] | None = None) -> list[Path]:
    """``responses.parquet`` of the runs to score: the named ones, else the current ones.

    The current runs are those stage 04's stamps name, one per (model, arm): a changed
    configuration starts a new run folder and leaves the old one on disk, and it must not
    be counted twice. Without any stamp (results copied in by hand, or simulated), every
    run under ``data/results`` is taken.

    Raises
    ------
    FileNotFoundError
        When there is none, or a named run has no ``responses.parquet``.
    """
    results = project_paths(root).results
    runs = [str(r) for r in runs or []]
    if runs:
        files = [results / r / "responses.parquet" for r in runs]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"named runs have no responses.parquet: {absent}")
        return files
    from mislib.inference import current_runs

    files = [run / "responses.parquet" for run in current_runs(results)]
    if not files:
        files = sorted(results.glob("*/responses.parquet"))
    if not files:
        raise FileNotFoundError(
            f"no run results under {results}: run stage 04 first (notebook 04_inference or "
            "`python -m mislib infer --arm baseline` and `--arm semsam`)")
    return files


def load_responses(files: Sequence[Path]) -> pd.DataFrame:
    """Concatenate runs' ``responses.parquet``; a file lacking a needed column is named."""
    frames = []
    for path in files:
        frame = pd.read_parquet(path)
        missing = [c for c in RESPONSE_COLUMNS if c not in frame]
        if missing:
            raise ValueError(f"{path}: lacks columns {missing} (stage 04's responses schema)")
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def read_run_records(root: str | os.PathLike | None = None,
                     run_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """The ``run.json`` of each run (one row per run; missing or broken files give nulls)."""
    results = project_paths(root).results
    rows = []
    for run_id in sorted(set(run_ids or [p.parent.name for p in results.glob("*/run.json")])):
        path = results / str(run_id) / "run.json"
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            record = {}
        rows.append({"run_id": run_id, "model": record.get("model") or record.get("model_id"),
                     "arm": record.get("arm"), "simulated": bool(record.get("simulated", False)),
                     "record": json.dumps(record, default=str)})
    return pd.DataFrame(rows, columns=["run_id", "model", "arm", "simulated", "record"])


def _fingerprint(files: Sequence[Path]) -> str:
    """Identity of the inputs and of this parser, so new runs or a new parser invalidate."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def score_runs(profile: str | Mapping[str, Any] = "demo",
               root: str | os.PathLike | None = None, force: bool = False,
               progress: bool = True, **overrides: Any) -> dict[str, pd.DataFrame]:
    """Stage 06: re-parse, score and summarise every run; write ``data/analysis/*.parquet``.

    Parameters
    ----------
    profile : profile name, TOML path or mapping; its ``[scoring]`` table supplies
        ``credible_level`` and ``runs`` (run ids to score; empty = every run under
        ``data/results``).
    root : project root (default: the repository).
    force : redo the work even when the outputs are fresh for these inputs.
    overrides : single ``[scoring]`` keys (``None`` = the profile's value).

    Returns
    -------
    dict with DataFrames ``scored`` (the answered records, see :func:`rescore`),
    ``bayes_by_factor``, ``semsam_effect``, ``unparseable`` (read back from disk when
    fresh).
    """
    params = stage_params(profile, "scoring", **overrides)
    paths = project_paths(root)
    files = find_runs(root, params.get("runs"))
    qpath = paths.benchmark / "questions.parquet"
    if not qpath.is_file():
        raise FileNotFoundError(f"{qpath} is missing: run stage 03 (03_question_generation)")
    stamp_params = {**params, "inputs": _fingerprint([qpath, *files])}
    out_dir = paths.analysis
    if not force and is_fresh(out_dir, "scoring", stamp_params, OUTPUTS):
        return {Path(o).stem: pd.read_parquet(out_dir / o) for o in OUTPUTS}

    level = float(params.get("credible_level", 0.95))
    responses = load_responses(files)
    rescored = rescore(responses, pd.read_parquet(qpath), progress=progress)
    unparseable = unparseable_rates(rescored)
    # Only the model's answers are scored; the rest are counted in unparseable.parquet.
    scored = rescored[rescored["answered"]].reset_index(drop=True)
    if scored.duplicated(["model", "arm", "question_id", "trial"]).any():
        runs = sorted(scored["run_id"].unique())
        raise ValueError(f"runs {runs} answer the same (model, arm, question, trial) more "
                         "than once; name the runs to score in [scoring] runs")
    tables = {"scored": scored,
              "bayes_by_factor": bayes_by_factor(scored, level=level),
              "semsam_effect": semsam_effect(scored, level=level),
              "unparseable": unparseable}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        table.to_parquet(out_dir / f"{name}.parquet", index=False)
    write_stamp(out_dir, "scoring", stamp_params, OUTPUTS)
    if tables["semsam_effect"].empty and scored["arm"].nunique() > 1:
        warnings.warn("no model was answered in both the baseline and the semsam arm on the "
                      "same questions: semsam_effect.parquet is empty", stacklevel=2)
    return tables
