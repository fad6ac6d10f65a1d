"""The exports read by the harnesses themselves, in lmms-eval's venv (``make env-lmms``).

lmms-eval's task loader builds every document and prompt of an export; its CLI runs the smoke
Qwen3-VL through lmms-eval's own ``qwen3_vl`` model class on CPU, and the scores it reports
equal stage 06's scoring (``mislib.scoring.rescore`` + Bayes@N) of the same responses. The
VLMEvalKit 3D class is run against a stand-in of the two VLMEvalKit base classes it extends
(VLMEvalKit itself is not on the package registry), with the real video reader that
VLMEvalKit's Qwen3-VL wrapper uses (``qwen_vl_utils``, installed with lmms-eval).
"""

from __future__ import annotations

import base64
import glob
import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import require
from PIL import Image
from test_questions import make_inputs

from mislib.export import export_paths
from mislib.export.lmms_eval import FILTER, task_name
from mislib.export.vlmevalkit import read_tsv
from mislib.questions import export, generate
from mislib.scoring import bayes_interval, outcome_matrix, rescore, unparseable_rates

ROOT = Path(__file__).resolve().parents[1]
LMMS_PYTHON = ROOT / ".venv-lmms" / "bin" / "python"
PROBE = Path(__file__).with_name("lmms_eval_probe.py")


def _lmms_ready() -> bool:
    if not LMMS_PYTHON.is_file():
        return False
    done = subprocess.run([str(LMMS_PYTHON), "-c", "import lmms_eval, decord, mislib"],
                          capture_output=True, env=_env(None))
    return done.returncode == 0


def _env(tmp) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if tmp is not None:
        env["HF_HOME"] = str(tmp / "hf-home")
        env["HF_DATASETS_CACHE"] = str(tmp / "hf-datasets")
    return env


@pytest.fixture(scope="module")
def lmms(tmp_path_factory):
    require(_lmms_ready(), "the lmms-eval venv (.venv-lmms with lmms-eval and decord)",
            "make env-lmms")
    root = tmp_path_factory.mktemp("lmms_export")
    make_inputs(root, conventions=("standard",), prompts=("none", "mask"))
    questions = generate("demo", root=root, force=True)
    export("demo", root=root, check=False)
    return root, questions


@pytest.fixture(scope="module")
def probed(lmms, tmp_path_factory):
    """What lmms-eval's own loader built from the export, and its scores of scripted replies."""
    root, _ = lmms
    tmp = tmp_path_factory.mktemp("probe")
    _run([str(PROBE), str(export_paths(root)["lmms_eval"]), str(tmp / "probe.json")], tmp)
    return json.loads((tmp / "probe.json").read_text())


def _run(args, tmp, timeout=900):
    done = subprocess.run([str(LMMS_PYTHON), *args], capture_output=True, text=True,
                          env=_env(tmp), timeout=timeout, cwd=str(tmp))
    assert done.returncode == 0, f"{args[:2]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def _kind(row) -> str:
    if pd.isna(row["image_path"]):
        return "text"
    return "video" if row["dims"] == "3d" else "image"


def _stage06(responses: pd.DataFrame, questions: pd.DataFrame) -> dict[str, float]:
    """Stage 06's figures for one set of responses: re-parse, score, Bayes@N, parse rates."""
    frame = responses.assign(run_id="lmms-eval", model="model", arm="baseline")
    scored = rescore(frame, questions, progress=False)
    R, _, n_incomplete = outcome_matrix(scored)
    assert n_incomplete == 0
    mu, _sigma, lo, hi = bayes_interval(R, level=0.95)
    rates = unparseable_rates(scored).iloc[0]
    return {"accuracy": float(scored["correct"].mean()), "bayes_at_n": mu, "bayes_lo95": lo,
            "bayes_hi95": hi, "unparseable_rate": float(rates["unparseable_rate"]),
            "ambiguous_rate": float(rates["ambiguous_rate"])}


