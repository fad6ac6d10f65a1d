"""``python -m mislib serve``: a vLLM OpenAI server that decodes every arm with SemSam.

The server is vLLM's own (``python -m vllm.entrypoints.openai.api_server``, run by the
Python of ``.venv-vllm`` or ``--python``; the ``vllm serve`` script of the CPU wheel is
broken), started with

- SemSam's logits processor (:mod:`mislib.semsam.vllm_v1`, or :mod:`mislib.semsam.vllm_v2`
  for Model Runner V2 on CUDA) and, in ``--additional-config``, the profile's rule
  (``[semsam]`` temperature, top_k, top_p, mode) and the neighbour table by path: the table
  is built here first from the checkpoint's input embeddings (or read from the cache
  ``.cache/semsam``), as the offline backends build it;
- the profile's limits (``[inference.vllm]``: ``max_model_len``, ``max_num_seqs``,
  ``limit_mm_per_prompt``, ``tensor_parallel_size``, ``gpu_memory_utilization``,
  ``enforce_eager``), fp32 on CPU and bf16 on CUDA, and vLLM's neutral generation defaults
  (``--generation-config vllm``: only what a request sets applies);
- :func:`mislib.semsam.server.semsam_info` as a middleware, so clients can ask the server
  which rule and table it decodes with (``GET /v1/mislib/semsam``);
- the model served under the profile's id (``--served-model-name``), and, with
  ``--api-key-env NAME``, the key from that environment variable (passed to vLLM in its
  environment, never on the command line, where ``ps`` would show it).

Then the openai backend runs every arm on it: ``python -m mislib infer --backend openai
--base-url http://HOST:PORT/v1 --model NAME --arm semsam``.

>>> argv, env = server_command("demo", port=8000)       # doctest: +SKIP
>>> serve("demo", port=8000)                            # doctest: +SKIP  (replaces the process)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mislib.config import check_key_env, load_profile, stage_params
from mislib.paths import REPO_ROOT, project_paths

#: The Python that runs the server by default (``make env-vllm`` builds it).
VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
PROCESSORS = {"v1": "mislib.semsam.vllm_v1:SemSamV1LogitsProcessor",
              "v2": "mislib.semsam.vllm_v2:SemSamV2LogitsProcessor"}
MIDDLEWARE = "mislib.semsam.server.semsam_info"


def server_command(profile: str | Mapping[str, Any] = "demo", model: str | None = None,
                   port: int = 8000, host: str = "127.0.0.1", device: str = "auto",
                   api_key_env: str | None = None, python: str | os.PathLike | None = None,
                   root: str | os.PathLike | None = None, table: bool = True,
                   progress: bool = True) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that start the server (building the table first).

    Parameters
    ----------
    profile : profile name, TOML path or mapping (``[semsam]``, ``[inference]`` and its
        ``vllm`` sub-table are read).
    model : the model to serve, a ``[models.<name>]`` entry or a plain id (default: the
        profile's first); the entry's ``id`` is loaded and is the name clients ask for, its
        decode settings are the rule.
    port, host : where the server listens (``0.0.0.0`` to serve other machines).
    device : ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    api_key_env : the name of the environment variable holding the key clients must send
        (None: no key).
    python : the interpreter with vLLM (default ``.venv-vllm/bin/python``, else this one).
    root : project root (smoke model and table cache).
    table : build (or read) the neighbour table; without it the server decodes the
        ``baseline`` and ``greedy`` arms only (no minutes-long table build for them).

    Raises
    ------
    ValueError
        An unknown device, or ``api_key_env`` not shaped like a variable's name (the
        error does not quote it: it may be the key) or naming a variable that is not set.
    """
    from mislib.inference.models import model_entry
    from mislib.inference.registry import resolve_model
    from mislib.semsam.server import DESCRIPTION_ENV
    from mislib.semsam.vllm_args import engine_config

    if api_key_env is not None:
        check_key_env(api_key_env)  # a name, never the key (the error does not quote it)
    prof = load_profile(profile) if not isinstance(profile, Mapping) else profile
    params = stage_params(prof, "inference")
    # the model's registry entry (or a plain id's defaults): its id is what is loaded and
    # the name clients ask for; its decode settings (the profile's by default) are the rule
    entry = model_entry(prof, model or params["models"][0])
    model_id = entry.id
    rule = {"k": stage_params(prof, "semsam")["k"], "temperature": entry.temperature,
            "top_k": entry.top_k, "top_p": entry.top_p, "mode": entry.semsam_mode}
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"serve: device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    source, _revision = resolve_model(model_id, root)
    table_key = table_path = None
    if table:
        table_key, table_path = neighbor_table(source, int(rule["k"]), device, root, progress)
    config = engine_config(None if table_path is None else str(table_path),
                           float(rule["temperature"]), int(rule["top_k"]),
                           float(rule["top_p"]), str(rule["mode"]))
    flag = os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower()
    runner = "v2" if device == "cuda" and flag not in ("0", "false", "no", "off") else "v1"
    options = dict(params.get("vllm") or {})
    argv = [str(python or (VLLM_PYTHON if VLLM_PYTHON.is_file() else sys.executable)),
            "-m", "vllm.entrypoints.openai.api_server", "--model", source,
            "--served-model-name", model_id, "--host", host, "--port", str(int(port)),
            "--dtype", entry.dtype or ("bfloat16" if device == "cuda" else "float32"),
            "--seed", "0",
            "--generation-config", "vllm", "--logits-processors", PROCESSORS[runner],
            "--additional-config", json.dumps({"semsam": config}),
            "--middleware", MIDDLEWARE,
            # a stack is a video of exactly its frames at the profile's rate (vLLM refuses
            # these per request): the hf and vllm backends' video_fps, no frame sampling
            "--media-io-kwargs", json.dumps({"video": {"fps": float(params["video_fps"])}}),
            "--tensor-parallel-size", str(int(options.get("tensor_parallel_size", 1))),
            "--max-model-len", str(int(options.get("max_model_len") or 8192))]
    if options.get("max_num_seqs"):
        argv += ["--max-num-seqs", str(int(options["max_num_seqs"]))]
    if options.get("limit_mm_per_prompt"):
        argv += ["--limit-mm-per-prompt", json.dumps(options["limit_mm_per_prompt"])]
    if device == "cuda":
        argv += ["--gpu-memory-utilization", str(float(options.get("gpu_memory_utilization",
                                                                    0.9)))]
    if options.get("enforce_eager", device == "cpu"):
        argv.append("--enforce-eager")
    described = {"processor": PROCESSORS[runner], "model": model_id, "rule": {
        k: config[k] for k in ("temperature", "top_k", "top_p", "mode")},
        "table_key": table_key, "k": int(rule["k"]), "video_fps": float(params["video_fps"])}
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH"))
                                 if p)
    env = dict(os.environ, PYTHONPATH=pythonpath, **{DESCRIPTION_ENV: json.dumps(described)})
    env.pop("VLLM_API_KEY", None)
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise ValueError(f"serve: the environment variable {api_key_env!r} is not set")
        env["VLLM_API_KEY"] = key  # vLLM's own variable: the key stays off the command line
    return argv, env


