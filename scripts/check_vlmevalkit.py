"""Check the VLMEvalKit export against VLMEvalKit itself (a checkout of it; not run by CI).

VLMEvalKit is not on the package registry, so the test suite checks the TSVs against its
loader rules as ``data/README.md`` states them. With a VLMEvalKit checkout importable (its
requirements installed), this script runs its own code on the export instead::

    python scripts/check_vlmevalkit.py --vlmevalkit /path/to/VLMEvalKit \\
        --export data/benchmark/export/vlmevalkit --work /tmp/vlmevalkit-check

For each file it prints the class VLMEvalKit builds (``build_dataset`` for the files it
recognises from their columns, ``run.build_dataset_from_config`` with ``config.json`` for
all), the message types of the first prompt, what VLMEvalKit's Qwen3-VL wrapper makes of
them (``Qwen3VLChat._prepare_content``, without loading a model) and, for a stack, how many
frames ``qwen_vl_utils`` reads; then it scores predictions that are right on every other
row with the dataset's own ``evaluate`` (``exact_matching``) and prints the overall score,
which must be 0.5 (50 on the yes/no scale).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import string
import sys
import types


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vlmevalkit", required=True, help="VLMEvalKit checkout (has run.py)")
    parser.add_argument("--export", required=True, help="the export's vlmevalkit/ folder")
    parser.add_argument("--work", required=True, help="scratch folder ($LMUData and outputs)")
    args = parser.parse_args()
    lmu = os.path.join(args.work, "LMUData")
    os.makedirs(lmu, exist_ok=True)
    os.environ["LMUData"] = lmu
    for name in os.listdir(args.export):
        if name.endswith(".tsv"):
            shutil.copyfile(os.path.join(args.export, name), os.path.join(lmu, name))
    sys.path[:0] = [args.export, args.vlmevalkit]

    import mis_ground_vlmeval  # noqa: F401  (registers the 3D classes)
    import pandas as pd
    from vlmeval.dataset import build_dataset
    from vlmeval.smp import dump
    from vlmeval.vlm.base import BaseModel
    from vlmeval.vlm.qwen3_vl.model import Qwen3VLChat

    spec = importlib.util.spec_from_file_location("vlmeval_run",
                                                  os.path.join(args.vlmevalkit, "run.py"))
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    config = json.load(open(os.path.join(args.export, "config.json")))["data"]

    class Echo(BaseModel):  # BaseModel.generate's checks, then the message back
        def generate_inner(self, message, dataset=None):
            return message

    wrapper = types.SimpleNamespace(min_pixels=None, max_pixels=None, total_pixels=None,
                                    fps=2, nframe=128, FRAME_FACTOR=2)  # Qwen3VLChat defaults
    report = {}
    for name in config:
        auto = build_dataset(name)
        dataset = run.build_dataset_from_config(config, name)
        messages = dataset.build_prompt(dataset.data.iloc[0])
        content = Qwen3VLChat._prepare_content(wrapper, Echo().generate(messages, dataset=name),
                                               dataset=name)
        entry = {"class": type(dataset).__name__,
                 "class_from_columns": type(auto).__name__ if auto is not None else None,
                 "rows": len(dataset), "message_types": [m["type"] for m in messages],
                 "qwen3vl_content": [{k: v for k, v in c.items() if k in ("type", "video", "fps",
                                                                          "nframes")}
                                     for c in content]}
        if messages[0]["type"] == "video":
            from qwen_vl_utils import process_vision_info

            _, videos, _ = process_vision_info([{"role": "user", "content": content}],
                                               return_video_kwargs=True, image_patch_size=16,
                                               return_video_metadata=True)
            entry["frames_read"] = int(videos[0][0].shape[0])
            entry["n_frames"] = int(dataset.data.iloc[0]["n_frames"])
        data = dataset.data.copy()
        letters = [c for c in data.columns if len(c) == 1 and c in string.ascii_uppercase]
        predictions = []
        for k, row in enumerate(data.to_dict("records")):
            if letters:
                wrong = next(x for x in letters if x != row["answer"] and not pd.isna(row[x]))
                predictions.append(f"The answer is {row['answer']}." if k % 2 == 0
                                   else f"{wrong}. {row[wrong]}")
            else:
                predictions.append(row["answer"] if k % 2 == 0
                                   else {"Yes": "No", "No": "Yes"}[row["answer"]])
        data["prediction"] = predictions
        work = os.path.join(args.work, "eval", name)
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        pred_file = os.path.join(work, f"check_{name}.xlsx")
        dump(data.drop(columns=["image"], errors="ignore"), pred_file)
        score = dataset.evaluate(pred_file, model="exact_matching", nproc=1)
        entry["overall"] = float(score["Overall"].iloc[0])
        report[name] = entry
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
