"""Run the vllm backend on a job file and write its generations (used by the tests).

Runs inside ``.venv-vllm`` (the test suite's environment has no vLLM):
``.venv-vllm/bin/python tests/scripts/vllm_generate.py job.json out.json``. The job names the model
folder, the benchmark folder, the questions (rows of ``questions.parquet``), the arms and the
decode settings; the output maps each arm to one generation per request, in order.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(job_file: str, out_file: str) -> None:
    from mislib.inference.backends.vllm import VLLMBackend
    from mislib.inference.prompts import load_media, question_prompt
    from mislib.inference.protocol import DecodeSettings, Request

    job = json.loads(Path(job_file).read_text())
    start = time.perf_counter()
    backend = VLLMBackend(job["source"], model_id=job["model_id"], device="cpu",
                          **job.get("options", {}))
    requests = [Request(str(q["question_id"]), int(q["trial"]), int(q["seed"]),
                        question_prompt(q), load_media(q, Path(job["benchmark"])))
                for q in job["questions"]]
    out: dict = {"settings": backend.settings(), "arms": {}, "seconds": {}}
    for arm in job["arms"]:
        decode = DecodeSettings(arm=arm, **job["decode"])
        t0 = time.perf_counter()
        out["arms"][arm] = [{"text": g.text, "n_tokens": g.n_tokens,
                             "token_ids": list(g.token_ids)}
                            for g in backend.generate(requests, decode)]
        out["seconds"][arm] = time.perf_counter() - t0
    out["seconds"]["total"] = time.perf_counter() - start
    backend.close()
    Path(out_file).write_text(json.dumps(out))


if __name__ == "__main__":  # vLLM starts workers with spawn: the guard is required
    main(*sys.argv[1:3])