def test_lmms_eval_loader_builds_every_document_and_prompt(lmms, probed):
    _, questions = lmms
    report = probed["load"]
    rows = questions.assign(kind=[_kind(r) for r in questions.to_dict("records")])
    expected = {task_name(f, k): g for (f, k), g in rows.groupby(["family", "kind"])}
    assert report["groups"] == {"mis_ground": sorted(expected)}
    assert set(report["tasks"]) == set(expected)
    for name, entry in report["tasks"].items():
        group = expected[name].set_index("question_id")
        assert sorted(entry["question_ids"]) == sorted(group.index)
        assert entry["prompts"] == [group.at[q, "text"] for q in entry["question_ids"]]
        assert entry["targets"] == [group.at[q, "answer"] for q in entry["question_ids"]]
        assert entry["filters"] == [FILTER] and entry["repeats"] == 2  # demo n_trials
        assert entry["task_class"] == "ConfigurableMessagesTask"
        kind = name.rsplit("_", 1)[1]
        n = len(group)
        assert entry["images"] == (n if kind == "image" else 0)
        assert entry["videos"] == (n if kind == "video" else 0)
        assert entry["video_frames"] == (int(group["n_frames"].sum()) if kind == "video" else 0)


def test_lmms_eval_metrics_equal_stage_06_on_the_same_responses(lmms, probed):
    _, questions = lmms
    report = probed["score"]
    assert len(report) == 6
    for name, entry in report.items():
        responses = pd.DataFrame(entry["responses"])
        expected = _stage06(responses, questions)
        assert 0 < expected["accuracy"] < 1 and expected["unparseable_rate"] > 0, name
        assert entry["metrics"] == pytest.approx(expected, abs=1e-12), name


@pytest.mark.slow
def test_lmms_eval_cli_runs_the_smoke_qwen3_vl_and_reports_stage_06_scores(lmms, smoke_root,
                                                                            tmp_path):
    from mislib.smoke import smoke_model_dir

    root, questions = lmms
    model = smoke_model_dir(smoke_root)
    out = tmp_path / "lmms-out"
    done = _run(["-m", "lmms_eval", "--model", "qwen3_vl", "--model_args",
                 f"pretrained={model},device=cpu,device_map=cpu,min_pixels=1024,"
                 "max_pixels=4096,max_num_frames=4",
                 "--tasks", "mis_ground", "--include_path", str(export_paths(root)["lmms_eval"]),
                 "--limit", "1", "--batch_size", "1", "--output_path", str(out),
                 "--log_samples", "--verbosity", "WARNING"], tmp_path)
    assert "mis_ground" in done.stdout and "bayes_at_n" in done.stdout
    results = json.loads(Path(glob.glob(str(out / "**" / "*results.json"),
                                        recursive=True)[0]).read_text())["results"]
    pooled = []
    for task in (t for t in results if t != "mis_ground"):
        [samples] = glob.glob(str(out / "**" / f"*samples_{task}.jsonl"), recursive=True)
        rows = []
        for line in Path(samples).read_text().splitlines():
            sample = json.loads(line)
            texts = sample["filtered_resps"]
            texts = texts[0] if texts and isinstance(texts[0], list) else texts
            assert len(texts) == 2  # repeats: the demo's n_trials
            qid = sample["accuracy"]["question_id"]
            rows += [{"question_id": qid, "trial": t, "raw_text": r} for t, r in enumerate(texts)]
        responses = pd.DataFrame(rows)
        pooled.append(responses)
        reported = {m: results[task][f"{m},{FILTER}"] for m in _stage06(responses, questions)}
        assert reported == pytest.approx(_stage06(responses, questions), abs=1e-12), task
    everything = _stage06(pd.concat(pooled, ignore_index=True), questions)
    for metric in ("accuracy", "bayes_at_n", "unparseable_rate", "ambiguous_rate"):
        assert results["mis_ground"][f"{metric},{FILTER}"] == pytest.approx(everything[metric],
                                                                            abs=1e-12)


