"""Profiles, their schema, and stage configuration hashes and stamps.

A *profile* is a named parameter set (``mislib/profiles/<name>.toml``), one TOML table per
stage (``[volumes]``, ``[render]``, ``[questions]``, ``[semsam]``, ``[inference]``,
``[scoring]``, ``[analysis]``, ``[paper]``) plus a top-level ``seed`` and an optional model
registry, one ``[models.<name>]`` table per model (:class:`ModelEntry`, read through
:mod:`mislib.inference.models`). Notebooks pass the
profile name (or a path to a TOML file) through papermill; a notebook cell may override
single keys.

Every profile is checked against :data:`SCHEMA` when it is loaded, before any stage runs:
types, ranges, allowed levels, unknown keys (a misspelt key is an error, with the nearest
known key suggested). Each error names the profile, the table, the key and the value. To
add a knob to a stage, add one line to that stage's class below (the field's type and
range; a default makes the key optional in a profile) and the key to both profiles.

Each stage writes a stamp ``.<stage>.stage.json`` beside its outputs holding the hash of
its parameters and a manifest of its outputs (sizes); :func:`is_fresh` lets a stage skip
work whose outputs are all there, unchanged, for the same hash, unless ``force=True``.
:mod:`mislib.stage` writes outputs atomically on top of these stamps.

>>> params = stage_params("demo", "volumes", slices_per_volume=3)
>>> params["slices_per_volume"]
3
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mislib.vocabulary import (
    ABLATIONS,
    ARMS,
    BACKGROUNDS,
    CONVENTIONS,
    DIMS,
    FAMILIES,
    FORMS,
    MODALITIES,
    MODEL_FACTORS,
    PLANES,
    PROMPTS,
    TERMINOLOGIES,
)

PROFILE_DIR = Path(__file__).with_name("profiles")
STAGES = ("volumes", "render", "questions", "semsam", "inference", "scoring", "analysis", "paper")


class ProfileError(ValueError):
    """A profile value that a stage cannot use; the message names table, key and value."""


# ---- the schema ----------------------------------------------------------------------------
# Levels a profile may name: the benchmark's own names (mislib.vocabulary, mislib.geometry);
# those only a stage module knows (it sits above config in the import order) are listed here
# and tests/test_config.py checks that they agree with the module.
SOURCES = ("brain_atlas", "torso_ct", "torso_mr", "torso_ct_dicom", "torso_ct_phantom",
           "knee_mri_phantom", "totalsegmentator", "knee_mri", "generic")
SEMSAM_MODES = ("argmax", "sample")
BACKENDS = ("hf", "vllm", "openai")
GROUPS = ("question", "pair", "volume")
#: Frames of a 3D stack: even (video models pair frames in time) and at most this many
#: (each pair of 448-pixel frames costs Qwen3-VL 196 visual tokens).
MAX_FRAMES_3D = 64


def _levels(*allowed: str, min_length: int = 1):
    """A list of distinct levels out of ``allowed`` (at least ``min_length``)."""
    return Annotated[list[Literal[*allowed]], Field(min_length=min_length)]


Count = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
Area = Annotated[float, Field(ge=0)]
AllOrCount = NonNegative | Literal["all"]


class _Table(BaseModel):
    """One profile table: unknown keys are errors; no silent conversion (``"2"`` is not 2)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    seed: int | None = None  # stage_params copies the top-level seed into every table
    profile: str | None = None  # ... and the profile's name

    @field_validator("*", mode="after")
    @classmethod
    def _distinct(cls, value):
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            dup = sorted({v for v in value if value.count(v) > 1})
            if dup:
                raise ValueError(f"lists {dup} more than once")
        return value


class VolumesTable(_Table):
    sources: _levels(*SOURCES)
    slices_per_volume: Count
    min_component_area_mm2: Area
    n_torso_phantoms: NonNegative
    n_knee_phantoms: NonNegative
    structures: list[str]
    totalsegmentator_root: str
    knee_mri_root: str
    generic_root: str
    generic_modality: Literal[*MODALITIES]
    workers: Count
    max_slice_components: NonNegative  # 0: every visible structure
    min_plane_aspect: Annotated[float, Field(ge=0, le=1)]  # field of view's short/long side
    # source -> a curated list's name (mislib.structures.CURATED) or label names
    structure_lists: dict[Literal[*SOURCES], str | list[str]] = {}

    @field_validator("structure_lists")
    @classmethod
    def _curated_names(cls, value):
        from mislib.structures import CURATED

        bad = {src: name for src, name in value.items()
               if isinstance(name, str) and name not in CURATED}
        if bad:
            raise ValueError(f"names unknown curated list(s) {bad}; curated: {sorted(CURATED)}")
        return value


