"""Stage 04: run vision-language models on the benchmark, per model and arm.

The package's parts (see ``docs/design.md``, Inference):

- :mod:`~mislib.inference.protocol` — the ``Backend`` protocol, ``Request``,
  ``DecodeSettings``, ``Generation``, ``Capabilities``, the arms;
- :mod:`~mislib.inference.registry` — backends by name (imported lazily) and model sources;
- :mod:`~mislib.inference.models` — the model registry of a profile (``[models.<name>]``);
- :mod:`~mislib.inference.thinking` — budget forcing for thinking models;
- :mod:`~mislib.inference.prompts` — the user text and media of a question;
- :mod:`~mislib.inference.store` — the result store (run identity, shards, compaction,
  run discovery), the module later stages read;
- :mod:`~mislib.inference.runner` — the stage: one (model, arm), and the model x arm loop;
- :mod:`~mislib.inference.workers` — data-parallel runs: one worker per GPU, on Ray across
  nodes;
- :mod:`~mislib.inference.backends` — ``hf`` (transformers), ``vllm``.

Importing this package imports neither torch nor vLLM nor an HTTP client; a backend's
module is imported when a run asks for it.
"""

from mislib.inference.models import ModelEntry, model_entries, model_entry
from mislib.inference.prompts import input_kind, load_media, question_prompt
from mislib.inference.protocol import (
    ARMS,
    Backend,
    Capabilities,
    DecodeSettings,
    Generation,
    Request,
)
from mislib.inference.registry import BACKENDS, backend_class, load_backend, resolve_model
from mislib.inference.runner import (
    InferenceRun,
    run_inference,
    run_profile,
    select_questions,
    semsam_table,
    trial_seed,
    worker_of,
    worker_share,
)
from mislib.inference.store import (
    RESPONSE_COLUMNS,
    ShardWriter,
    compact,
    compact_run,
    current_runs,
    list_runs,
    read_shards,
    summarise_runs,
)

__all__ = [
    "ARMS", "BACKENDS", "RESPONSE_COLUMNS", "Backend", "Capabilities", "DecodeSettings",
    "Generation", "InferenceRun", "ModelEntry", "Request", "ShardWriter", "backend_class",
    "compact", "compact_run", "current_runs", "input_kind", "list_runs", "load_backend",
    "load_media", "model_entries", "model_entry", "question_prompt", "read_shards",
    "resolve_model", "run_inference", "run_profile", "select_questions", "semsam_table",
    "summarise_runs", "trial_seed", "worker_of", "worker_share",
]
