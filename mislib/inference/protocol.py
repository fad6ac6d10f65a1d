"""The contract between stage 04 and a model backend.

A backend turns a batch of :class:`Request` objects into one :class:`Generation` each, under
one :class:`DecodeSettings`; the stage does everything else (questions, seeds, worker shares,
the result store). Backends are found by name through :mod:`mislib.inference.registry`, so a
new one (vLLM, an OpenAI-compatible endpoint) is one module implementing :class:`Backend`;
nothing else in mislib changes. The decode rule, arms and seeding are described in
``docs/design.md`` (MIS-SemSam and Inference sections).

>>> decode = DecodeSettings(arm="greedy", temperature=0.7, top_k=20, top_p=0.8,
...                         max_new_tokens=16)
>>> decode.rescore, decode.identity()["arm"]
(False, 'greedy')
>>> decode.rule_params()["arm"]
'greedy'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from mislib.vocabulary import ARMS  # noqa: F401  (the decode arms; re-exported)


@dataclass(frozen=True)
class Request:
    """One (question, trial) to answer.

    Attributes
    ----------
    question_id, trial : the record's key in the result store.
    seed : the per-(question, trial) seed, the same in every arm (random draws are keyed by
        it and by the number of tokens generated so far).
    text : the user turn (question plus any instruction), without chat template.
    media : None (text only), a ``PIL.Image`` (2D question) or a uint8 array
        ``[n_frames, height, width, 3]`` (3D stack, passed to the model as a video).
    """

    question_id: str
    trial: int
    seed: int
    text: str
    media: Any = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.question_id, self.trial)


@dataclass(frozen=True)
class DecodeSettings:
    """How the next token is chosen, identical for every request of a run.

    Attributes
    ----------
    arm : one of :data:`ARMS`.
    temperature, top_k, top_p : the candidate set, ``p = softmax(z / T)`` then top-k then
        top-p (all arms share it).
    max_new_tokens : generation budget per request, end-of-turn token included.
    mode : SemSam's selection, ``"argmax"`` or ``"sample"`` (ignored by other arms).
    k : neighbours per token in the SemSam table.
    table_path : the SemSam neighbour table on disk (safetensors), or None when the
        backend cannot expose embeddings; passed by path so that worker processes of a
        backend load it themselves.
    table_key : the table's content hash (recorded in the run identity).
    reasoning_budget : tokens a thinking model may spend inside its ``<think>`` block
        before the backend closes it and forces the answer line (0: no budget, one plain
        generation of ``max_new_tokens``); see :mod:`mislib.inference.thinking`.
    forced_answer_tokens : tokens generated after a forced ``Answer:``.
    """

    arm: str
    temperature: float
    top_k: int
    top_p: float
    max_new_tokens: int
    mode: str = "argmax"
    k: int = 32
    table_path: str | None = None
    table_key: str | None = None
    reasoning_budget: int = 0
    forced_answer_tokens: int = 16

    def __post_init__(self) -> None:
        if self.arm not in ARMS:
            raise ValueError(f"unknown arm {self.arm!r}; arms: {ARMS}")
        if int(self.max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        if int(self.reasoning_budget) < 0 or int(self.forced_answer_tokens) < 1:
            raise ValueError("reasoning_budget must be >= 0 and forced_answer_tokens >= 1, got "
                             f"{self.reasoning_budget!r} and {self.forced_answer_tokens!r}")

    @property
    def rescore(self) -> bool:
        """Whether candidates are re-scored by their neighbourhoods (the ``semsam`` arm)."""
        return self.arm == "semsam"

    def rule_params(self) -> dict[str, Any]:
        """Keyword arguments of the pure decode rule (``mislib.semsam.select_next_token``)
        for this arm, so every backend's adapter decides the same way."""
        return {"temperature": float(self.temperature), "top_k": int(self.top_k),
                "top_p": float(self.top_p), "mode": self.mode, "arm": self.arm}

    def identity(self) -> dict[str, Any]:
        """The settings that change answers (for ``run.json`` and the run id); the table's
        location is not one of them, its hash is."""
        out = dataclasses.asdict(self)
        out.pop("table_path")
        if not self.rescore:  # the table only changes the semsam arm's answers
            out.pop("table_key")
        if not self.reasoning_budget:  # no budget: runs from before budgets keep their ids
            out.pop("reasoning_budget")
            out.pop("forced_answer_tokens")
        return out