class RenderTable(_Table):
    planes: _levels(*PLANES)
    conventions: _levels(*CONVENTIONS)
    prompts: _levels(*PROMPTS)
    backgrounds: _levels(*BACKGROUNDS)
    dims: _levels(*DIMS)
    image_size: Annotated[int, Field(ge=64, le=4096)]
    frames_3d: Annotated[int, Field(ge=2, le=MAX_FRAMES_3D, multiple_of=2)]  # even
    max_labels: Annotated[int, Field(ge=1, le=6)]  # letters A-F
    min_visible_area_mm2: Area
    min_frame_area_mm2: Area
    mri_window_percentiles: Annotated[list[Annotated[float, Field(ge=0, le=100)]],
                                      Field(min_length=2, max_length=2)]
    workers: Count

    @field_validator("mri_window_percentiles")
    @classmethod
    def _increasing(cls, value):
        if not value[0] < value[1]:
            raise ValueError("needs [low, high] with low < high")
        return value


class QuestionsTable(_Table):
    margin_mm: Positive
    terminologies: _levels(*TERMINOLOGIES)
    forms: _levels(*FORMS)
    families: _levels(*FAMILIES)
    ablations: _levels(*ABLATIONS)
    max_pairs_per_unit: AllOrCount
    cells_per_relation: AllOrCount
    terminologies_per_relation: AllOrCount
    plane_cells_per_unit: AllOrCount
    exclude_answer_in_name: bool = True


class SemsamTable(_Table):
    k: Count
    temperature: Positive
    top_k: Count
    top_p: Annotated[float, Field(gt=0, le=1)]
    mode: Literal[*SEMSAM_MODES]


