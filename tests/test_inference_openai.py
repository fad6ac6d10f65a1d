"""The openai backend: stage 04 through an OpenAI-compatible chat-completions endpoint.

Two kinds of server, both on 127.0.0.1:

- a tiny stdlib ``http.server`` standing in for a hosted API, scripted per test (answers,
  429 with ``Retry-After``, 401 after a number of requests, a body that is not JSON), for the
  backend's own rules: usage and cost per record, retries, budgets, the key never written,
  a malformed reply as a record status;
- the real vLLM OpenAI server of ``.venv-vllm`` serving the smoke model with SemSam's
  processor (``python -m mislib serve``), one per module, for what only a real server shows:
  a server killed in the middle of a run and started again, a 401 from ``--api-key``, and
  the semsam and greedy arms decoded on the server as the hf backend decodes them locally.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
from conftest import require
from test_inference import seed_random_table

from mislib.config import load_profile
from mislib.inference import read_shards, run_inference
from mislib.paths import REPO_ROOT
from mislib.smoke import write_smoke_benchmark

KEY_ENV = "MISLIB_TEST_OPENAI_KEY"
SECRET = "sk-test-0123456789-do-not-log"


# ----------------------------------------------------------------------------------------
# A scripted stand-in for a hosted endpoint
# ----------------------------------------------------------------------------------------
class FakeEndpoint:
    """An OpenAI-compatible server on 127.0.0.1 whose replies a test scripts.

    ``script(n, body)`` decides the reply to the ``n``-th chat request (0-based): a tuple
    ``(status, headers, body_bytes)``, or None to drop the connection without a reply; the
    default answers "Answer: True" with usage.
    Every request body is kept in ``bodies``, every Authorization header in ``auth``.
    """

    def __init__(self, key: str | None = None):
        self.key = key
        # what GET /models lists and GET /mislib/semsam describes (None: 404), as a test sets
        self.models: list[dict] = [{"id": "fake-model", "object": "model", "owned_by": "fake"}]
        self.semsam: dict | None = None
        # statuses a GET of a path ending so ("/models", "/mislib/semsam") answers with
        # first, one per request (a 503 while a proxy's server restarts, a 429); then the
        # path answers as set above
        self.describe_errors: dict[str, list[int]] = {}
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self.script = self.answer
        self.lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status, headers, body):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                with endpoint.lock:
                    error = next((statuses.pop(0) for suffix, statuses
                                  in endpoint.describe_errors.items()
                                  if self.path.endswith(suffix) and statuses), None)
                if error is not None:
                    self._send(error, {}, b'{"error": {"message": "try again later"}}')
                elif self.path.endswith("/models"):
                    body = json.dumps({"object": "list", "data": endpoint.models})
                    self._send(200, {"Content-Type": "application/json"}, body.encode())
                elif self.path.endswith("/mislib/semsam") and endpoint.semsam:
                    self._send(200, {"Content-Type": "application/json"},
                               json.dumps(endpoint.semsam).encode())
                else:
                    self._send(404, {}, b'{"detail": "Not Found"}')

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with endpoint.lock:
                    n = len(endpoint.bodies)
                    endpoint.bodies.append(body)
                    endpoint.auth.append(self.headers.get("Authorization"))
                reply = endpoint.script(n, body)
                if reply is None:  # the connection drops without a reply (a server restart)
                    self.close_connection = True
                    return
                self._send(*reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def answer(n, body, text="Answer: True"):
        reply = {"id": f"c{n}", "object": "chat.completion", "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": text}}],
                 "usage": {"prompt_tokens": 100 + n, "completion_tokens": 3,
                           "total_tokens": 103 + n}}
        return 200, {"Content-Type": "application/json"}, json.dumps(reply).encode()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    server = FakeEndpoint()
    yield server
    server.close()


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A project root with a small benchmark of every input kind (no model needed)."""
    root = tmp_path_factory.mktemp("openai_root")
    write_smoke_benchmark(root, n_questions=12, seed=5, image_size=32, n_frames=4)
    return root


def _profile(url, **openai):
    prof = copy.deepcopy(load_profile("demo"))
    prof["name"] = "test"
    prof["inference"].update({"backend": "openai", "models": ["fake-model"], "n_trials": 2,
                              "limit": 0, "max_new_tokens": 8,
                              "openai": {"base_url": url, "backoff_s": 0.05, **openai}})
    return prof


def _run(root, tmp, url, arm="baseline", **openai):
    return run_inference(_profile(url, **openai), arm=arm, root=root, out=tmp / "results",
                         progress=False)


def _all_text(folder: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in folder.rglob("*")
                     if p.is_file() and p.suffix in (".json", ".jsonl"))


