"""The names SemSam's vLLM processors and their clients share, importable without vLLM.

The same keys reach the processor offline and through a server:

- once per engine, the rule's settings and the neighbour table's path under
  ``additional_config[CONFIG_KEY]`` (``LLM(additional_config=...)`` offline,
  ``--additional-config`` for ``vllm.entrypoints.openai.api_server``; :func:`engine_config`
  writes the mapping);
- per request, the arm under ``extra_args[ARM_KEY]`` with the request's ``seed`` and
  ``temperature=0``: ``SamplingParams(extra_args=...)`` offline, the body's flat
  ``vllm_xargs`` over HTTP (vLLM copies it into ``extra_args``).

>>> engine_config("table.safetensors", 0.7, 20, 0.8)["mode"]
'argmax'
"""

from __future__ import annotations

from typing import Any

from mislib.semsam.rule import check_rule

#: Key of the engine-wide settings in vLLM's ``additional_config``.
CONFIG_KEY = "semsam"
#: Key of the per-request arm in ``SamplingParams.extra_args`` (an HTTP body's ``vllm_xargs``).
ARM_KEY = "semsam_arm"
#: Key of the per-request count of tokens generated before the prompt ended (default 0;
#: budget forcing's continued sequences, :mod:`mislib.inference.thinking`).
STEP_OFFSET_KEY = "semsam_step_offset"


def engine_config(table_path: str | None, temperature: float, top_k: int, top_p: float,
                  mode: str = "argmax") -> dict[str, Any]:
    """The engine-wide settings, as ``additional_config[CONFIG_KEY]`` (JSON-serialisable).

    ``table_path`` may be None when no request uses the ``semsam`` arm.
    """
    check_rule(temperature, top_k, top_p, mode)
    return {"table": None if table_path is None else str(table_path),
            "temperature": float(temperature), "top_k": int(top_k), "top_p": float(top_p),
            "mode": str(mode)}
