"""The ``openai`` backend: any OpenAI-compatible chat-completions endpoint.

A hosted model (an API that speaks the OpenAI protocol), a vLLM server, or any other local
server answers the benchmark through ``POST {base_url}/chat/completions``, one request per
(question, trial). What the model is shown is what the local backends show it
(:func:`mislib.inference.prompts.conversation`): the question as the user turn, a 2D picture
as a base64 PNG data URL, a 3D stack as one image per frame (``stack_as="images"``, what
hosted APIs take) or as one video of exactly those frames (``stack_as="video"``, vLLM's
``video/jpeg`` frame sequence, never re-sampled, at the frame rate the server declares:
``mislib serve`` declares the profile's ``video_fps``).

**Arms over HTTP.** On a server that ``python -m mislib serve`` started (vLLM with SemSam's
logits processor; see :mod:`mislib.serve`) every arm goes through the processor: the request
carries ``temperature=0``, its (question, trial) seed and ``vllm_xargs={"semsam_arm": ARM}``,
so a remote GPU decodes exactly as the offline vllm backend, draw for draw. Any other server
runs the ``baseline`` arm only, with its own sampler under the profile's decode settings and
the per-(question, trial) ``seed`` (honoured where the endpoint supports seeds); ``greedy``
and ``semsam`` are refused there with a message saying how to start a server that has them.
The backend tells the two apart by the server's ``GET {base_url}/mislib/semsam`` (served by
mislib's middleware beside the processor), which also reports the server's rule settings
and table hash: they enter the run identity, and a rule that differs from the profile's is
refused.

**Reliability.** Requests run concurrently (asyncio and httpx, at most ``max_concurrency``
in flight) and each finished one is handed to the stage at once (:meth:`stream`), which
appends it to the result store, so a killed run resumes with every (question, trial) exactly
once. 429, 5xx, timeouts and lost connections are retried with exponential backoff and
jitter, honouring ``Retry-After``, for up to ``retry_for_s`` seconds per request (a server
that restarts is waited for; once it answers again it is asked what it is, and if another
server answers now, :class:`ServerChanged` stops the run before a request reaches it, since
the run identity records the server, :meth:`OpenAIBackend.settings`). A 401/403 stops the
run at once (:class:`EndpointAuthError`);
a reply that is not a chat completion becomes that record's ``bad_response`` status and a
request the endpoint refuses (400, 413, 422) its ``request_error``. ``request_budget`` and
``token_budget`` cap what one run call may spend (:class:`BudgetSpent` once reached, after
the requests in flight finish). Token usage, and the cost where prices are given, is
recorded per record.

**The key.** Only the *name* of the environment variable that holds the API key is
configured (``api_key_env``); the key is read from the environment when the backend is
built, sent as a bearer token, and removed from every error message and log line. It never
reaches ``run.json``, the sessions or the shards.

>>> from mislib.inference.registry import load_backend
>>> backend = load_backend("openai", "gemini-3-flash",
...                        base_url="https://example.invalid/v1",
...                        api_key_env="GEMINI_API_KEY")                   # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import io
import json
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import httpx  # here, not in mislib's import path: the registry imports this module lazily
import numpy as np

from mislib.config import check_key_env
from mislib.inference.prompts import conversation
from mislib.inference.protocol import ARMS, Capabilities, DecodeSettings, Generation, Request

log = logging.getLogger(__name__)

#: Key of the per-request arm in ``vllm_xargs`` (the processor's ``extra_args`` key).
ARM_KEY = "semsam_arm"
#: Path, under ``base_url``, where mislib's server middleware describes its SemSam processor.
SEMSAM_INFO_PATH = "/mislib/semsam"
#: HTTP statuses retried with backoff (rate limits, overload, a server restarting).
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
#: HTTP statuses that reject one request only: the record is kept with ``request_error``.
RECORD_ERROR_STATUSES = frozenset({400, 413, 422})
STACK_AS = ("images", "video")
#: An endpoint's own sampler is seeded with the trial seed modulo this (32-bit seeds).
SEED_MODULUS = 2**31


class EndpointError(RuntimeError):
    """An endpoint failure that stops the run (records already written are kept)."""


class EndpointAuthError(EndpointError):
    """The endpoint refused the credentials (HTTP 401 or 403)."""


class ServerChanged(EndpointError):
    """Another server answers at the URL than the one the run started with (seen after a
    lost connection); its records would join a run that is not theirs."""


class BudgetSpent(EndpointError):
    """The run's request or token budget is spent; rerun (with a new budget) to go on."""


