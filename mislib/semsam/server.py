"""What a SemSam vLLM server says about itself: ``GET <any prefix>/mislib/semsam``.

``python -m mislib serve`` starts vLLM's OpenAI server with SemSam's logits processor and
this module's :func:`semsam_info` as an HTTP middleware (``--middleware``). The middleware
answers one path with the processor's description, which :mod:`mislib.serve` hands to the
server process in the environment variable :data:`DESCRIPTION_ENV`: the processor class, the
rule's settings (``temperature, top_k, top_p, mode``), the neighbour table's hash and ``k``,
and the served model. The openai backend reads it to know that the server decodes the
``greedy`` and ``semsam`` arms, and with which rule and table (they enter the run identity).
Every other path goes on to vLLM untouched. Runs inside the server (vLLM's environment).
"""

from __future__ import annotations

import json
import os
from typing import Any

#: Environment variable holding the processor's description (JSON), set by mislib.serve.
DESCRIPTION_ENV = "MISLIB_SEMSAM_SERVER"
#: The path the description is served at, under any prefix (``/mislib/semsam``,
#: ``/v1/mislib/semsam``).
INFO_PATH = "/mislib/semsam"


def description() -> dict[str, Any]:
    """The description this server process was started with (empty when none)."""
    raw = os.environ.get(DESCRIPTION_ENV)
    return json.loads(raw) if raw else {}


async def semsam_info(request: Any, call_next: Any) -> Any:
    """Starlette HTTP middleware: the description at :data:`INFO_PATH`, else the app."""
    if request.method == "GET" and request.url.path.endswith(INFO_PATH):
        from starlette.responses import JSONResponse

        described = description()
        return JSONResponse(described, status_code=200 if described else 404)
    return await call_next(request)