# ----------------------------------------------------------------------------------------
# Against the scripted endpoint
# ----------------------------------------------------------------------------------------
def test_every_question_and_trial_is_answered_once_with_usage_and_cost(bench, tmp_path,
                                                                      endpoint):
    run = _run(bench, tmp_path, endpoint.url, price_prompt_per_mtok=2.0,
               price_completion_per_mtok=10.0, max_concurrency=4)
    frame = pd.read_parquet(run.responses)
    n_questions = len(pd.read_parquet(bench / "data/benchmark/questions.parquet"))
    assert len(frame) == 2 * n_questions == len(endpoint.bodies)
    assert not frame.duplicated(["question_id", "trial"]).any()
    assert (frame["status"] == "ok").all() and (frame["raw_text"] == "Answer: True").all()
    assert (frame["backend"] == "openai").all() and (frame["completion_tokens"] == 3).all()
    expected = (frame["prompt_tokens"] * 2.0 + 3 * 10.0) / 1e6
    assert frame["cost_usd"].astype(float).round(12).tolist() == expected.round(12).tolist()
    # each (question, trial) sent its own seed, the stage's, and the profile's decode settings
    sent = {b["seed"] for b in endpoint.bodies}  # the trial seeds' low 31 bits
    assert sent == {s % 2**31 for s in frame["seed"]} and len(sent) == len(frame)
    assert {(b["temperature"], b["top_p"], b["max_tokens"]) for b in endpoint.bodies} == {
        (0.7, 0.8, 8)}
    assert all("top_k" not in b and "vllm_xargs" not in b for b in endpoint.bodies)
    record = json.loads((run.run_dir / "run.json").read_text())
    assert record["backend"] == "openai"
    assert record["processor"]["decoder"] == "server-sampler"