class OpenAIBackend:
    """A model behind an OpenAI-compatible ``/chat/completions`` endpoint.

    Parameters
    ----------
    source, model_id, revision : as for every backend (the registry resolves them);
        ``model_id`` is what the profile and the records call the model.
    base_url : the API root, e.g. ``https://api.example.com/v1`` or
        ``http://127.0.0.1:8000/v1``.
    served_model : the model name the endpoint expects (default: ``model_id``).
    api_key_env : the NAME of the environment variable holding the API key (None: send no
        key, as for a local server without ``--api-key``); a value not shaped like a name
        (:func:`mislib.config.check_key_env`) is refused without being quoted.
    stack_as : ``"images"`` (one image per frame) or ``"video"`` (one video; vLLM servers,
        which declare its frame rate themselves: ``mislib serve`` the profile's
        ``video_fps``).
    video_fps : the profile's frame rate for stacks; a server started by ``mislib serve``
        with another rate is refused (other servers declare their own, recorded as such).
    max_concurrency : requests in flight at once.
    request_budget, token_budget : the most HTTP requests (retries included) and tokens
        (prompt plus completion) one run may spend (one :meth:`stream`, i.e. one (model,
        arm) run call; None: no cap).
    price_prompt_per_mtok, price_completion_per_mtok : USD per million tokens; with both
        given each record gets ``cost_usd``.
    timeout_s : seconds one request may take.
    retry_for_s : seconds a request keeps being retried before the run stops.
    backoff_s, max_backoff_s : first and largest wait between retries (doubling, jittered).
    send_top_k : send ``top_k`` with the baseline arm (default: only to a vLLM server; the
        OpenAI API rejects it).
    device : ignored (the endpoint decides where the model runs).
    """

    def __init__(self, source: str, model_id: str | None = None, revision: str = "main",
                 base_url: str | None = None, served_model: str | None = None,
                 api_key_env: str | None = None, stack_as: str = "images",
                 video_fps: float = 1.0, max_concurrency: int = 8,
                 request_budget: int | None = None, token_budget: int | None = None,
                 price_prompt_per_mtok: float | None = None,
                 price_completion_per_mtok: float | None = None, timeout_s: float = 300.0,
                 retry_for_s: float = 600.0, backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0, send_top_k: bool | None = None,
                 device: str = "auto"):
        del device
        if not base_url:
            raise ValueError("openai backend: no base_url (the endpoint's API root, e.g. "
                             "http://127.0.0.1:8000/v1): set it in the profile's model entry "
                             "or pass --base-url")
        if stack_as not in STACK_AS:
            raise ValueError(f"openai backend: stack_as must be one of {STACK_AS}, got "
                             f"{stack_as!r}")
        if int(max_concurrency) < 1:
            raise ValueError(f"openai backend: max_concurrency must be >= 1, got "
                             f"{max_concurrency!r}")
        self.model_id = model_id or source
        self.served_model = served_model or self.model_id
        self.revision = revision
        self.base_url = str(base_url).rstrip("/")
        # a name, never a key: checked here too (a backend built without a profile), with
        # an error that does not quote the value
        self.api_key_env = None if api_key_env is None else check_key_env(api_key_env)
        self._key: str | None = None
        self.stack_as = stack_as
        self.video_fps = float(video_fps)
        self.max_concurrency = int(max_concurrency)
        self.request_budget = None if request_budget is None else int(request_budget)
        self.token_budget = None if token_budget is None else int(token_budget)
        self.prices = (price_prompt_per_mtok, price_completion_per_mtok)
        self.timeout_s = float(timeout_s)
        self.retry_for_s = float(retry_for_s)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.n_requests = 0
        self.n_tokens = 0
        self._connection_lost = False
        self._send_top_k = send_top_k
        self.refresh()

    def refresh(self) -> None:
        """Ask the server what it serves and how it decodes (``GET /models``, its SemSam
        description), and set the arms it can decode from that. Called when the backend is
        built and again whenever the registry hands out the kept one: another server may
        answer at the same URL by now, and the run identity (:meth:`settings`) must be
        the one of the server that will answer."""
        self._read_key()
        self._connection_lost = False
        self.server = self._describe_server()
        self.semsam_server = self.server.pop("semsam", None)
        self.vllm_server = self.server.get("owned_by") == "vllm"
        self.send_top_k = (self.vllm_server if self._send_top_k is None
                           else bool(self._send_top_k))
        if self.semsam_server:
            arms, note = ARMS, None
        else:
            arms = ("baseline",)
            note = (f"the server at {self.base_url} has no mislib SemSam processor (no "
                    f"{SEMSAM_INFO_PATH}); greedy and semsam run only on a vLLM server "
                    "started with `python -m mislib serve --profile P --model NAME`")
        self.capabilities = Capabilities(
            arms=arms, embeddings=False, max_batch=None,
            max_concurrency=self.max_concurrency,
            extras={"semsam_on_server": bool(self.semsam_server), "arms_note": note})

    # ---------------------------------------------------------------- the key
    def _read_key(self) -> None:
        """Read the key from its variable (again at every run: the registry keeps a loaded
        backend for the next arm, and the variable may have changed meanwhile)."""
        if not self.api_key_env:
            return
        self._key = os.environ.get(self.api_key_env)
        if not self._key:
            raise ValueError(f"openai backend: the environment variable {self.api_key_env!r} "
                             "(the model's api_key_env) is not set; export the API key under "
                             "that name")

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        return headers

    def redact(self, text: str) -> str:
        """``text`` with the API key (if any) replaced by ``***``."""
        text = str(text)
        return text.replace(self._key, "***") if self._key else text

    # ---------------------------------------------------------------- the server
    def _describe_server(self) -> dict[str, Any]:
        """The served model's metadata (``GET /models``) and mislib's SemSam description.

        Raises :class:`EndpointAuthError` on 401/403, :class:`EndpointError` when the
        endpoint cannot be reached or answers one of these questions with a status that
        says "not now" (:data:`RETRY_STATUSES`: a 503 while it restarts, a 429): such an
        answer says nothing about which server it is, and taking it for "lists nothing"
        would make another run identity (a finished run sent again, a run stopped as if
        another server answered).
        """
        try:
            with httpx.Client(timeout=min(self.timeout_s, 60.0), headers=self._headers()) as client:
                models = client.get(f"{self.base_url}/models")
                self._raise_for_auth(models)
                self._raise_if_not_now(models)
                info: dict[str, Any] = {}
                if models.status_code == 200:
                    try:
                        listed = {m.get("id"): m for m in models.json().get("data", [])}
                    except (ValueError, AttributeError):
                        listed = {}
                    # some APIs list ids with a prefix ("models/<id>"); a model that is not
                    # listed at all is left to the first request's 404, which names it
                    entry = next((m for k, m in listed.items()
                                  if str(k) == self.served_model
                                  or str(k).endswith("/" + self.served_model)), None)
                    if listed and entry is None:
                        log.warning("%s does not list model %r (it lists %s)", self.base_url,
                                    self.served_model, sorted(str(k) for k in listed)[:10])
                    entry = entry or {}
                    info = {k: entry[k] for k in ("owned_by", "root", "max_model_len")
                            if k in entry}
                if info.get("owned_by") == "vllm":
                    # vLLM's version changes its numerics (the vllm backend records its own)
                    version = client.get(self.base_url.removesuffix("/v1") + "/version")
                    self._raise_if_not_now(version)
                    with contextlib.suppress(ValueError, AttributeError):
                        if version.status_code == 200 and version.json().get("version"):
                            info["version"] = str(version.json()["version"])
                semsam = client.get(self.base_url + SEMSAM_INFO_PATH)
                self._raise_for_auth(semsam)
                self._raise_if_not_now(semsam)
                if semsam.status_code == 200:
                    try:
                        described = semsam.json()
                    except ValueError:
                        described = None
                    if isinstance(described, Mapping) and described.get("processor"):
                        info["semsam"] = dict(described)
                return info
        except httpx.HTTPError as error:
            raise EndpointError(f"cannot reach {self.base_url}: "
                                f"{self.redact(type(error).__name__ + ': ' + str(error))}") from None

    def _raise_if_not_now(self, response: httpx.Response) -> None:
        if response.status_code in RETRY_STATUSES:
            raise EndpointError(
                f"{response.request.url} answered HTTP {response.status_code} "
                f"({self.redact(_error_message(response))}) when asked what the server is; "
                "it cannot say which server answers now: try again later")

    def _raise_for_auth(self, response: httpx.Response) -> None:
        if response.status_code in (401, 403):
            detail = self.redact(_error_message(response))
            hint = (f"check the key in ${self.api_key_env}" if self.api_key_env else
                    "the profile's model entry names no api_key_env: set one")
            raise EndpointAuthError(
                f"{self.base_url} refused the credentials (HTTP {response.status_code}: "
                f"{detail}); {hint}. The run stopped; the records written so far are kept")

    def settings(self) -> dict[str, Any]:
        """The run identity's backend part: the protocol, the served model, how media are
        sent, which decoder answers (the server's SemSam description: processor, rule,
        table hash, ``k``, model, frame rate; or its own sampler with the parameters sent),
        and what the server says it is (:meth:`server_identity`). The URL is not part of
        it (a server that moves keeps its runs); :meth:`session_info` records it per
        session. A different server behind the same URL is therefore a different run: its
        records never join the stored ones."""
        out: dict[str, Any] = {
            "api": "openai-chat-completions", "served_model": self.served_model,
            "stack_as": self.stack_as, "image_encoding": "png-base64",
            "decoder": "mislib-semsam-processor" if self.semsam_server else "server-sampler",
        }
        server = self.server_identity()
        if server:
            out["server"] = server
        if self.stack_as == "video":
            # the server declares the frame rate: mislib serve the profile's, others their own
            out["video_fps"] = (self.semsam_server or {}).get("video_fps", "server default")
        if self.semsam_server:
            # the whole description the server gives, as the server gives it
            out["semsam_server"] = {k: self.semsam_server[k]
                                    for k in sorted(self.semsam_server)}
        else:
            out["sent_params"] = ["temperature", "top_p", "seed mod 2^31", "max_tokens"] + (
                ["top_k"] if self.send_top_k else [])
        return out

    def server_identity(self, server: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """What the server says about the model it serves, where it says it (``GET
        /models``: the weights it loaded, ``root``, and who serves it, ``owned_by``; a vLLM
        server's ``GET /version``). Empty for an API that lists none of it. ``server``: a
        description read now (default: the one this backend read last)."""
        server = self.server if server is None else server
        return {k: server[k] for k in ("root", "owned_by", "version") if k in server}

    def session_info(self) -> dict[str, Any]:
        """Facts of this session beyond the identity: the endpoint and its model metadata
        (never the key: only the name of its environment variable)."""
        return {"base_url": self.base_url, "api_key_env": self.api_key_env,
                "server": dict(self.server), "max_concurrency": self.max_concurrency,
                "request_budget": self.request_budget, "token_budget": self.token_budget}

    def check_decode(self, decode: DecodeSettings) -> None:
        """Refuse an arm the server cannot decode, or a rule that differs from the server's."""
        if getattr(decode, "reasoning_budget", 0):
            raise ValueError(
                f"openai backend: model {self.model_id!r} has a reasoning_budget, but an "
                "endpoint decodes on its server, where mislib cannot close a <think> block and "
                "force the answer; set reasoning_budget = 0 in its entry (a hosted thinking "
                "model reasons as its API decides) or run it on the hf or vllm backend")
        if decode.arm not in self.capabilities.arms:
            raise ValueError(f"openai backend cannot decode the {decode.arm!r} arm: "
                             f"{self.capabilities.extras['arms_note']}")
        if self.semsam_server:
            rule = self.semsam_server.get("rule") or {}
            wanted = {"temperature": float(decode.temperature), "top_k": int(decode.top_k),
                      "top_p": float(decode.top_p), "mode": decode.mode}
            differ = {k: (rule.get(k), v) for k, v in wanted.items() if rule.get(k) != v}
            served_k = self.semsam_server.get("k")
            if decode.arm == "semsam" and served_k is not None and served_k != int(decode.k):
                differ["k"] = (served_k, int(decode.k))  # the table's neighbours per token
            if differ:
                raise ValueError(
                    f"the SemSam server at {self.base_url} decodes with a rule that differs "
                    "from the profile's (server, profile): "
                    + ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in differ.items())
                    + "; restart it with `python -m mislib serve --profile <this profile>`")
            served_fps = self.semsam_server.get("video_fps")
            if self.stack_as == "video" and served_fps not in (None, self.video_fps):
                raise ValueError(
                    f"the SemSam server at {self.base_url} declares videos at {served_fps} "
                    f"frames/s, the profile at {self.video_fps}; restart it with "
                    "`python -m mislib serve --profile <this profile>`")
            if decode.arm == "semsam" and not self.semsam_server.get("table_key"):
                raise ValueError(f"the SemSam server at {self.base_url} has no neighbour "
                                 "table, so it cannot decode the semsam arm")

    # ---------------------------------------------------------------- requests
    def messages(self, request: Request) -> list[dict[str, Any]]:
        """The chat turn of one request, media as data URLs in :func:`conversation`'s order."""
        media = request.media
        turn = conversation(request.text, media, self.stack_as == "video")
        if isinstance(media, np.ndarray):
            frames = [_png_base64(frame) for frame in media]
        elif media is not None:
            frames = [_png_base64(media)]
        else:
            frames = []
        parts, position = [], 0
        for part in turn[0]["content"]:
            if part["type"] == "image":
                parts.append({"type": "image_url", "image_url": {
                    "url": "data:image/png;base64," + frames[position]}})
                position += 1
            elif part["type"] == "video":
                # vLLM's frame-sequence video: comma-separated base64 frames, read by PIL
                parts.append({"type": "video_url",
                              "video_url": {"url": "data:video/jpeg;base64," + ",".join(frames)}})
            else:
                parts.append(part)
        return [{"role": "user", "content": parts}]

    def body(self, request: Request, decode: DecodeSettings) -> dict[str, Any]:
        """The JSON body of one chat-completions request."""
        body: dict[str, Any] = {"model": self.served_model, "messages": self.messages(request),
                                "max_tokens": int(decode.max_new_tokens), "n": 1}
        if self.semsam_server:
            # the processor keys its draws by the full seed, as the offline backends do
            body.update(temperature=0.0, seed=int(request.seed),
                        vllm_xargs={ARM_KEY: decode.arm})
        else:
            # an API's own sampler; some take 32-bit seeds only, so the trial seed's low bits
            body.update(temperature=float(decode.temperature), top_p=float(decode.top_p),
                        seed=int(request.seed) % SEED_MODULUS)
            if self.send_top_k:
                body["top_k"] = int(decode.top_k)
        if self.vllm_server:
            # a video's frame rate and frame sampling are the server's settings (vLLM refuses
            # per-request media kwargs unless started with --trust-request-mm-kwargs):
            # ``mislib serve`` declares the profile's video_fps and keeps every frame
            body.update(skip_special_tokens=True, return_token_ids=True)
        return body

    def generate(self, requests: Iterable[Request],
                 decode: DecodeSettings) -> list[Generation]:
        """One generation per request, in order (the batch form of :meth:`stream`)."""
        requests = list(requests)
        done = dict(((r.key, g) for r, g in self.stream(requests, decode)))
        return [done[r.key] for r in requests]

    def stream(self, requests: Iterable[Request],
               decode: DecodeSettings) -> Iterator[tuple[Request, Generation]]:
        """(request, generation) pairs as they finish, ``max_concurrency`` in flight.

        The requests run on an event loop in a thread of their own; stopping the iteration
        (an error in the caller, a kill) cancels the ones in flight.
        """
        self.check_decode(decode)
        self._read_key()
        self.n_requests = self.n_tokens = 0  # the budgets are per run
        results: queue.Queue = queue.Queue()
        finished = object()
        state: dict[str, Any] = {}

        def run() -> None:
            try:
                asyncio.run(self._run(iter(requests), decode, results, state))
            except BaseException as error:  # handed to the caller's thread
                results.put(error)
            finally:
                results.put(finished)

        thread = threading.Thread(target=run, name="openai-backend", daemon=True)
        thread.start()
        try:
            while True:
                item = results.get()
                if item is finished:
                    break
                if isinstance(item, BaseException):
                    if isinstance(item, asyncio.CancelledError):
                        continue
                    raise item
                yield item
        finally:
            loop, task = state.get("loop"), state.get("task")
            if loop is not None and task is not None and not task.done():
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(task.cancel)
            thread.join()

    async def _run(self, requests: Iterator[Request], decode: DecodeSettings,
                   results: queue.Queue, state: dict[str, Any]) -> None:
        state.update(loop=asyncio.get_running_loop(), task=asyncio.current_task())
        limits = httpx.Limits(max_connections=self.max_concurrency,
                              max_keepalive_connections=self.max_concurrency)
        async with httpx.AsyncClient(timeout=self.timeout_s, limits=limits,
                                     headers=self._headers()) as client:
            pending: set[asyncio.Task] = set()
            more, stop = True, None
            try:
                while True:
                    while more and stop is None and len(pending) < self.max_concurrency:
                        try:
                            self._check_budget()
                        except BudgetSpent as error:
                            stop = error
                            break
                        # the next request reads its media from disk: off the event loop
                        request = await asyncio.to_thread(next, requests, None)
                        if request is None:
                            more = False
                            break
                        pending.add(asyncio.create_task(self._answer(client, request, decode)))
                    if not pending:
                        break
                    done, pending = await asyncio.wait(pending,
                                                       return_when=asyncio.FIRST_COMPLETED)
                    fatal = None
                    for task in done:  # every outcome is read, so none is left unretrieved
                        error = task.exception()
                        if error is None:
                            results.put(task.result())
                        elif isinstance(error, BudgetSpent):
                            stop = stop or error  # the others in flight may finish
                        else:
                            fatal = fatal or error
                    if fatal is not None:
                        raise fatal
                if stop is not None:
                    raise stop
            finally:
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.gather(*pending, return_exceptions=True)

    def _check_budget(self) -> None:
        if self.request_budget is not None and self.n_requests >= self.request_budget:
            raise BudgetSpent(f"the request budget of {self.request_budget} requests is "
                              "spent; the records written so far are kept, rerun to go on")
        if self.token_budget is not None and self.n_tokens >= self.token_budget:
            raise BudgetSpent(f"the token budget of {self.token_budget} tokens is spent "
                              f"({self.n_tokens} used); the records written so far are kept, "
                              "rerun to go on")

    async def _answer(self, client: httpx.AsyncClient, request: Request,
                      decode: DecodeSettings) -> tuple[Request, Generation]:
        body = await asyncio.to_thread(self.body, request, decode)
        payload = json.dumps(body).encode()
        t0 = time.perf_counter()
        response = await self._post(client, payload, request)
        latency = time.perf_counter() - t0
        if response.status_code in RECORD_ERROR_STATUSES:
            message = self.redact(_error_message(response))
            log.warning("question %s trial %d: the endpoint refused the request (HTTP %d: %s)",
                        request.question_id, request.trial, response.status_code, message)
            return request, Generation("", 0, status="request_error",
                                       error=f"HTTP {response.status_code}: {message}"[:1000],
                                       usage={"latency_s": latency})
        return request, self._generation(response, request, latency)

    async def _post(self, client: httpx.AsyncClient, payload: bytes,
                    request: Request) -> httpx.Response:
        """POST with retries; a response to keep (2xx or a per-record 4xx), or an error that
        stops the run."""
        url = f"{self.base_url}/chat/completions"
        first_failure: float | None = None
        attempt = 0
        while True:
            self._check_budget()
            retry_after = None
            if self._connection_lost and not await self._check_same_server():
                # not sent: the server cannot say yet whether it is this run's one
                problem = "after a lost connection the server cannot say yet what it is"
            else:
                self.n_requests += 1
                try:
                    response = await client.post(url, content=payload)
                except (httpx.TimeoutException, httpx.TransportError) as error:
                    problem = f"{type(error).__name__}: {error}"
                    # the server may be restarting, perhaps as another one: asked before
                    # the next request of this run is sent
                    self._connection_lost = True
                else:
                    self._raise_for_auth(response)
                    if response.status_code not in RETRY_STATUSES:
                        if (response.status_code < 300
                                or response.status_code in RECORD_ERROR_STATUSES):
                            return response
                        raise EndpointError(
                            f"{url} answered HTTP {response.status_code} "
                            f"({self.redact(_error_message(response))}) to question "
                            f"{request.question_id} trial {request.trial}; the run stopped, "
                            "the records written so far are kept")
                    problem = f"HTTP {response.status_code}"
                    retry_after = _retry_after(response.headers.get("retry-after"))
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            if now - first_failure > self.retry_for_s:
                raise EndpointError(
                    f"{url} kept failing for {self.retry_for_s:.0f} s ({self.redact(problem)}); "
                    "the run stopped, the records written so far are kept: rerun to resume")
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** attempt)
            delay *= random.uniform(0.5, 1.0)
            if retry_after is not None:
                left = self.retry_for_s - (now - first_failure)
                if retry_after > left:  # waiting would outlast retry_for_s: stop now
                    raise EndpointError(
                        f"{url} answered {self.redact(problem)} with Retry-After "
                        f"{retry_after:.0f} s, beyond the {left:.0f} s left of retry_for_s; "
                        "the run stopped, the records written so far are kept: rerun later")
                delay = max(delay, retry_after)
            log.warning("question %s trial %d: %s; retrying in %.1f s", request.question_id,
                        request.trial, self.redact(problem), delay)
            attempt += 1
            await asyncio.sleep(delay)

    async def _check_same_server(self) -> bool:
        """After a lost connection: once the server answers again, check that it is the
        one this run's identity records (:meth:`server_identity`, the SemSam description);
        raise :class:`ServerChanged` if another one answers. False while it cannot be
        reached or cannot say what it is: the request is not sent, and is retried as a
        failed one (a request sent then could reach another server before it is asked)."""
        try:
            info = await asyncio.to_thread(self._describe_server)
        except EndpointAuthError:
            raise
        except EndpointError:
            return False  # still down or busy: the request's own retry waits for it
        now = {"server": self.server_identity(info),
               "semsam": info.get("semsam")}
        then = {"server": self.server_identity(), "semsam": self.semsam_server}
        if now != then:
            changed = sorted(k for part in ("server", "semsam")
                             for k in set(now[part] or {}) | set(then[part] or {})
                             if (now[part] or {}).get(k) != (then[part] or {}).get(k))
            raise ServerChanged(
                f"another server answers at {self.base_url} than the one this run started "
                f"with (it differs in {', '.join(changed)}); the run stopped so that its "
                "answers do not join this run's records (kept): rerun to start its own run")
        self._connection_lost = False
        return True

    def _generation(self, response: httpx.Response, request: Request,
                    latency: float) -> Generation:
        """A 2xx response as a generation; one that is not a chat completion as a
        ``bad_response`` generation keeping the start of the body."""
        try:
            data = response.json()
            message = data["choices"][0]["message"]
            content = message.get("content")
            if isinstance(content, list):  # content parts, as some servers send them
                content = "".join(part["text"] for part in content
                                  if part.get("type") == "text")
            if content is not None and not isinstance(content, str):
                raise TypeError(f"message content is {type(content).__name__}, not text")
            token_ids = tuple(int(t) for t in data["choices"][0].get("token_ids") or ())
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as error:
            snippet = self.redact(response.text[:300])
            log.warning("question %s trial %d: malformed reply from the endpoint (%s)",
                        request.question_id, request.trial, error)
            return Generation("", 0, status="bad_response",
                              error=f"not a chat completion ({type(error).__name__}: "
                                    f"{self.redact(str(error))[:200]}); body: {snippet!r}",
                              usage={"latency_s": latency})
        text = content or ""
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            text = f"<think>{reasoning}</think>{text}"  # kept raw; the parser strips it
        usage = data.get("usage") if isinstance(data.get("usage"), Mapping) else {}
        prompt_tokens = _int_or_none(usage.get("prompt_tokens"))
        completion_tokens = _int_or_none(usage.get("completion_tokens"))
        self.n_tokens += (prompt_tokens or 0) + (completion_tokens or 0)
        fields: dict[str, Any] = {"prompt_tokens": prompt_tokens,
                                  "completion_tokens": completion_tokens,
                                  "latency_s": latency}
        price_prompt, price_completion = self.prices
        if None not in (price_prompt, price_completion, prompt_tokens, completion_tokens):
            fields["cost_usd"] = (prompt_tokens * float(price_prompt)
                                  + completion_tokens * float(price_completion)) / 1e6
        n_tokens = completion_tokens if completion_tokens is not None else len(token_ids)
        return Generation(text, int(n_tokens), token_ids, usage=fields)


def _png_base64(image: Any) -> str:
    """A PIL image or an ``[H, W, 3]`` uint8 array as base64 PNG (lossless: the model sees
    the rendered pixels, as with the local backends)."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_message(response: httpx.Response) -> str:
    """The endpoint's error message (OpenAI's ``{"error": {"message": ...}}`` or the body)."""
    try:
        data = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(data, Mapping):
        error = data.get("error", data)
        if isinstance(error, Mapping) and error.get("message"):
            return str(error["message"])[:300]
        if isinstance(data.get("message"), str):
            return data["message"][:300]
    return json.dumps(data)[:300]


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