class VllmOptions(BaseModel):
    """``[inference.vllm]``: how the vllm backend's engine runs (not what it answers)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    tensor_parallel_size: Count = 1
    max_model_len: Count | None = None  # the model's own, at most 8192
    max_num_seqs: Count | None = None
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.9
    limit_mm_per_prompt: dict[str, int | dict[str, int]] | None = None
    enforce_eager: bool | None = None


#: How a stack of frames is passed: one video, or one picture per frame.
STACK_AS = ("video", "images")
#: The longest ``api_key_env`` and the longest word (between underscores) in it: variable
#: names are short words joined by underscores; an API key is one long unbroken run.
KEY_ENV_MAX_LENGTH = 64
KEY_ENV_MAX_WORD = 20
KEY_ENV_RULE = (f"should be the NAME of the environment variable holding the key (A-Z, 0-9 "
                f"and _, at most {KEY_ENV_MAX_LENGTH} characters, words of at most "
                f"{KEY_ENV_MAX_WORD} between underscores, e.g. GEMINI_API_KEY), never the key "
                "itself; the value is not shown, as it may be a key")


def check_key_env(value: Any) -> str:
    """``value`` if it is shaped like an environment variable's name, else a ValueError.

    The error never quotes the value: a user who wrote the key itself where its variable's
    name belongs must not find the key in an error message, a log or a notebook's output.
    A long unbroken run of letters and digits (an uppercase hex key) is refused too.
    """
    if not (isinstance(value, str) and 0 < len(value) <= KEY_ENV_MAX_LENGTH
            and value[0] in "ABCDEFGHIJKLMNOPQRSTUVWXYZ_"
            and all(c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_" for c in value)
            and max(len(word) for word in value.split("_")) <= KEY_ENV_MAX_WORD):
        raise ValueError(f"api_key_env {KEY_ENV_RULE}")
    return value


#: ``api_key_env``: the NAME of the environment variable that holds an API key.
KeyEnvName = Annotated[str, AfterValidator(check_key_env)]


class EndpointFields(BaseModel):
    """The fields an endpoint is set up with, one definition for the two places that set
    them: the profile's ``[inference.openai]`` (:class:`OpenAIOptions`, also what the
    command line's ``--base-url``, ``--api-key-env``, ``--concurrency`` override) and a
    model's registry entry (:class:`ModelEntry`), so a value accepted in one is accepted
    in the other. None: not set here (the other place, then the backend's default,
    applies). The key itself is never in a profile: ``api_key_env`` names its variable.
    """

    model_config = ConfigDict(extra="forbid", strict=True)
    base_url: Annotated[str, Field(pattern=r"^https?://[^\s/]+\S*$")] | None = None
    api_key_env: KeyEnvName | None = None
    # how a stack is passed (None: a video where the processor takes one; the openai
    # backend's default is one picture per frame, what hosted APIs take)
    stack_as: Literal[*STACK_AS] | None = None
    price_prompt_per_mtok: Annotated[float, Field(ge=0)] | None = None  # USD per 1e6 tokens
    price_completion_per_mtok: Annotated[float, Field(ge=0)] | None = None
    max_concurrency: Count | None = None  # requests in flight (the backend's default: 8)
    request_budget: Count | None = None  # per run call, retries included
    token_budget: Count | None = None  # prompt plus completion tokens per run call


class OpenAIOptions(EndpointFields):
    """``[inference.openai]``: the endpoint the openai backend talks to and its limits
    (:class:`EndpointFields`, a model entry's values over them), and how it retries."""

    served_model: str | None = None
    timeout_s: Positive = 300.0
    retry_for_s: Positive = 600.0
    backoff_s: Positive = 1.0
    max_backoff_s: Positive = 30.0
    send_top_k: bool | None = None


class InferenceTable(_Table):
    backend: Literal[*BACKENDS]
    vllm: VllmOptions | None = None  # optional sub-table, read only by the vllm backend
    openai: OpenAIOptions | None = None  # optional sub-table, read only by the openai backend
    models: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    arms: _levels(*ARMS)
    n_trials: Count
    max_new_tokens: Count
    batch_size: Count
    limit: NonNegative  # 0: every question
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")]
    video_fps: Positive
    instruction: str


#: Weight dtypes a model entry may ask for (None: bf16 on CUDA, fp32 on CPU).
DTYPES = ("bfloat16", "float16", "float32")


class ModelEntry(EndpointFields):
    """One ``[models.<name>]`` table: a model the benchmark can run, with its own settings.

    ``name`` is the table's key (set by :func:`mislib.inference.models.model_entry`, never
    written in the table) and the ``model`` recorded in every result. Unset optional keys
    (None) fall back to the profile's ``[inference]`` / ``[semsam]`` values or, for the
    processor and weights, to the backend's own defaults. A plain model id listed in
    ``[inference] models`` is an entry with every key at its default.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    name: str = ""
    id: Annotated[str, Field(min_length=1)]  # hub id, local folder, smoke: id or served name
    backend: Literal[*BACKENDS] | None = None
    dtype: Literal[*DTYPES] | None = None
    min_pixels: Count | None = None  # per picture (the image processor's budget)
    max_pixels: Count | None = None
    frames_per_stack: Annotated[int, Field(ge=2, le=MAX_FRAMES_3D, multiple_of=2)] | None = None
    thinks: bool = False  # the model writes a <think> block before its answer
    reasoning_budget: NonNegative = 0  # tokens inside <think> before the answer is forced
    forced_answer_tokens: Count = 16  # tokens generated after the forced "Answer:"
    semsam_mode: Literal[*SEMSAM_MODES] | None = None
    temperature: Positive | None = None
    top_k: Count | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    max_new_tokens: Count | None = None
    trust_remote_code: bool = False
    params_b: Positive | None = None  # size in billions of parameters
    # the arms this model runs (None: the profile's); a hosted endpoint's sampler decodes
    # baseline only, so its entry says ["baseline"] and the other arms skip it
    arms: Annotated[list[Literal[*ARMS]], Field(min_length=1)] | None = None
    # stack_as and the openai backend's endpoint, credentials (the variable's NAME), prices
    # and limits: EndpointFields, shared with [inference.openai]

    @model_validator(mode="after")
    def _consistent(self):
        if (self.min_pixels is not None and self.max_pixels is not None
                and self.min_pixels > self.max_pixels):
            raise ValueError(f"min_pixels = {self.min_pixels} is above max_pixels = "
                             f"{self.max_pixels}")
        if self.reasoning_budget and not self.thinks:
            raise ValueError("reasoning_budget is set but thinks = false (a budget applies to "
                             "models that think; set thinks = true)")
        return self


def model_table_errors(name: str, values: Any) -> list[str]:
    """Problems of one ``[models.<name>]`` table, each naming the table and the key.

    ``api_key_env`` is never echoed: a user who wrote the key itself there must not find
    it in an error message or a log.
    """
    where = f"[models.{name}]"
    if not isinstance(values, Mapping):
        return [f"{where} should be a table, got {_show(values)}"]
    if "name" in values:
        return [f"{where} name: the table's key is the model's name; remove the key"]
    smoke_id = str(values.get("id", "")).startswith("smoke:")
    if smoke_id != str(name).startswith("smoke:"):
        # records carry the entry's name; "smoke:" is how figures and tables know that a
        # model's weights are random and its answers noise
        return [f"{where} id = {_show(values.get('id'))}: " + (
            "a smoke model's entry is named smoke:<name> (e.g. [models.\"smoke:thinking\"]) "
            "so that its records say its answers are noise" if smoke_id else
            "only a smoke model's entry may be named smoke:<name>")]
    try:
        ModelEntry.model_validate({**values, "name": str(name)})
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = str(e["loc"][0]) if e["loc"] else ""
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                near = difflib.get_close_matches(key, ModelEntry.model_fields, n=1)
                msg = "unknown key" + (f"; did you mean {near[0]!r}?" if near else "")
            elif e["type"] == "missing":
                msg = "missing (every model entry needs it)"
            elif e["type"] == "multiple_of":
                msg = "should be even"
            if key == "api_key_env":  # never echoed (check_key_env)
                problems.append(f"{where} api_key_env: {KEY_ENV_RULE}")
            elif key and key in values and not secret_name(key):
                problems.append(f"{where} {key} = {_show(values[key])}: {msg}")
            else:
                # a key without a value, or a rule across keys (its message names them)
                problems.append(f"{where} {key}: {msg}" if key else f"{where} {msg}")
        return list(dict.fromkeys(problems))
    return []


class ScoringTable(_Table):
    credible_level: Annotated[float, Field(gt=0, lt=1)]
    runs: list[str]


class AnalysisTable(_Table):
    factors: _levels(*MODEL_FACTORS)
    interactions: list[Annotated[str, Field(pattern=r"^[a-z_]+:[a-z_]+$")]]
    groups: _levels(*GROUPS, min_length=0)
    centred: _levels(*GROUPS, min_length=0) | Literal["auto"]
    prior_sd: Positive
    interaction_sd: Positive
    draws: Count
    tune: NonNegative
    chains: Count
    target_accept: Annotated[float, Field(gt=0, lt=1)]
    contrast_draws: Count
    ppc_draws: NonNegative

    @field_validator("interactions")
    @classmethod
    def _known_factors(cls, value):
        bad = sorted({f for term in value for f in term.split(":")} - set(MODEL_FACTORS))
        if bad:
            raise ValueError(f"names unknown factor(s) {bad}; factors: {list(MODEL_FACTORS)}")
        return value


class PaperTable(_Table):
    claims_arm: Literal[*ARMS]
    semsam_claim_model: str
    prompt_baseline: Literal[*PROMPTS]
    tolerance_points: Annotated[float, Field(gt=0)]
    min_questions: Count


#: Profile table -> its schema. A new stage table is one more entry here.
SCHEMA: dict[str, type[_Table]] = {
    "volumes": VolumesTable, "render": RenderTable, "questions": QuestionsTable,
    "semsam": SemsamTable, "inference": InferenceTable, "scoring": ScoringTable,
    "analysis": AnalysisTable, "paper": PaperTable,
}
TOP_LEVEL_KEYS = {"seed": int, "name": str}


#: Words of a key's name (between ``_``, ``-`` or ``.``) that say its value may be a
#: secret: a key pasted under a name of its own (``api_key = "..."``, ``token``,
#: ``secret``) is an unknown key, and its error must not show it any more than
#: ``api_key_env``'s does. Whole words: ``max_new_tokens`` keeps its value in errors.
SECRET_NAME_WORDS = frozenset({"key", "apikey", "token", "secret", "password", "passwd",
                               "credential", "credentials", "auth", "authorization",
                               "bearer"})


def secret_name(name: Any) -> bool:
    """Whether an error should not show the value of the key ``name`` (it may be a secret)."""
    return bool(SECRET_NAME_WORDS & set(re.split(r"[_.\-]+", str(name).lower())))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _table_errors(table: str, values: Mapping[str, Any]) -> list[str]:
    """Human-readable problems of one table: ``[table] key = value: what is wrong``."""
    model = SCHEMA[table]
    # TOML gives lists; a notebook override may pass a tuple for the same thing
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    try:
        model.model_validate(data)
    except ValidationError as err:
        by_key: dict[str, list[str]] = {}
        for e in err.errors():
            key = str(e["loc"][0]) if e["loc"] else "?"
            msg = e["msg"].removeprefix("Value error, ")
            if msg.startswith("Input should be "):
                msg = "should be " + msg.removeprefix("Input should be ")
            elif e["type"] != "value_error":
                msg = msg[:1].lower() + msg[1:]
            if e["type"] == "extra_forbidden" and len(e["loc"]) > 1:
                # a key of a sub-table ([inference.openai]): named, with the sub-table's
                # own keys to choose from
                sub = str(e["loc"][-1])
                near = difflib.get_close_matches(sub, _fields_of(model, key), n=1)
                msg = f"unknown key {sub!r}" + (f"; did you mean {near[0]!r}?" if near else "")
            elif e["type"] == "extra_forbidden":
                near = difflib.get_close_matches(key, model.model_fields, n=1)
                known = sorted(set(model.model_fields) - {"seed", "profile"})
                msg = "unknown key" + (f"; did you mean {near[0]!r}?" if near
                                       else f"; known: {known}")
            elif e["type"] == "missing":
                by_key.setdefault(key, []).append("missing (the stage needs this key)")
                continue
            elif e["type"] == "multiple_of" and e["ctx"]["multiple_of"] == 2:
                msg = "should be even"
            elif "[key]" in e["loc"]:  # a key of a sub-table
                msg = f"key {_show(e['input'])}: {msg}"
            elif any(isinstance(part, int) for part in e["loc"][1:]):
                msg = f"item {_show(e['input'])}: {msg}"  # one element of a list
            if msg not in by_key.setdefault(key, []):
                by_key[key].append(msg)
        return [f"[{table}] {key}" + (f" = {_show(_without_key(values[key]))}"
                                      if key in values and not secret_name(key) else "")
                + ": " + " or ".join(msgs) for key, msgs in by_key.items()]
    return []


def _fields_of(model: type[BaseModel], key: str) -> list[str]:
    """The keys of the sub-table ``key`` of ``model`` (``openai``: OpenAIOptions'), if any."""
    field = model.model_fields.get(key)
    kinds = () if field is None else (field.annotation, *get_args(field.annotation))
    for kind in kinds:
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            return list(kind.model_fields)
    return []


def _without_key(value: Any) -> Any:
    """A sub-table as an error shows it: ``api_key_env`` and any other key whose name says
    it may hold a secret (:func:`secret_name`) never echoed (a user who wrote the key itself
    there must not find it in an error message or a log)."""
    if isinstance(value, Mapping) and any(secret_name(k) for k in value):
        return {k: "<hidden>" if secret_name(k) else v for k, v in value.items()}
    return value


def _misspelt_model_names(profile: Mapping[str, Any]) -> list[str]:
    """Names in ``[inference] models`` that are no registry entry but nearly one.

    A name that is not a ``[models.<name>]`` table runs as a plain model id, so a typo in
    an entry's name would otherwise surface only when loading "qwen3-vl-8b-instruc" from
    the hub fails, after the stages before it ran.
    """
    entries = profile.get("models")
    listed = (profile.get("inference") or {}).get("models")
    if not isinstance(entries, Mapping) or not isinstance(listed, list):
        return []
    problems = []
    for name in listed:
        if not isinstance(name, str) or name in entries:
            continue
        near = difflib.get_close_matches(name, list(entries), n=1, cutoff=0.85)
        if near:
            problems.append(f"[inference] models: {name!r} is no [models.<name>] entry; did "
                            f"you mean {near[0]!r}? (a plain model id must not be this "
                            "close to an entry's name)")
    return problems


def check_profile(profile: Mapping[str, Any], tables: Iterable[str] | None = None) -> None:
    """Check a whole profile (or some of its ``tables``) against :data:`SCHEMA`.

    Raises
    ------
    ProfileError
        Listing every problem, each naming the table, the key and the value.
    """
    name = profile.get("name", "custom")
    problems = []
    if tables is None:
        for key, value in profile.items():
            if key in SCHEMA:
                continue
            if key == "models":  # the model registry: one table per model
                if not isinstance(value, Mapping):
                    problems.append(f"[models] should be a table of [models.<name>] tables, "
                                    f"got {_show(value)}")
                    continue
                for model_name, entry in value.items():
                    problems += model_table_errors(model_name, entry)
                continue
            if key in TOP_LEVEL_KEYS:
                if not isinstance(value, TOP_LEVEL_KEYS[key]) or isinstance(value, bool):
                    problems.append(f"{key} = {_show(value)}: should be "
                                    f"{TOP_LEVEL_KEYS[key].__name__}")
                continue
            near = difflib.get_close_matches(key, [*SCHEMA, "models", *TOP_LEVEL_KEYS], n=1)
            problems.append(f"unknown table or key {key!r}"
                            + (f"; did you mean {near[0]!r}?" if near else
                               f"; tables: {list(SCHEMA)}"))
        problems += [f"table [{t}] is missing" for t in SCHEMA if t not in profile]
        problems += _misspelt_model_names(profile)
        tables = [t for t in SCHEMA if t in profile]
    for table in tables:
        values = profile.get(table)
        if not isinstance(values, Mapping):
            problems.append(f"[{table}] should be a table, got {_show(values)}")
            continue
        problems += _table_errors(table, values)
    if problems:
        raise ProfileError(f"profile {name!r}: " + "; ".join(problems))


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def profile_name(profile: str | os.PathLike | Mapping[str, Any]) -> str:
    """A profile's name: the ``name`` of a loaded mapping, a TOML file's stem, or the name.

    >>> profile_name("demo"), profile_name("configs/my_run.toml"), profile_name({"name": "x"})
    ('demo', 'my_run', 'x')
    """
    if isinstance(profile, Mapping):
        return str(profile.get("name", "custom"))
    text = os.fspath(profile)
    return Path(text).stem if text.endswith(".toml") else text


def resolve_profile(name: str | os.PathLike) -> str:
    """A profile name as is, or a TOML path made absolute from the current directory.

    ``make reproduce PROFILE=my.toml`` means ``my.toml`` where the user ran ``make``; the
    notebooks run in ``notebooks/``, so the path is resolved before they start.
    """
    text = os.fspath(name)
    if text.endswith(".toml") or os.sep in text or "/" in text:
        return str(Path(text).expanduser().resolve())
    return text


def load_profile(name: str | os.PathLike = "demo") -> dict[str, Any]:
    """The whole profile as a dict, checked against :data:`SCHEMA`.

    ``name`` is a profile name (``mislib/profiles/<name>.toml``) or a path to a TOML file
    (relative paths from the current directory).

    Raises
    ------
    ProfileError
        The file is missing or not TOML, or a value breaks the schema (every problem named).
    """
    path = Path(resolve_profile(name))
    if not path.is_absolute():
        path = PROFILE_DIR / f"{name}.toml"
    if not path.is_file():
        raise ProfileError(
            f"unknown profile {str(name)!r}: no file {path}; available: {available_profiles()}"
        )
    try:
        with path.open("rb") as fh:
            profile = tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ProfileError(f"{path}: not valid TOML ({err})") from err
    profile.setdefault("name", path.stem)
    try:
        check_profile(profile)
    except ProfileError as err:
        raise ProfileError(f"{path}: {err}") from None
    return profile


def stage_params(profile: str | Mapping[str, Any], stage: str, **overrides: Any) -> dict[str, Any]:
    """Parameters of one stage: the profile's ``[stage]`` table, ``seed``, then ``overrides``.

    Overrides whose value is ``None`` are ignored, so a notebook's parameters cell can leave
    a knob at ``None`` to mean "the profile's value". Unknown keys are rejected so a typo in
    a notebook cell does not silently do nothing, and the result is checked against the
    stage's schema (:data:`SCHEMA`), so an override is held to the profile's rules.

    Raises
    ------
    ProfileError
        An unknown key or a value the stage cannot use (naming table, key and value).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {STAGES}")
    prof = load_profile(profile) if not isinstance(profile, Mapping) else profile
    params = copy.deepcopy(dict(prof.get(stage, {})))
    params.setdefault("seed", prof.get("seed", 0))
    params["profile"] = prof.get("name", "custom")
    known = set(params) | set(SCHEMA[stage].model_fields) if stage in SCHEMA else set(params)
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in known:
            raise ProfileError(
                f"unknown parameter {key!r} for stage {stage!r} of profile "
                f"{params['profile']!r}; known: {sorted(known)}"
            )
        params[key] = value
    if stage in SCHEMA:
        check_profile({"name": params["profile"], stage: params}, tables=[stage])
    return params


def config_hash(params: Mapping[str, Any]) -> str:
    """A short, stable hash of a JSON-serialisable parameter mapping (key order ignored)."""
    blob = json.dumps(params, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_digest(path: str | os.PathLike) -> str:
    """A short SHA-256 of a file's bytes, read in 1 MiB blocks: stages put the digests of
    their input files into their configuration hash, so new inputs make outputs stale."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _stamp_path(out_dir: Path, stage: str) -> Path:
    return Path(out_dir) / f".{stage}.stage.json"


def output_manifest(out_dir: str | os.PathLike,
                    outputs: Iterable[str | os.PathLike]) -> dict[str, dict[str, int]]:
    """What each output is on disk: a file's ``bytes``; a folder's ``files`` and ``bytes``.

    The stamp records it, so an output that lost files or bytes after the stamp was written
    (a kill while a folder was replaced, a file deleted by hand) makes the stage stale.
    A missing output is ``{"missing": 1}``.
    """
    manifest = {}
    for name in outputs:
        path = Path(out_dir, name)
        if path.is_file():
            manifest[str(name)] = {"bytes": path.stat().st_size}
        elif path.is_dir():
            sizes = [f.stat().st_size for f in path.rglob("*") if f.is_file()]
            manifest[str(name)] = {"files": len(sizes), "bytes": sum(sizes)}
        else:
            manifest[str(name)] = {"missing": 1}
    return manifest


def is_fresh(out_dir: str | os.PathLike, stage: str, params: Mapping[str, Any],
             outputs: Iterable[str | os.PathLike]) -> bool:
    """True when ``out_dir`` holds a stamp of ``stage`` for these params and every output
    exists as the stamp's manifest recorded it (same files, same sizes)."""
    recorded = read_stamp(out_dir, stage)
    if recorded is None or recorded.get("hash") != config_hash(params):
        return False
    outputs = [str(o) for o in outputs]
    if not all(Path(out_dir, o).exists() for o in outputs):
        return False
    manifest = recorded.get("manifest")
    if manifest is None:  # a stamp written before manifests: existence is all it can say
        return True
    return output_manifest(out_dir, manifest) == manifest and set(outputs) <= set(manifest)


def write_stamp(out_dir: str | os.PathLike, stage: str, params: Mapping[str, Any],
                outputs: Iterable[str | os.PathLike],
                extra: Mapping[str, Any] | None = None) -> Path:
    """Record that ``stage`` produced ``outputs`` (paths relative to ``out_dir``) for ``params``.

    The stamp holds the parameters' hash and the outputs' manifest
    (:func:`output_manifest`), plus ``extra`` (e.g. the input files' digests). It is written
    to a temporary file and moved in, so a reader never sees half a stamp. Write it after
    the outputs, never before (:mod:`mislib.stage` does both in that order).
    """
    stamp = _stamp_path(Path(out_dir), stage)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    outputs = [str(o) for o in outputs]
    record = {"stage": stage, "hash": config_hash(params), "params": dict(params),
              "outputs": outputs, "manifest": output_manifest(out_dir, outputs),
              **dict(extra or {})}
    tmp = stamp.with_name(stamp.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    os.replace(tmp, stamp)
    return stamp


def remove_stamp(out_dir: str | os.PathLike, stage: str) -> None:
    """Drop a stage's stamp: done before its old outputs are touched, so a kill in between
    leaves no stamp vouching for outputs that are half replaced."""
    _stamp_path(Path(out_dir), stage).unlink(missing_ok=True)


def read_stamp(out_dir: str | os.PathLike, stage: str) -> dict[str, Any] | None:
    """The stamp's record, or None when there is none (or it is unreadable)."""
    stamp = _stamp_path(Path(out_dir), stage)
    try:
        record = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
