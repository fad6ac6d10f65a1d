"""Command line: ``python -m mislib <command> --profile demo``.

Each command calls the same library function that the corresponding notebook calls.
"""

from __future__ import annotations

import argparse
import sys

from mislib.inference.protocol import ARMS


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="demo", help="profile name or path to a TOML file")
    p.add_argument("--force", action="store_true", help="redo work even if outputs are fresh")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mislib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("reproduce", help="run the numbered notebooks headless (papermill)")
    _add_common(p)
    p.add_argument("--nb", default=None, help="run one notebook, e.g. 01")

    p = sub.add_parser("report", help="static HTML site of the last run: build/site/index.html")
    p.add_argument("--profile", default="demo", help="profile whose executed notebooks to show")

    sub.add_parser("lab", help="JupyterLab on the repository with the project's kernel "
                               "(other arguments go to `jupyter lab`)")

    p = sub.add_parser("prepare", help="stage 01: prepare volumes")
    _add_common(p)
    p = sub.add_parser("render", help="stage 02: render slices and stacks")
    _add_common(p)
    p = sub.add_parser("questions", help="stage 03: generate questions")
    _add_common(p)
    p = sub.add_parser("export", help="export questions as a HF parquet dataset and a TSV")
    _add_common(p)

    p = sub.add_parser("infer", help="stage 04: run the profile's models on the benchmark")
    _add_common(p)
    p.add_argument("--arm", action="append", choices=ARMS, default=None,
                   help="an arm to run (repeatable; default: the profile's arms)")
    p.add_argument("--model", action="append", default=None,
                   help="a model to run: a [models.<name>] entry or a model id "
                        "(repeatable; default: the profile's models)")
    p.add_argument("--limit", type=int, default=None,
                   help="at most this many questions (adds to the run, never shrinks it)")
    p.add_argument("--out", default=None, help="results folder (default data/results)")
    p.add_argument("--backend", default=None, choices=("hf", "vllm", "openai"),
                   help="inference backend (default: the profile's)")
    p.add_argument("--base-url", default=None,
                   help="openai backend: the endpoint's API root, e.g. http://127.0.0.1:8000/v1 "
                        "(overrides the profile's)")
    p.add_argument("--api-key-env", default=None,
                   help="openai backend: the NAME of the environment variable holding the "
                        "API key (never the key itself)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="openai backend: requests in flight at once")
    p.add_argument("--worker", type=int, default=0,
                   help="this process's share of the (question, trial) keys: 0..workers-1")
    p.add_argument("--workers", type=int, default=1,
                   help="number of workers sharing the run; with more than one, run "
                        "`python -m mislib compact` after all have finished")

    p = sub.add_parser("launch", help="stage 04 on every GPU of this node (or a Ray cluster)")
    p.add_argument("--profile", default="demo", help="profile name or path to a TOML file")
    p.add_argument("--arm", action="append", choices=ARMS, default=None,
                   help="an arm to run (repeatable; default: the profile's arms)")
    p.add_argument("--model", action="append", default=None,
                   help="a model to run: a [models.<name>] entry or a model id "
                        "(repeatable; default: the profile's models)")
    p.add_argument("--limit", type=int, default=None, help="at most this many questions")
    p.add_argument("--out", default=None, help="results folder (default data/results)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: one per visible GPU, 1 without GPUs)")
    p.add_argument("--backend", default=None,
                   help="inference backend of every worker (default: the profile's); the "
                        "workers run under this Python, so launch vllm runs from .venv-vllm")
    p.add_argument("--gpus-per-worker", type=int, default=None,
                   help="GPUs each worker sees (default 1; more for tensor-parallel models)")
    p.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                   help="run the workers as Ray actors on this cluster (default address: "
                        "auto, the cluster this node belongs to)")

    p = sub.add_parser("serve", help="a vLLM OpenAI server that decodes every arm with SemSam "
                                     "(for --backend openai, on this or a GPU machine)")
    p.add_argument("--profile", default="demo", help="profile name or path to a TOML file")
    p.add_argument("--model", default=None,
                   help="model id to serve, also its served name (default: the profile's first)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0: reachable from other machines)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--api-key-env", default=None,
                   help="NAME of the environment variable holding the key clients must send")
    p.add_argument("--python", default=None,
                   help="interpreter with vLLM (default: .venv-vllm/bin/python)")
    p.add_argument("--no-table", action="store_true",
                   help="serve without the neighbour table (baseline and greedy arms only)")

    p = sub.add_parser("compact", help="stage 04: join the shards of runs into responses.parquet")
    p.add_argument("runs", nargs="*", help="run folders or ids (default: every run with "
                                           "records not yet compacted)")
    p.add_argument("--out", default=None, help="results folder (default data/results)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from mislib.config import ProfileError, load_profile

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "lab":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:  # a bad profile value stops here, before any stage runs, naming table and key
        if getattr(args, "profile", None) is not None:
            load_profile(args.profile)
    except ProfileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "reproduce":
        from mislib.notebooks import main_reproduce

        return main_reproduce(args)
    if args.command == "report":
        from mislib.report import main_report

        return main_report(args)
    if args.command == "lab":
        from mislib.lab import main_lab

        return main_lab(unknown)
    if args.command == "prepare":
        from mislib.volumes import prepare

        prepare(profile=args.profile, force=args.force)
    elif args.command == "render":
        from mislib.render import render_benchmark

        render_benchmark(profile=args.profile, force=args.force)
    elif args.command == "questions":
        from mislib.questions import generate

        generate(profile=args.profile, force=args.force)
    elif args.command == "export":
        from mislib.questions import export

        export(profile=args.profile, force=args.force)
    elif args.command == "infer":
        from mislib.inference import run_profile

        try:
            run_profile(args.profile, models=args.model, arms=args.arm, limit=args.limit,
                        out=args.out, force=args.force, worker=args.worker,
                        workers=args.workers, backend=args.backend,
                        openai=_endpoint_options(args))
        except RuntimeError as err:  # an endpoint that refused the key, a spent budget, ...
            if type(err).__module__ != "mislib.inference.backends.openai":
                raise
            print(f"error: {err}", file=sys.stderr)
            return 1
    elif args.command == "serve":
        from mislib.serve import serve

        serve(args.profile, model=args.model, port=args.port, host=args.host,
              device=args.device, api_key_env=args.api_key_env, python=args.python,
              table=not args.no_table)
    elif args.command == "launch":
        from mislib.inference import workers

        kwargs = {"workers": args.workers, "models": args.model, "arms": args.arm,
                  "limit": args.limit, "out": args.out, "backend": args.backend}
        if args.ray:
            runs = workers.launch_ray(args.profile, address=args.ray,
                                      gpus_per_worker=args.gpus_per_worker, **kwargs)
        else:
            runs = workers.launch_local(args.profile, gpus_per_worker=args.gpus_per_worker or 1,
                                        **kwargs)
        for run_dir in runs:
            print(f"compacted {run_dir}")
    elif args.command == "compact":
        return _compact(args)
    return 0


def _endpoint_options(args: argparse.Namespace) -> dict | None:
    """The command line's endpoint flags, which win over the model's entry and the
    profile's ``[inference.openai]`` table (None when no flag is given)."""
    flags = {"base_url": args.base_url, "api_key_env": args.api_key_env,
             "max_concurrency": args.concurrency}
    return {k: v for k, v in flags.items() if v is not None} or None


def _compact(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mislib.inference.store import compact_run, pending_runs
    from mislib.paths import project_paths

    results = Path(args.out) if args.out else project_paths().results
    runs = [Path(r) if Path(r).is_dir() else results / r for r in args.runs]
    for run_dir in runs or pending_runs(results):
        frame = compact_run(run_dir)
        print(f"{run_dir.name}: {len(frame)} records in responses.parquet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
