"""Thinking models under a fixed reasoning budget: budget forcing, shared by the local backends.

A model that thinks writes a ``<think> ... </think>`` block before its answer (Qwen3-VL
Thinking's chat template opens the block in the prompt; other models open it themselves).
With a reasoning budget of ``B`` tokens (a model entry's ``reasoning_budget``) a backend
decodes in two phases:

1. up to ``B`` tokens, stopping early at the end-of-turn token or at ``</think>``;
2. then, per request, one of (:func:`plan_phase_two`):

   - ``done``: the model ended its turn;
   - ``answer``: it closed the block within the budget; it goes on to write its answer in
     up to ``max_new_tokens`` tokens;
   - ``force``: the budget ran out inside the block; the backend appends
     :data:`FORCED_SUFFIX` (close the block, then ``Answer:``, the line the questions ask
     for and the parser reads, :mod:`mislib.answers`) and lets the model write
     ``forced_answer_tokens`` more tokens;
   - ``rest``: the model never opened a block and is still answering; it gets the rest of
     ``max_new_tokens``.

A generation that never opens a block (the template opens none and the model writes no
``<think>``) is all answer, so it is held to ``max_new_tokens`` like any answer: a first
phase that ran past that (a budget larger than ``max_new_tokens``) is cut there
(:attr:`PhaseTwo.keep`), which gives exactly the tokens a decode capped at
``max_new_tokens`` gives. So thinking never exceeds the budget, an answer after a closed
block never exceeds ``max_new_tokens``, a forced one never exceeds ``forced_answer_tokens``,
and a model that does not think never writes more than ``max_new_tokens`` in all.

The counts a record keeps (:func:`generated_counts`) are of tokens the model generated: the
appended :data:`FORCED_SUFFIX` is in the text (the parser reads its ``Answer:``) but in
neither ``thinking_tokens`` nor ``answer_tokens``.

The second phase continues the same sequence (the prompt, the first phase's tokens, the
appended ones), and SemSam's random draws stay keyed by (seed, tokens generated so far):
its processors are told how many tokens precede the second phase (``step_offset``), so a
draw never repeats and both backends draw the same numbers at the same place.

>>> plan = plan_phase_two([5, 6, 7], budget=3, eos_ids=[2], markers=(10, 11),
...                       opened_in_prompt=True)
>>> plan.action
'force'
>>> thinking_split([5, 6, 11, 8, 2], markers=(10, 11), opened_in_prompt=True)
(3, 2)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
#: Appended when the budget runs out inside the block: close it, then the answer line.
FORCED_SUFFIX = "\n" + THINK_CLOSE + "\n\nAnswer:"


def think_markers(tokenizer: Any, model_id: str) -> tuple[int, int]:
    """The token ids of ``<think>`` and ``</think>``.

    Raises
    ------
    ValueError
        The tokenizer has no single token for either (the model cannot think in blocks
        this module can close, so its entry should not set a reasoning budget).
    """
    ids = []
    for marker in (THINK_OPEN, THINK_CLOSE):
        token = tokenizer.convert_tokens_to_ids(marker)
        if token is None or token == tokenizer.unk_token_id:
            raise ValueError(f"model {model_id!r} has a reasoning budget but its tokenizer has "
                             f"no {marker!r} token; remove reasoning_budget from its entry")
        ids.append(int(token))
    return ids[0], ids[1]


def forced_suffix_ids(tokenizer: Any) -> list[int]:
    """:data:`FORCED_SUFFIX` as token ids (no special tokens added around it)."""
    return list(tokenizer.encode(FORCED_SUFFIX, add_special_tokens=False))


def prompt_opens_think(prompt_text: str) -> bool:
    """Whether a chat-templated prompt ends inside an opened ``<think>`` block."""
    text = prompt_text.rstrip()
    return text.endswith(THINK_OPEN)


def cut_at_stop(tokens: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """``tokens`` up to and including the first of ``stop_ids`` (padding after it dropped)."""
    stops = set(stop_ids)
    for i, token in enumerate(tokens):
        if token in stops:
            return list(tokens[: i + 1])
    return list(tokens)


@dataclass(frozen=True)
class PhaseTwo:
    """What follows the first phase for one request.

    Attributes
    ----------
    action : ``"done"``, ``"answer"``, ``"force"`` or ``"rest"`` (module docstring).
    append : token ids appended before the second phase (the forced suffix, or none).
    max_tokens : the second phase's budget (0 for ``done``).
    keep : how many of the first phase's tokens stay (None: all); set where a generation
        without a block ran past ``max_new_tokens``.
    """

    action: str
    append: tuple[int, ...] = ()
    max_tokens: int = 0
    keep: int | None = None

    @property
    def forced(self) -> bool:
        return self.action == "force"

    def kept(self, tokens: Sequence[int]) -> list[int]:
        """The first phase's ``tokens`` this plan keeps."""
        return list(tokens if self.keep is None else tokens[: self.keep])


