"""Command line: ``python -m mislib <command> --profile demo``.

Each command calls the same library function that the corresponding notebook calls.
"""

from __future__ import annotations

import argparse
import sys


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="demo", help="profile name or path to a TOML file")
    p.add_argument("--force", action="store_true", help="redo work even if outputs are fresh")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mislib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("reproduce", help="run the numbered notebooks headless (papermill)")
    _add_common(p)
    p.add_argument("--nb", default=None, help="run one notebook, e.g. 01")

    p = sub.add_parser("prepare", help="stage 01: prepare volumes")
    _add_common(p)
    p = sub.add_parser("render", help="stage 02: render slices and stacks")
    _add_common(p)
    p = sub.add_parser("questions", help="stage 03: generate questions")
    _add_common(p)
    p = sub.add_parser("export", help="export questions as a HF parquet dataset and a TSV")
    _add_common(p)

    p = sub.add_parser("infer", help="stage 04: run a model on the benchmark")
    _add_common(p)
    p.add_argument("--arm", choices=["baseline", "semsam"], required=True)
    p.add_argument("--model", default=None, help="model id (default: the profile's first)")
    p.add_argument("--limit", type=int, default=None, help="at most this many questions")
    p.add_argument("--out", default=None, help="results folder (default data/results)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "reproduce":
        from mislib.notebooks import main_reproduce

        return main_reproduce(args)
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

        export(profile=args.profile)
    elif args.command == "infer":
        from mislib.inference import run_inference

        run_inference(profile=args.profile, arm=args.arm, model=args.model, limit=args.limit,
                      out=args.out, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
