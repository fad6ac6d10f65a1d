"""The answer parser: read the option a model declared in its raw output.

:func:`parse_answer` reads one raw model output against the question it answers and
returns ``(value, status)``: ``value`` is one of the question's ``choices`` (spelled as in
``choices``) or ``None``; ``status`` is ``"ok"``, ``"unparseable"`` (no valid option found)
or ``"ambiguous"`` (several different options declared). Both non-``ok`` statuses score
as wrong (:func:`is_correct`). Stage 04 parses as it goes; stage 06 (:mod:`mislib.scoring`)
parses every raw output again, so a run can be re-scored with a newer parser.

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
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

from mislib.vocabulary import FAMILIES, TERMINOLOGIES, is_missing

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
    if is_missing(choices):
        return _default_choices(question)
    if isinstance(choices, str):
        choices = [choices]
    out = tuple(str(c) for c in list(choices) if c is not None and str(c).strip())
    return out or _default_choices(question)


def n_options(question: Mapping[str, Any]) -> int:
    """How many valid options the question offers; ``1 / n_options`` is its chance level.

    >>> n_options({"family": "relation_2d", "form": "open", "terminology": "anatomical",
    ...            "choices": ["superior", "inferior"]})
    2
    """
    return len(_question_choices(question))


def _normalise_text(text: Any) -> str:
    if is_missing(text):
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