def plan_phase_two(tokens: Sequence[int], budget: int, eos_ids: Sequence[int],
                   markers: tuple[int, int], opened_in_prompt: bool,
                   max_new_tokens: int = 16, forced_answer_tokens: int = 16,
                   suffix: Sequence[int] = ()) -> PhaseTwo:
    """The second phase of one request from its first-phase ``tokens`` (cut at their stop).

    Parameters
    ----------
    tokens : the first phase's tokens, up to and including an end-of-turn or ``</think>``.
    budget : the reasoning budget the first phase ran under.
    eos_ids : end-of-turn token ids.
    markers : ``(<think> id, </think> id)``.
    opened_in_prompt : whether the prompt opened the block (:func:`prompt_opens_think`).
    max_new_tokens, forced_answer_tokens : the answer's budgets.
    suffix : :data:`FORCED_SUFFIX`'s ids.
    """
    open_id, close_id = markers
    thinks = opened_in_prompt or open_id in tokens or close_id in tokens
    if not thinks and len(tokens) > int(max_new_tokens):
        # no block: all answer, held to the answer's budget (what a capped decode gives)
        return PhaseTwo("done", keep=int(max_new_tokens))
    if tokens and tokens[-1] in set(eos_ids):
        return PhaseTwo("done")
    if tokens and tokens[-1] == close_id:
        return PhaseTwo("answer", (), int(max_new_tokens))
    if len(tokens) < budget:  # neither stop nor budget: a backend that stopped for no reason
        return PhaseTwo("done")
    if thinks:
        return PhaseTwo("force", tuple(int(t) for t in suffix), int(forced_answer_tokens))
    rest = int(max_new_tokens) - len(tokens)
    return PhaseTwo("rest", (), rest) if rest > 0 else PhaseTwo("done")


def thinking_split(tokens: Sequence[int], markers: tuple[int, int],
                   opened_in_prompt: bool) -> tuple[int, int]:
    """``(thinking tokens, answer tokens)`` of a whole generation.

    Thinking runs up to and including the first ``</think>``; a block never closed is all
    thinking; a generation that never opened one is all answer.
    """
    open_id, close_id = markers
    tokens = list(tokens)
    if close_id in tokens:
        thinking = tokens.index(close_id) + 1
    elif opened_in_prompt or open_id in tokens:
        thinking = len(tokens)
    else:
        thinking = 0
    return thinking, len(tokens) - thinking


def generated_counts(first: Sequence[int], plan: PhaseTwo, second: Sequence[int],
                     markers: tuple[int, int], opened_in_prompt: bool) -> tuple[int, int]:
    """``(thinking tokens, answer tokens)`` the model generated in a budgeted decode.

    ``first`` is the first phase's tokens as the plan keeps them (:meth:`PhaseTwo.kept`),
    ``second`` the second phase's. Thinking is what the model wrote up to and including
    its own first ``</think>`` (:func:`thinking_split`); a forced answer's thinking is the
    whole first phase and its answer the tokens written after the appended
    :data:`FORCED_SUFFIX`, which counts in neither: the model did not generate it.
    """
    if plan.forced:
        return len(first), len(second)
    return thinking_split([*first, *second], markers, opened_in_prompt)