@dataclass(frozen=True)
class Generation:
    """What a backend returns for one request.

    Attributes
    ----------
    text : decoded answer (special tokens removed).
    n_tokens : tokens the model generated, up to and including the end-of-turn token.
    token_ids : the sequence after the prompt (for cross-backend identity checks): the
        generated tokens and, where the answer was forced, the appended ``</think>`` +
        ``Answer:`` between them (so ``len(token_ids)`` exceeds ``n_tokens`` by those).
    thinking_tokens, answer_tokens : of ``n_tokens``, those the model wrote inside its
        ``<think>`` block (up to and including its own ``</think>``; a forced answer's
        whole first phase) and those it wrote after it (after the appended ``Answer:``
        when forced); the appended tokens count in neither. None where the run has no
        reasoning budget (:mod:`mislib.inference.thinking`).
    forced_answer : whether the budget ran out inside the block and the backend closed it
        and appended ``Answer:``; None without a budget.
    status : the record's status (:data:`mislib.vocabulary.RECORD_STATUSES`); other than
        ``"ok"`` when the request failed for this record alone (an endpoint's malformed
        reply), which is then recorded with ``error`` and not parsed.
    error : what went wrong (None when ``status`` is ``"ok"``).
    usage : record fields the backend measured besides the text (an endpoint's
        ``prompt_tokens``, ``completion_tokens``, ``cost_usd``).
    """

    text: str
    n_tokens: int
    token_ids: tuple[int, ...] = ()
    thinking_tokens: int | None = None
    answer_tokens: int | None = None
    forced_answer: bool | None = None
    status: str = "ok"
    error: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; the stage checks a run against it before generating.

    Attributes
    ----------
    arms : arms it can decode.
    embeddings : whether it exposes the model's input embeddings and tokenizer
        (``input_embeddings()``, ``tokenizer``), which the SemSam table is built from.
    max_batch : requests per :meth:`Backend.generate` call it wants at most (None: the
        profile's ``batch_size`` decides).
    max_concurrency : requests it runs at once (1 for a local model; an endpoint's limit).
    """

    arms: tuple[str, ...] = ARMS
    embeddings: bool = True
    max_batch: int | None = None
    max_concurrency: int = 1
    extras: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """A loaded model that answers requests.

    Construction: ``Backend(source, model_id=..., revision=..., device=..., **options)``
    where ``source`` is what :func:`mislib.inference.registry.resolve_model` returned (a
    folder or a hub id). The registry constructs backends; the stage only uses the
    members below.
    """

    model_id: str
    revision: str
    capabilities: Capabilities

    def settings(self) -> dict[str, Any]:
        """The run identity's backend part: JSON-serialisable facts that change the pixels
        or tokens the model sees or produces (model class, dtype, device, processor pixel
        budgets and frame handling, chat template hash, generation config)."""
        ...

    def generate(self, requests: Sequence[Request],
                 decode: DecodeSettings) -> list[Generation]:
        """One :class:`Generation` per request, in order.

        Out-of-memory errors propagate (the stage halves the batch and retries); any other
        error stops the run.
        """
        ...


@runtime_checkable
class StreamingBackend(Backend, Protocol):
    """A backend that answers many requests at once and hands each back as it finishes
    (an HTTP endpoint): the stage appends every record the moment it arrives, so a kill
    loses no finished request, and the next request starts as soon as a slot frees."""

    def stream(self, requests: Iterable[Request],
               decode: DecodeSettings) -> Iterator[tuple[Request, Generation]]:
        """(request, generation) pairs in the order they finish, one per request.

        ``requests`` is consumed lazily, at most ``capabilities.max_concurrency`` ahead of
        the finished ones. An error that concerns the whole run (bad credentials, a spent
        budget, an endpoint that stays unreachable) propagates after the pairs already
        yielded; one that concerns a single request is its generation's ``status``.
        """
        ...
