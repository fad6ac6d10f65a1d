"""Run one backend on a job file in a fresh process and write its generations (for tests).

``python tests/scripts/backend_generate.py BACKEND job.json out.json``: the hf backend with the
test environment's Python, the vllm backend with ``.venv-vllm/bin/python`` (the test
environment has no vLLM). Each backend answers in a process of its own, as in a real run, so
neither inherits state from the other or from earlier tests. The job names the model folder,
the benchmark folder, the questions (rows of ``questions.parquet``), the arms and the decode
settings; the output maps each arm to one generation per request, in order.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(backend_name: str, job_file: str, out_file: str) -> None:
    from mislib.inference.prompts import load_media, question_prompt
    from mislib.inference.protocol import DecodeSettings, Request

    job = json.loads(Path(job_file).read_text())
    start = time.perf_counter()
    if backend_name == "vllm":
        from mislib.inference.backends.vllm import VLLMBackend

        backend = VLLMBackend(job["source"], model_id=job["model_id"], device="cpu",
                              **job.get("options", {}))
    else:
        from mislib.inference.backends.hf import HFBackend

        backend = HFBackend(job["source"], model_id=job["model_id"], device="cpu")
    requests = [Request(str(q["question_id"]), int(q["trial"]), int(q["seed"]),
                        question_prompt(q), load_media(q, Path(job["benchmark"])))
                for q in job["questions"]]
    out: dict = {"settings": backend.settings(), "arms": {}, "seconds": {}}
    for arm in job["arms"]:
        decode = DecodeSettings(arm=arm, **job["decode"])
        t0 = time.perf_counter()
        out["arms"][arm] = [{"text": g.text, "n_tokens": g.n_tokens,
                             "token_ids": list(g.token_ids),
                             "thinking_tokens": g.thinking_tokens,
                             "answer_tokens": g.answer_tokens,
                             "forced_answer": g.forced_answer}
                            for g in backend.generate(requests, decode)]
        out["seconds"][arm] = time.perf_counter() - t0
    out["seconds"]["total"] = time.perf_counter() - start
    if hasattr(backend, "close"):
        backend.close()
    Path(out_file).write_text(json.dumps(out))


if __name__ == "__main__":  # vLLM starts workers with spawn: the guard is required
    main(*sys.argv[1:4])
