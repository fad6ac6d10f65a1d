"""Run every ``bench/bench_*.py`` module's ``run()`` and print its figures as JSON lines.

Each module exposes ``run(quick: bool = False) -> list[dict]``; every dict is one figure
(``{"bench": ..., "metric": ..., "value": ..., "unit": ..., ...}``), with any ratios that
the targets name measured side by side in the same run. ``--only semsam`` runs one module;
``--quick`` shrinks the sizes for a smoke check.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
import traceback

import bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("--only", default=None, help="run bench_<ONLY>.py alone")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke check")
    args = parser.parse_args(argv)
    names = sorted(m.name for m in pkgutil.iter_modules(bench.__path__)
                   if m.name.startswith("bench_"))
    if args.only:
        names = [n for n in names if n == f"bench_{args.only}"]
        if not names:
            parser.error(f"no benchmark module bench_{args.only}.py")
    failed = 0
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        t0 = time.perf_counter()
        try:
            for figure in module.run(quick=args.quick):
                print(json.dumps({"module": name, **figure}, default=float), flush=True)
        except Exception:  # one broken benchmark must not hide the others' figures
            failed += 1
            traceback.print_exc()
            print(json.dumps({"module": name, "error": "failed; traceback above"}), flush=True)
        print(json.dumps({"module": name, "metric": "wall_s",
                          "value": round(time.perf_counter() - t0, 2)}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