def neighbor_table(source: str, k: int, device: str = "cpu",
                   root: str | os.PathLike | None = None,
                   progress: bool = True) -> tuple[str, Path]:
    """The model's SemSam neighbour table (built once, cached under ``.cache/semsam``):
    its key and file, from the checkpoint's input embeddings in the dtype the server holds
    them in (the same table the offline backends build for that device)."""
    import torch
    from transformers import AutoTokenizer

    from mislib import semsam
    from mislib.inference.registry import checkpoint_input_embeddings

    embeddings = checkpoint_input_embeddings(
        source, torch.bfloat16 if device == "cuda" else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    mask = semsam.content_token_mask(tokenizer, embeddings.shape[0])
    cache_dir = project_paths(root).cache / "semsam"
    table = semsam.cached_neighbor_table(embeddings, mask, int(k), cache_dir=cache_dir,
                                         progress=progress)
    return table.key, cache_dir / f"{table.key}.safetensors"


def start_server(argv: list[str], env: Mapping[str, str], log: str | os.PathLike,
                 url: str, timeout: float = 900.0) -> subprocess.Popen:
    """Run the server as a process group of its own and wait until ``url``'s ``/health``
    answers (vLLM's start-up takes a minute or more on a small CPU).

    Raises
    ------
    RuntimeError
        When the server exits or is not up within ``timeout`` seconds, with its log's tail.
    """
    import httpx

    with open(log, "a") as out:
        proc = subprocess.Popen(argv, env=dict(env), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    health = url.rstrip("/").removesuffix("/v1") + "/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the vLLM server exited ({proc.returncode}):\n"
                               + Path(log).read_text()[-4000:])
        try:
            if httpx.get(health, timeout=2.0).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    stop_server(proc)
    raise RuntimeError(f"the vLLM server did not answer {health} within {timeout:.0f} s:\n"
                       + Path(log).read_text()[-4000:])


def stop_server(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Stop a server :func:`start_server` started: its whole process group (the API server
    and its engine process)."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    proc.wait()


def serve(profile: str | Mapping[str, Any] = "demo", **kwargs: Any) -> None:
    """Start the server in place of this process (see :func:`server_command`)."""
    argv, env = server_command(profile, **kwargs)
    print("starting: " + " ".join(argv), file=sys.stderr, flush=True)
    os.execve(argv[0], argv, env)
