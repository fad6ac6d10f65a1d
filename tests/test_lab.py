"""mislib.lab: JupyterLab on the checkout, the project's kernel, jupytext pairing from the UI.

One headless Jupyter server (127.0.0.1, a token) is started the way ``make lab`` starts it
and driven over its REST and websocket APIs, as the Lab front end drives it.
"""

from __future__ import annotations

import ast
import json
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import nbformat
import pytest
from browser import Chromium, chromium_binary
from conftest import require

from mislib.lab import (
    KERNEL_DISPLAY_NAME,
    KERNEL_NAME,
    install_kernel,
    lab_command,
    lab_environment,
)
from mislib.notebooks import list_notebooks
from mislib.paths import REPO_ROOT, project_paths

TIMEOUT = 90  # seconds for the server to answer, a kernel to start, a cell to run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running Jupyter server: ``get/post/put/delete`` on its REST API with the token."""

    def __init__(self, port: int, token: str):
        self.base = f"http://127.0.0.1:{port}"
        self.token = token

    def request(self, method: str, path: str, body: dict | None = None, token: bool = True):
        url = f"{self.base}{path}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        if token:
            req.add_header("Authorization", f"token {self.token}")
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            text = resp.read().decode()
            return resp.status, (json.loads(text) if text else None)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``jupyter lab`` as ``make lab`` runs it, headless on 127.0.0.1 with a random token."""
    install_kernel()
    port, token = _free_port(), secrets.token_hex(16)
    log = tmp_path_factory.mktemp("lab") / "server.log"
    cmd = lab_command(extra=["--no-browser", "--ServerApp.ip=127.0.0.1",
                             f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
                             f"--IdentityProvider.token={token}"])
    with open(log, "wb") as out:
        # without the test run's PYTHONPATH, the kernel's can only come from its spec
        env = {k: v for k, v in lab_environment().items() if k != "PYTHONPATH"}
        proc = subprocess.Popen(cmd, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    srv = Server(port, token)
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            if srv.request("GET", "/api/status")[0] == 200:
                break
        except (urllib.error.URLError, ConnectionError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"jupyter lab did not answer on port {port}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    yield srv
    try:
        srv.request("POST", "/api/shutdown")
        proc.wait(timeout=30)
    except Exception:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode is not None


def test_kernel_spec_runs_this_checkouts_python_with_the_checkout_on_pythonpath():
    spec = json.loads((install_kernel() / "kernel.json").read_text())
    assert spec["display_name"] == KERNEL_DISPLAY_NAME
    assert spec["argv"][0] == sys.executable
    assert spec["env"]["PYTHONPATH"] == str(REPO_ROOT)
    assert install_kernel().parent.name == "kernels"
    assert lab_environment(base={})["JUPYTER_PATH"] == str(
        project_paths().build / "jupyter" / "share" / "jupyter")


@pytest.mark.parametrize("path", list_notebooks(REPO_ROOT), ids=lambda p: p.name)
def test_every_numbered_notebook_names_the_projects_kernel(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == KERNEL_NAME, (
        f"{path.name}: kernelspec is not {KERNEL_NAME!r}; a notebook opened with `make lab` "
        "would not run against this checkout's mislib")


@pytest.mark.timeout(300)
def test_server_needs_its_token(server):
    with pytest.raises(urllib.error.HTTPError) as err:
        server.request("GET", "/api/contents/notebooks", token=False)
    assert err.value.code == 403
    assert server.request("GET", "/api/status")[0] == 200


@pytest.mark.timeout(300)
def test_server_lists_the_numbered_notebooks_and_the_projects_kernel(server):
    _, listing = server.request("GET", "/api/contents/notebooks")
    names = {item["name"] for item in listing["content"]}
    expected = {p.name for p in list_notebooks(REPO_ROOT)}
    assert expected and expected <= names
    _, specs = server.request("GET", "/api/kernelspecs")
    assert specs["default"] == KERNEL_NAME
    assert specs["kernelspecs"][KERNEL_NAME]["spec"]["display_name"] == KERNEL_DISPLAY_NAME


@pytest.mark.timeout(300)
def test_projects_kernel_imports_mislib_from_this_checkout(server):
    import websocket
    from jupyter_client.jsonutil import json_default
    from jupyter_client.session import Session

    status, kernel = server.request("POST", "/api/kernels", {"name": KERNEL_NAME})
    assert status == 201
    try:
        ws = websocket.create_connection(
            f"{server.base.replace('http', 'ws', 1)}/api/kernels/{kernel['id']}/channels"
            f"?session_id={uuid.uuid4().hex}", timeout=TIMEOUT,
            header=[f"Authorization: token {server.token}"])
        # the path comes back in the reply itself (a user expression), so no ordering
        # between the shell and iopub channels is assumed
        msg = Session(username="test").msg("execute_request", content={
            "code": "import mislib", "silent": False, "store_history": False,
            "user_expressions": {"file": "mislib.__file__"}, "allow_stdin": False})
        msg["channel"] = "shell"
        ws.send(json.dumps(msg, default=json_default))
        reply = None
        deadline = time.monotonic() + TIMEOUT
        while reply is None and time.monotonic() < deadline:
            got = json.loads(ws.recv())
            if (got["msg_type"] == "execute_reply"
                    and got["parent_header"].get("msg_id") == msg["header"]["msg_id"]):
                reply = got["content"]
        ws.close()
        assert reply is not None and reply["status"] == "ok", reply
        where = ast.literal_eval(reply["user_expressions"]["file"]["data"]["text/plain"])
        assert Path(where) == REPO_ROOT / "mislib" / "__init__.py"
    finally:
        assert server.request("DELETE", f"/api/kernels/{kernel['id']}")[0] == 204


@pytest.mark.timeout(300)
def test_saving_from_the_lab_keeps_the_jupytext_pair_in_step(server):
    """Through the server's contents API (what the Lab's save does) with the project's
    jupytext.toml: saving the .ipynb writes the .py, and an edited .py is what opens."""
    scratch = project_paths().build / "lab_pairing_test"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    shutil.copy(REPO_ROOT / "notebooks" / "jupytext.toml", scratch / "jupytext.toml")
    api = f"/api/contents/{scratch.relative_to(REPO_ROOT).as_posix()}/99_pairing.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Pairing"),
                                         nbformat.v4.new_code_cell("x = 1")])
    try:
        assert server.request("PUT", api, {"type": "notebook", "format": "json",
                                           "content": nb})[0] in (200, 201)
        script = scratch / "99_pairing.py"
        assert script.is_file(), "saving the .ipynb did not write its .py pair"
        assert "# %%\nx = 1" in script.read_text()

        script.write_text(script.read_text().replace("x = 1", "x = 2"))
        _, opened = server.request("GET", api)
        sources = [c["source"] for c in opened["content"]["cells"]]
        assert "x = 2" in sources, sources
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.mark.timeout(300)
def test_lab_ui_opens_a_numbered_notebook_on_the_projects_kernel(server, tmp_path):
    """What a reader does after ``make lab``: open notebook 01 in the Lab front end."""
    require(chromium_binary() is not None, "Chromium (Debian package `chromium`)",
            "apt-get install -y chromium")
    first = list_notebooks(REPO_ROOT)[0].relative_to(REPO_ROOT).as_posix()
    with Chromium(tmp_path / "chromium-profile", timeout=TIMEOUT) as browser:
        browser.open(f"{server.base}/lab/tree/{first}?token={server.token}", settle=0)
        # the toolbar may name the kernel before the session exists: wait for both
        shown, opened, deadline = None, [], time.monotonic() + TIMEOUT
        while not (shown == KERNEL_DISPLAY_NAME and opened) and time.monotonic() < deadline:
            time.sleep(1)
            shown = browser.evaluate(
                "document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) "
                ".jp-KernelName')?.innerText ?? null")
            opened = [s for s in server.request("GET", "/api/sessions")[1]
                      if s["path"] == first]
        assert shown == KERNEL_DISPLAY_NAME
        assert opened and opened[0]["kernel"]["name"] == KERNEL_NAME
        # let the kernel finish starting before the page goes, so it shuts down cleanly
        state, deadline = None, time.monotonic() + TIMEOUT
        while state != "idle" and time.monotonic() < deadline:
            time.sleep(0.5)
            state = server.request("GET", f"/api/kernels/{opened[0]['kernel']['id']}")[1][
                "execution_state"]
    for session in opened:
        assert server.request("DELETE", f"/api/sessions/{session['id']}")[0] == 204