_STAND_IN = '''
"""A stand-in for the two VLMEvalKit base classes mis_ground_vlmeval extends: as in
ImageBaseDataset.dump_image / ImageMCQDataset.build_prompt, a row whose image is a list of
base64 frames is written as {img_root}/{index}_{i}.png and prompted as one image message per
frame, then the question text."""
import base64, os, os.path as osp


class _Base:
    def __init__(self, data, img_root):
        self.data, self.img_root = data, img_root

    def build_prompt(self, line):
        paths = []
        for i, b64 in enumerate(line["image"]):
            path = osp.join(self.img_root, f"{line['index']}_{i}.png")
            os.makedirs(self.img_root, exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(base64.b64decode(b64))
            paths.append(path)
        return [dict(type="image", value=p) for p in paths] + [
            dict(type="text", value=line["question"])]


class CustomMCQDataset(_Base):
    pass


class ImageYORNDataset(_Base):
    pass
'''

_VIDEO_CHECK = '''
import json, sys
import decord, numpy as np
from PIL import Image
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import mis_ground_vlmeval as m
from qwen_vl_utils import fetch_video

line = json.loads(open(sys.argv[3]).read())
out = {}
for cls in (m.MISGroundVideoMCQ, m.MISGroundVideoYORN):
    ds = cls(None, sys.argv[4])
    msgs = ds.build_prompt(line)
    video = msgs[0]
    frames = decord.VideoReader(video["value"]).get_batch(list(range(len(line["image"])))).asnumpy()
    pngs = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in line["frame_files"]])
    # as Qwen3VLChat prepares a video file: file:// URL plus its own fps (default 2)
    sampled, meta = fetch_video({"type": "video", "video": "file://" + video["value"],
                                 "fps": 2.0}, image_patch_size=16, return_video_metadata=True)
    out[cls.__name__] = {"types": [x["type"] for x in msgs], "keys": sorted(video),
                         "lossless": bool((frames == pngs).all()),
                         "n_video_frames": len(decord.VideoReader(video["value"])),
                         "sampled": int(sampled.shape[0]),
                         "indices": [int(i) for i in meta["frames_indices"]]}
print(json.dumps(out))
'''


def test_vlmeval_3d_class_hands_every_frame_to_qwen3_vl_as_one_video(lmms, tmp_path):
    root, questions = lmms
    folder = export_paths(root)["vlmevalkit"]
    row = read_tsv(folder / "MIS-Ground_3D_MCQ.tsv").iloc[0].to_dict()
    n = int(row["n_frames"])
    # 64-pixel frames: the fixture's 8-pixel ones are below what the video readers take
    rng = np.random.default_rng(0)
    files, frames = [], []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
        files.append(tmp_path / f"frame_{i}.png")
        files[-1].write_bytes(buf.getvalue())
        frames.append(base64.b64encode(buf.getvalue()).decode())
    line = {"index": int(row["index"]), "render_id": row["render_id"], "image": frames,
            "question": row["question"], "frame_files": [str(f) for f in files]}
    (tmp_path / "line.json").write_text(json.dumps(line))
    stand_in = tmp_path / "stand_in" / "vlmeval" / "dataset"
    stand_in.mkdir(parents=True)
    (stand_in.parent / "__init__.py").write_text("")
    (stand_in / "__init__.py").write_text("")
    (stand_in / "image_mcq.py").write_text(_STAND_IN)
    (stand_in / "image_yorn.py").write_text("from .image_mcq import ImageYORNDataset  # noqa\n")
    done = _run(["-c", _VIDEO_CHECK, str(folder), str(tmp_path / "stand_in"),
                 str(tmp_path / "line.json"), str(tmp_path / "img")], tmp_path)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for name, entry in report.items():
        assert entry["types"] == ["video", "text"], name
        assert entry["keys"] == ["type", "value"], name  # the wrapper adds fps or nframes
        assert entry["lossless"] and entry["n_video_frames"] == n, name
        assert entry["sampled"] == n and entry["indices"] == list(range(n)), name