def test_media_go_as_png_data_urls_and_stacks_as_images_or_one_video(bench, endpoint):
    import numpy as np
    from PIL import Image

    from mislib.inference.backends.openai import OpenAIBackend
    from mislib.inference.protocol import Request

    backend = OpenAIBackend("fake-model", base_url=endpoint.url)
    stack = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    parts = backend.messages(Request("q", 0, 1, "Is A above B?", stack))[0]["content"]
    assert [p["type"] for p in parts] == ["image_url"] * 4 + ["text"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert parts[-1] == {"type": "text", "text": "Is A above B?"}
    video = OpenAIBackend("fake-model", base_url=endpoint.url, stack_as="video")
    parts = video.messages(Request("q", 0, 1, "Is A above B?", stack))[0]["content"]
    assert [p["type"] for p in parts] == ["video_url", "text"]
    assert parts[0]["video_url"]["url"].count(",") == 4  # the type's comma, then 3 between frames
    image = Image.new("RGB", (8, 8))
    parts = backend.messages(Request("q", 0, 1, "Which plane?", image))[0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "text"]
    assert backend.messages(Request("q", 0, 1, "text only"))[0]["content"] == [
        {"type": "text", "text": "text only"}]


def test_the_key_is_sent_but_never_written_logged_or_shown(bench, tmp_path, endpoint,
                                                         monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, SECRET)
    failing = {"n": 0}

    def script(n, body):
        if n < 2:  # the endpoint echoes the key in its errors, as some APIs do
            return 503, {"Retry-After": "0"}, json.dumps(
                {"error": {"message": f"overloaded for key {SECRET}"}}).encode()
        if n == 3:
            failing["n"] += 1
            return 400, {}, json.dumps({"error": {"message": f"bad image for {SECRET}"}}).encode()
        return FakeEndpoint.answer(n, body)

    endpoint.script = script
    with caplog.at_level(logging.DEBUG):
        run = _run(bench, tmp_path, endpoint.url, api_key_env=KEY_ENV)
    assert set(endpoint.auth) == {f"Bearer {SECRET}"}
    frame = pd.read_parquet(run.responses)
    refused = frame[frame["status"] == "request_error"]
    assert len(refused) == 1 and "***" in refused["error"].iloc[0]
    assert SECRET not in _all_text(tmp_path / "results")
    assert SECRET not in caplog.text and "***" in caplog.text
    assert KEY_ENV in (run.run_dir / "run.json").read_text()  # its name is recorded, once


def test_429_is_retried_after_the_time_retry_after_asks(bench, tmp_path, endpoint):
    times: list[float] = []

    def script(n, body):
        times.append(time.monotonic())
        if n == 0:
            return 429, {"Retry-After": "1"}, b'{"error": {"message": "slow down"}}'
        return FakeEndpoint.answer(n, body)

    endpoint.script = script
    run = _run(bench, tmp_path, endpoint.url, max_concurrency=1)
    assert times[1] - times[0] >= 0.95
    frame = pd.read_parquet(run.responses)
    assert (frame["status"] == "ok").all() and len(endpoint.bodies) == len(frame) + 1


def test_a_retry_after_beyond_the_retry_window_stops_the_run_without_waiting(bench, tmp_path,
                                                                             endpoint):
    from mislib.inference.backends.openai import EndpointError

    endpoint.script = lambda n, body: (429, {"Retry-After": "6"}, b'{"error": {}}')
    t0 = time.monotonic()
    with pytest.raises(EndpointError, match="Retry-After"):
        _run(bench, tmp_path, endpoint.url, max_concurrency=1, retry_for_s=1.0)
    assert time.monotonic() - t0 < 4 and len(endpoint.bodies) == 1


def test_a_malformed_reply_is_that_records_status_not_a_crash(bench, tmp_path, endpoint):
    def script(n, body):
        if n in (1, 2):
            junk = b"<html>upstream hiccup" if n == 1 else b'{"choices": []}'
            return 200, {"Content-Type": "text/html"}, junk
        return FakeEndpoint.answer(n, body)

    endpoint.script = script
    run = _run(bench, tmp_path, endpoint.url, max_concurrency=1)
    frame = pd.read_parquet(run.responses)
    bad = frame[frame["status"] == "bad_response"]
    assert len(bad) == 2 and (frame["status"] == "ok").sum() == len(frame) - 2
    assert bad["parse_status"].isna().all() and not bad["correct"].any()
    assert any("upstream hiccup" in e for e in bad["error"])


def test_a_reply_with_malformed_token_ids_is_that_records_status_not_a_crash(bench, tmp_path,
                                                                            endpoint):
    def script(n, body):
        if n != 1:
            return FakeEndpoint.answer(n, body)
        reply = json.loads(FakeEndpoint.answer(n, body)[2])
        reply["choices"][0]["token_ids"] = ["not", "ids"]
        return 200, {"Content-Type": "application/json"}, json.dumps(reply).encode()

    endpoint.script = script
    frame = pd.read_parquet(_run(bench, tmp_path, endpoint.url, max_concurrency=1).responses)
    assert (frame["status"] == "bad_response").sum() == 1
    assert (frame["status"] == "ok").sum() == len(frame) - 1


def test_content_parts_and_a_reasoning_field_are_kept_as_the_raw_text(bench, tmp_path,
                                                                       endpoint):
    def script(n, body):
        reply = json.loads(FakeEndpoint.answer(n, body)[2])
        reply["choices"][0]["message"] = {
            "role": "assistant", "reasoning_content": "B lies lower.",
            "content": [{"type": "text", "text": "Answer: "}, {"type": "text", "text": "True"}]}
        return 200, {"Content-Type": "application/json"}, json.dumps(reply).encode()

    endpoint.script = script
    frame = pd.read_parquet(_run(bench, tmp_path, endpoint.url).responses)
    assert (frame["status"] == "ok").all()
    assert (frame["raw_text"] == "<think>B lies lower.</think>Answer: True").all()


def test_none_in_the_calls_endpoint_settings_means_the_profiles_value(bench, tmp_path,
                                                                      endpoint):
    """A notebook's parameters cell leaves a knob at None for "the profile's value"."""
    run = run_inference(_profile(endpoint.url, max_concurrency=1), arm="baseline", root=bench,
                        out=tmp_path / "results", limit=2, progress=False,
                        openai={"max_concurrency": None, "base_url": None})
    frame = pd.read_parquet(run.responses)
    assert len(frame) == 4 and (frame["status"] == "ok").all()
    from mislib.inference.store import read_sessions

    assert [s["backend"]["max_concurrency"] for s in read_sessions(run.responses.parent)] == [1]


def test_a_401_stops_the_run_at_once_and_keeps_what_was_written(bench, tmp_path, endpoint,
                                                               monkeypatch):
    from mislib.inference.backends.openai import EndpointAuthError

    monkeypatch.setenv(KEY_ENV, "sk-an-old-key")  # a backend kept from an earlier run
    run_inference(_profile(endpoint.url, api_key_env=KEY_ENV, max_concurrency=1),
                  arm="baseline", root=bench, out=tmp_path / "earlier", limit=1, progress=False)
    endpoint.bodies.clear()
    endpoint.auth.clear()
    monkeypatch.setenv(KEY_ENV, SECRET)
    endpoint.script = lambda n, body: (
        FakeEndpoint.answer(n, body) if n < 5 else
        (401, {}, json.dumps({"error": {"message": f"invalid key {SECRET}"}}).encode()))
    with pytest.raises(EndpointAuthError) as caught:
        _run(bench, tmp_path, endpoint.url, api_key_env=KEY_ENV, max_concurrency=1)
    assert "HTTP 401" in str(caught.value) and KEY_ENV in str(caught.value)
    assert SECRET not in str(caught.value)
    assert len(endpoint.bodies) == 6  # nothing sent after the refusal
    assert set(endpoint.auth) == {f"Bearer {SECRET}"}  # the variable's value now
    run_dir = next((tmp_path / "results").glob("fake-model-baseline-*"))
    assert len(read_shards(run_dir / "shards")) == 5
    endpoint.script = FakeEndpoint.answer  # a good key again: the run resumes
    run = _run(bench, tmp_path, endpoint.url, api_key_env=KEY_ENV, max_concurrency=1)
    frame = pd.read_parquet(run.responses)
    assert run.n_generated == len(frame) - 5
    assert not frame.duplicated(["question_id", "trial"]).any()


def test_the_request_budget_stops_the_run_and_a_rerun_goes_on(bench, tmp_path, endpoint):
    from mislib.inference.backends.openai import BudgetSpent

    with pytest.raises(BudgetSpent, match="request budget of 7"):
        _run(bench, tmp_path, endpoint.url, request_budget=7, max_concurrency=3)
    assert len(endpoint.bodies) == 7
    # the same (kept) backend gets a fresh budget for the next run
    with pytest.raises(BudgetSpent, match="request budget of 7"):
        _run(bench, tmp_path, endpoint.url, request_budget=7, max_concurrency=3)
    assert len(endpoint.bodies) == 14
    run = _run(bench, tmp_path, endpoint.url)
    frame = pd.read_parquet(run.responses)
    assert run.n_generated == len(frame) - 14 and not frame.duplicated(
        ["question_id", "trial"]).any()


def test_the_token_budget_stops_the_run(bench, tmp_path, endpoint):
    from mislib.inference.backends.openai import BudgetSpent

    with pytest.raises(BudgetSpent, match="token budget of 300"):
        _run(bench, tmp_path, endpoint.url, token_budget=300, max_concurrency=1)
    assert len(endpoint.bodies) == 3  # 103 + 104 + 105 tokens: the third crosses 300


def test_semsam_and_greedy_are_refused_on_a_server_without_the_processor(bench, tmp_path,
                                                                         endpoint):
    for arm in ("semsam", "greedy"):
        with pytest.raises(ValueError, match="no mislib SemSam processor.*mislib serve"):
            _run(bench, tmp_path, endpoint.url, arm=arm)
    assert endpoint.bodies == []


def test_a_reasoning_budget_is_refused_where_a_server_decodes(endpoint):
    from mislib.inference.backends.openai import OpenAIBackend
    from mislib.inference.protocol import DecodeSettings

    backend = OpenAIBackend("fake-model", base_url=endpoint.url)
    decode = DecodeSettings(arm="baseline", temperature=0.7, top_k=20, top_p=0.8,
                            max_new_tokens=8, reasoning_budget=64)
    with pytest.raises(ValueError, match="reasoning_budget = 0"):
        list(backend.stream([], decode))
    assert endpoint.bodies == []


def test_a_semsam_server_with_another_k_is_refused_for_the_semsam_arm(endpoint):
    from mislib.inference.backends.openai import OpenAIBackend
    from mislib.inference.protocol import ARMS, DecodeSettings

    backend = OpenAIBackend("fake-model", base_url=endpoint.url)
    rule = {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "mode": "argmax"}
    backend.semsam_server = {"processor": "p", "rule": rule, "table_key": "t", "k": 16}
    backend.capabilities = dataclasses.replace(backend.capabilities, arms=ARMS)
    settings = dict(max_new_tokens=8, k=32, **rule)
    with pytest.raises(ValueError, match="k 16 vs 32"):
        backend.check_decode(DecodeSettings(arm="semsam", **settings))
    backend.check_decode(DecodeSettings(arm="greedy", **settings))  # greedy reads no table
    backend.check_decode(DecodeSettings(arm="semsam", **{**settings, "k": 16}))


def _serving(endpoint, root="org/model-a", **semsam):
    """Make ``endpoint`` say it serves the weights ``root`` (and, with ``semsam``, that it
    decodes with mislib's processor under the demo profile's rule, as ``mislib serve``)."""
    endpoint.models = [{"id": "fake-model", "object": "model", "owned_by": "fake",
                        "root": root}]
    if semsam:
        rule = {k: load_profile("demo")["semsam"][k]
                for k in ("temperature", "top_k", "top_p", "mode")}
        endpoint.semsam = {"processor": "mislib.semsam.vllm_v1:SemSamV1LogitsProcessor",
                           "model": "fake-model", "rule": rule, "video_fps": 1.0, **semsam}


def test_another_server_at_the_same_url_is_another_run_not_a_fresh_one(bench, tmp_path,
                                                                        endpoint):
    """A finished run, then other weights served at the same URL under the same name: the
    stored run is not current for them; the rerun is a run of its own, sent in full."""
    _serving(endpoint, "org/model-a")
    first = _run(bench, tmp_path, endpoint.url)
    n = len(endpoint.bodies)
    again = _run(bench, tmp_path, endpoint.url)  # the same server: current, nothing sent
    assert (again.run_id, again.n_generated, len(endpoint.bodies)) == (first.run_id, 0, n)
    _serving(endpoint, "org/model-b")
    other = _run(bench, tmp_path, endpoint.url)
    assert other.run_id != first.run_id and other.n_generated == n
    assert len(endpoint.bodies) == 2 * n
    identity = json.loads((other.run_dir / "run.json").read_text())
    assert identity["processor"]["server"] == {"root": "org/model-b", "owned_by": "fake"}
    # each run holds its own server's records, every (question, trial) once
    for run in (first, other):
        frame = pd.read_parquet(run.responses)
        assert len(frame) == n and not frame.duplicated(["question_id", "trial"]).any()


def test_a_run_resumed_on_another_server_does_not_mix_its_records_in(bench, tmp_path,
                                                                     endpoint):
    from mislib.inference.backends.openai import BudgetSpent

    _serving(endpoint, "org/model-a")
    with pytest.raises(BudgetSpent):
        _run(bench, tmp_path, endpoint.url, request_budget=5, max_concurrency=1)
    (stopped,) = (tmp_path / "results").glob("fake-model-baseline-*")
    _serving(endpoint, "org/model-b")
    run = _run(bench, tmp_path, endpoint.url)
    assert run.run_dir != stopped and run.n_generated == len(pd.read_parquet(run.responses))
    assert len(read_shards(stopped / "shards")) == 5  # the first server's, left as they were


@pytest.mark.parametrize("change", [{"k": 16}, {"table_key": "t2"}, {"model": "other"},
                                    {"processor": "mislib.semsam.vllm_v2:SemSamV2LogitsProcessor"}])
def test_a_semsam_server_that_describes_itself_otherwise_is_another_run(bench, tmp_path,
                                                                         endpoint, change):
    _serving(endpoint, "org/model-a", table_key="t1", k=32)
    first = _run(bench, tmp_path, endpoint.url, arm="greedy")
    assert all(b["vllm_xargs"] == {"semsam_arm": "greedy"} for b in endpoint.bodies)
    endpoint.semsam.update(change)
    second = _run(bench, tmp_path, endpoint.url, arm="greedy")
    assert second.run_id != first.run_id and second.n_generated == first.n_generated


@pytest.mark.parametrize("restarted_as", ["org/model-a", "org/model-b"])
def test_after_a_lost_connection_only_the_same_server_gets_the_rest_of_the_run(
        bench, tmp_path, endpoint, restarted_as):
    """The connection drops at the 5th request (a server restart): the same server again
    finishes the run; another one is detected before any request reaches it."""
    from mislib.inference.backends.openai import ServerChanged

    _serving(endpoint, "org/model-a")

    def script(n, body):
        if n == 4:
            _serving(endpoint, restarted_as)
            return None
        return FakeEndpoint.answer(n, body)

    endpoint.script = script
    if restarted_as == "org/model-a":
        run = _run(bench, tmp_path, endpoint.url, max_concurrency=1)
        frame = pd.read_parquet(run.responses)
        assert (frame["status"] == "ok").all() and len(endpoint.bodies) == len(frame) + 1
        return
    with pytest.raises(ServerChanged, match="another server answers.*root"):
        _run(bench, tmp_path, endpoint.url, max_concurrency=1)
    assert len(endpoint.bodies) == 5  # nothing was sent to the other server
    (run_dir,) = (tmp_path / "results").glob("fake-model-baseline-*")
    assert len(read_shards(run_dir / "shards")) == 4
    rerun = _run(bench, tmp_path, endpoint.url)  # the other server's own run
    assert rerun.run_dir != run_dir and rerun.n_generated == len(pd.read_parquet(rerun.responses))


@pytest.mark.parametrize("status", [503, 429])
@pytest.mark.parametrize("path", ["/models", "/mislib/semsam"])
def test_a_server_that_cannot_say_what_it_is_for_a_moment_keeps_its_finished_run(
        bench, tmp_path, endpoint, status, path):
    """A 503 or 429 where the server is asked what it is says nothing about which server it
    is: a finished run stays current and nothing is sent again (it was another run, sent in
    full, as if another server answered)."""
    _serving(endpoint, "org/model-a", table_key="t1", k=32)
    first = _run(bench, tmp_path, endpoint.url, arm="greedy")
    n = len(endpoint.bodies)
    endpoint.describe_errors = {path: [status] * 20}
    again = _run(bench, tmp_path, endpoint.url, arm="greedy")
    assert (again.run_id, again.n_generated, len(endpoint.bodies)) == (first.run_id, 0, n)


@pytest.mark.parametrize("path", ["/models", "/mislib/semsam"])
def test_after_a_lost_connection_a_server_busy_for_a_moment_finishes_the_run(
        bench, tmp_path, endpoint, path):
    """The connection drops at the 5th request and the server, restarting behind a proxy,
    answers 503 when asked what it is, then answers as before: the same server, so the run
    goes on (it stopped with ServerChanged), and no request is sent before it said so."""
    _serving(endpoint, "org/model-a", table_key="t1", k=32)
    asked: list[int] = []

    def script(n, body):
        asked.append(len(endpoint.describe_errors.get(path, [])))
        if n == 4:
            endpoint.describe_errors = {path: [503, 503]}
            return None
        return FakeEndpoint.answer(n, body)

    endpoint.script = script
    run = _run(bench, tmp_path, endpoint.url, arm="greedy", max_concurrency=1)
    frame = pd.read_parquet(run.responses)
    assert (frame["status"] == "ok").all() and len(endpoint.bodies) == len(frame) + 1
    assert asked[5:] == [0] * (len(asked) - 5)  # nothing sent while it could not say


def test_a_finished_run_is_kept_when_its_server_cannot_be_asked(bench, tmp_path, endpoint,
                                                                 caplog, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    _serving(endpoint, "org/model-a")
    first = _run(bench, tmp_path, endpoint.url, api_key_env=KEY_ENV)
    endpoint.close()  # offline now: nothing answers at the URL
    monkeypatch.delenv(KEY_ENV)  # nor is the key at hand (make reproduce on another machine)
    with caplog.at_level(logging.WARNING):
        again = _run(bench, tmp_path, endpoint.url, api_key_env=KEY_ENV, timeout_s=2.0)
    assert (again.run_id, again.n_generated) == (first.run_id, 0)
    assert "kept unchecked" in caplog.text
    # a run that is not finished is not kept unchecked: the same error as before
    with pytest.raises(ValueError, match="not set"):
        _run(bench, tmp_path / "other", endpoint.url, api_key_env=KEY_ENV)


def test_an_unset_key_variable_and_a_missing_url_are_clear_errors(bench, tmp_path, endpoint,
                                                                 monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=f"{KEY_ENV}.*not set"):
        _run(bench, tmp_path, endpoint.url, api_key_env=KEY_ENV)
    with pytest.raises(ValueError, match="no base_url"):
        _run(bench, tmp_path, None)


def test_a_key_given_where_its_variables_name_belongs_is_never_echoed(bench, tmp_path,
                                                                      endpoint, capsys):
    from mislib.__main__ import main

    # `--api-key-env $KEY` (or the key in [inference.openai]) is refused without showing it
    code = None
    with pytest.raises(Exception) as caught:
        code = main(["infer", "--profile", "demo", "--backend", "openai", "--model",
                     "fake-model", "--base-url", endpoint.url, "--api-key-env", SECRET,
                     "--limit", "1", "--out", str(tmp_path / "results")])
    assert code is None and "api_key_env" in str(caught.value)
    shown = str(caught.value) + capsys.readouterr().err
    assert SECRET[:12] not in shown  # not even its start (long values are cut at 80 chars)
    assert endpoint.bodies == []


def test_the_cli_sends_endpoint_flags_and_says_why_a_run_stopped(bench, tmp_path, endpoint,
                                                                  monkeypatch, capsys):
    from mislib.__main__ import main

    monkeypatch.setenv("MISGROUND_ROOT", str(bench))
    monkeypatch.setenv(KEY_ENV, SECRET)
    endpoint.script = lambda n, body: (401, {}, b'{"error": {"message": "no"}}')
    code = main(["infer", "--backend", "openai", "--base-url", endpoint.url, "--model",
                 "fake-model", "--api-key-env", KEY_ENV, "--arm", "baseline", "--limit", "2",
                 "--out", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert code == 1 and "refused the credentials (HTTP 401" in err and SECRET not in err
    assert set(endpoint.auth) == {f"Bearer {SECRET}"}


def test_the_server_constants_agree_with_the_processor_and_middleware():
    from mislib.inference.backends import openai
    from mislib.semsam import server, vllm_args

    assert openai.ARM_KEY == vllm_args.ARM_KEY
    assert openai.SEMSAM_INFO_PATH == server.INFO_PATH


def test_importing_mislib_imports_no_http_client():
    code = ("import sys, mislib, mislib.inference, mislib.serve; "
            "print([m for m in ('httpx', 'openai') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------
# Against the real vLLM OpenAI server (``.venv-vllm``), one per module
# ----------------------------------------------------------------------------------------
VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
SERVER_KEY = "sk-server-test-key-0042"
# small dummy media for vLLM's memory profiling: the smoke processor's own pixel budgets
VLLM_OPTIONS = {"max_model_len": 2048, "max_num_seqs": 8,
                "limit_mm_per_prompt": {
                    "image": {"count": 4, "width": 160, "height": 160},
                    "video": {"count": 1, "num_frames": 4, "width": 96, "height": 96}}}


class VLLMServer:
    """``python -m mislib serve``'s command, run as a process group that a test can kill."""

    def __init__(self, root: Path, profile: dict):
        from mislib.serve import server_command
        from mislib.smoke import SMOKE_MODEL_ID

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        os.environ[KEY_ENV] = SERVER_KEY
        try:
            self.argv, env = server_command(profile, model=SMOKE_MODEL_ID, port=self.port,
                                            device="cpu", api_key_env=KEY_ENV, root=root,
                                            progress=False)
        finally:
            del os.environ[KEY_ENV]
        self.env = dict(env, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1",
                        TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                        MISGROUND_ROOT=str(root))
        self.log = root / "server.log"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        from mislib.serve import start_server

        try:
            self.proc = start_server(self.argv, self.env, self.log, self.url)
        except RuntimeError as error:
            pytest.fail(str(error))

    def kill(self) -> None:
        from mislib.serve import stop_server

        if self.proc is not None:
            stop_server(self.proc)


def _served_profile(**inference):
    prof = copy.deepcopy(load_profile("demo"))
    prof["name"] = "test"
    prof["inference"].update({"n_trials": 2, "limit": 0, "max_new_tokens": 8,
                              "vllm": copy.deepcopy(VLLM_OPTIONS), **inference})
    return prof


def test_serve_starts_vllms_server_with_the_processor_rule_table_and_limits(tmp_path,
                                                                           monkeypatch):
    from mislib.serve import server_command
    from mislib.smoke import SMOKE_MODEL_ID

    write_smoke_benchmark(tmp_path, n_questions=2, seed=1, image_size=16, n_frames=2)
    profile = _served_profile(video_fps=2.0)
    key = seed_random_table(tmp_path, profile["semsam"]["k"])
    monkeypatch.setenv(KEY_ENV, SERVER_KEY)
    argv, env = server_command(profile, model=SMOKE_MODEL_ID, port=8123, device="cpu",
                               api_key_env=KEY_ENV, python="/opt/vllm/bin/python",
                               root=tmp_path, progress=False)
    flags = {a: b for a, b in zip(argv, argv[1:], strict=False) if a.startswith("--")}
    assert argv[:3] == ["/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert flags["--served-model-name"] == SMOKE_MODEL_ID and flags["--port"] == "8123"
    assert flags["--logits-processors"] == "mislib.semsam.vllm_v1:SemSamV1LogitsProcessor"
    assert flags["--middleware"] == "mislib.semsam.server.semsam_info"
    engine = json.loads(flags["--additional-config"])["semsam"]
    rule = {k: profile["semsam"][k] for k in ("temperature", "top_k", "top_p", "mode")}
    assert {k: engine[k] for k in rule} == rule and engine["table"].endswith(f"{key}.safetensors")
    assert json.loads(flags["--media-io-kwargs"]) == {"video": {"fps": 2.0}}
    assert flags["--max-model-len"] == "2048" and flags["--max-num-seqs"] == "8"
    assert json.loads(flags["--limit-mm-per-prompt"]) == VLLM_OPTIONS["limit_mm_per_prompt"]
    described = json.loads(env["MISLIB_SEMSAM_SERVER"])
    assert described["table_key"] == key and described["rule"] == rule
    assert env["VLLM_API_KEY"] == SERVER_KEY and SERVER_KEY not in " ".join(argv)
    assert str(REPO_ROOT) in env["PYTHONPATH"].split(os.pathsep)
    argv, _ = server_command(profile, model=SMOKE_MODEL_ID, device="cpu", root=tmp_path,
                             table=False, progress=False)
    assert json.loads(argv[argv.index("--additional-config") + 1])["semsam"]["table"] is None


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The smoke model behind ``mislib serve``'s vLLM server (key required), its root and
    profile. Starting it takes a minute or more on two cores: one server per module."""
    require(VLLM_PYTHON.is_file() and subprocess.run(
        [str(VLLM_PYTHON), "-c", "import vllm"], capture_output=True).returncode == 0,
        "the vLLM environment (.venv-vllm with vllm importable)", "make env-vllm")
    root = tmp_path_factory.mktemp("served_root")
    write_smoke_benchmark(root, n_questions=10, seed=3, image_size=64, n_frames=4)
    profile = _served_profile()
    table_key = seed_random_table(root, profile["semsam"]["k"])
    server = VLLMServer(root, profile)
    yield server, root, profile, table_key
    server.kill()


def _served_run(served, tmp, arm, backend="openai", key=SERVER_KEY, **openai):
    server, root, profile, _ = served
    prof = copy.deepcopy(profile)
    prof["inference"].update(backend=backend, models=["smoke:tiny-qwen3-vl"], openai={
        "base_url": server.url, "api_key_env": KEY_ENV, "stack_as": "video",
        "backoff_s": 0.2, "max_backoff_s": 2.0, **openai})
    os.environ[KEY_ENV] = key
    try:
        return run_inference(prof, arm=arm, root=root, out=tmp / "results", progress=False)
    finally:
        del os.environ[KEY_ENV]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_server_decodes_each_arm_as_the_hf_backend_does(served, tmp_path):
    import httpx

    server, root, profile, table_key = served
    described = httpx.get(server.url + "/mislib/semsam", timeout=10).json()
    rule = {k: profile["semsam"][k] for k in ("temperature", "top_k", "top_p", "mode")}
    assert described["rule"] == rule and described["table_key"] == table_key
    for arm in ("greedy", "semsam"):
        remote = pd.read_parquet(_served_run(served, tmp_path, arm).responses)
        local = pd.read_parquet(_served_run(served, tmp_path, arm, backend="hf").responses)
        assert (remote["status"] == "ok").all() and (remote["backend"] == "openai").all()
        assert (remote["completion_tokens"] == remote["n_tokens"]).all()
        assert remote["prompt_tokens"].gt(0).all()
        merged = remote.merge(local, on=["question_id", "trial"], suffixes=("_http", "_hf"))
        assert len(merged) == len(local) == len(remote)
        same = merged["raw_text_http"] == merged["raw_text_hf"]
        assert same.all(), merged.loc[~same, ["question_id", "raw_text_http", "raw_text_hf"]]
    # the endpoint's run (the hf run of the arm has a run.json of the same pattern)
    record = next(r for r in (json.loads(p.read_text()) for p in
                              (tmp_path / "results").glob("*-semsam-*/run.json"))
                  if r["backend"] == "openai")
    assert record["processor"]["semsam_server"]["table_key"] == table_key
    assert record["processor"]["semsam_server"]["k"] == profile["semsam"]["k"]
    # what the server says it is enters the identity: its weights and vLLM's version
    vllm_version = subprocess.run([str(VLLM_PYTHON), "-c", "import vllm; print(vllm.__version__)"],
                                  capture_output=True, text=True).stdout.strip()
    assert record["processor"]["server"] == {
        "root": server.argv[server.argv.index("--model") + 1], "owned_by": "vllm",
        "version": vllm_version}
    assert SERVER_KEY not in _all_text(tmp_path / "results")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_wrong_key_gets_a_401_that_stops_the_run_with_a_clear_message(served, tmp_path):
    from mislib.inference.backends.openai import EndpointAuthError

    with pytest.raises(EndpointAuthError, match="HTTP 401") as caught:
        _served_run(served, tmp_path, "baseline", key="sk-wrong-key-123")
    assert "sk-wrong-key-123" not in str(caught.value) and KEY_ENV in str(caught.value)
    assert not list((tmp_path / "results").glob("*/shards/*.jsonl"))


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_server_killed_mid_run_and_restarted_finishes_every_record_once(served, tmp_path):
    server, root, profile, _ = served
    outcome: dict = {}

    def run():
        try:
            outcome["run"] = _served_run(served, tmp_path, "baseline", max_concurrency=1,
                                         retry_for_s=1500.0)
        except BaseException as error:  # handed to the test thread
            outcome["error"] = error

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not list(tmp_path.glob("results/*/shards/*.jsonl")):
        time.sleep(0.05)
    shard_dir = next(tmp_path.glob("results/*/shards"))
    while time.monotonic() < deadline and not read_shards(shard_dir):
        time.sleep(0.05)
    server.kill()
    n_total = 2 * len(pd.read_parquet(root / "data/benchmark/questions.parquet"))
    before = len(read_shards(shard_dir))
    assert 0 < before < n_total, "the run finished before the server was killed"
    time.sleep(3)
    assert worker.is_alive(), outcome  # waiting and retrying, not failed
    server.start()
    worker.join(timeout=1200)
    assert not worker.is_alive() and "error" not in outcome, outcome
    frame = pd.read_parquet(outcome["run"].responses)
    assert len(frame) == n_total and (frame["status"] == "ok").all()
    lines = [line for shard in shard_dir.glob("*.jsonl")
             for line in shard.read_text().splitlines() if line.strip()]
    assert len(lines) == n_total  # every (question, trial) written exactly once


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_other_weights_behind_the_real_server_are_another_run(served, tmp_path):
    """``mislib serve`` restarted on the same port serving other weights under the same
    name (the thinking smoke model's folder): the stored run is not current for that
    server, and the rerun is a run of its own. Last in the module: it restarts the server
    (and restores it)."""
    from mislib.inference.registry import resolve_model
    from mislib.smoke import SMOKE_THINKING_MODEL_ID

    server, root, _, _ = served
    first = _served_run(served, tmp_path, "greedy")
    original = list(server.argv)
    other = str(resolve_model(SMOKE_THINKING_MODEL_ID, root)[0])
    server.kill()
    server.argv[server.argv.index("--model") + 1] = other
    try:
        server.start()
        second = _served_run(served, tmp_path, "greedy")
    finally:
        server.kill()
        server.argv = original
        server.start()
    assert second.run_id != first.run_id and second.n_generated == first.n_records
    identity = json.loads((second.run_dir / "run.json").read_text())
    assert identity["processor"]["server"]["root"] == other
    assert len(pd.read_parquet(first.responses)) == first.n_records  # left as it was
