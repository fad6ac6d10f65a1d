"""Real CT and MR cases for the demo: TotalSegmentator's own test data, laid out as data sets.

The ``totalsegmentator`` source distribution on the package registry ships, for its own tests,
real scans with the segmentations its models produced (``tests/reference_files/``, licensed
Apache-2.0 like the package). The demo takes four of them and lays each out in the layout a
real data set of its kind uses, so that stage 01 reads them with the same readers as the
paper profile's data (:mod:`mislib.volumes`):

======================== ================================= ===================================
source / case            layout                             from the sdist
======================== ================================= ===================================
torso_ct / abdomen_3mm   TotalSegmentator: ``ct.nii.gz`` +  ``example_ct_sm.nii.gz`` +
                         ``segmentations/<class>.nii.gz``   ``example_seg_fast/<class>.nii.gz``
torso_ct / aorta_1p5mm   TotalSegmentator                   ``aorta_report/test_result/models/``
                                                            ``ct_cropped.nii.gz`` + the masks
                                                            there named as ``total`` classes
torso_mr / abdomen       label map: ``image.nii.gz`` +      ``example_mr_sm.nii.gz`` +
                         ``labels.nii.gz`` + ``labels.csv`` ``example_seg_mr.nii.gz``
                                                            (``total_mr`` class map)
torso_ct_dicom / abdomen label map with a DICOM series as   ``example_ct_dicom/`` +
                         its image: ``image/`` +            ``example_seg_dicom.nii.gz``
                         ``labels.nii.gz`` + ``labels.csv`` (``total`` class map)
======================== ================================= ===================================

``labels.csv`` (``index,name``) is written from the installed ``totalsegmentator`` package's
class map (``totalsegmentator.map_to_binary.class_map``), the names TotalSegmentator gives
the label values of its multi-label outputs.

The sdist is fetched once with pip, pinned by version and SHA-256, and cached in the
repository's git-ignored ``.cache/sdist/`` — not under ``data/``, so that deleting generated
data (or preparing in another root, as the tests do) never downloads it again, and not in the
user's home, so that deleting the checkout leaves nothing behind.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from mislib.paths import REPO_ROOT

TOTALSEGMENTATOR_VERSION = "2.18.0"
TOTALSEGMENTATOR_SDIST = f"totalsegmentator-{TOTALSEGMENTATOR_VERSION}.tar.gz"
TOTALSEGMENTATOR_SDIST_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
LICENCE = "Apache-2.0"
#: ``python -m`` these arguments ``--dest <folder>`` fetches the sdist.
PIP_ARGS = ("pip", "download", "--no-deps", "--no-binary", ":all:",
            f"totalsegmentator=={TOTALSEGMENTATOR_VERSION}")

_REF = f"totalsegmentator-{TOTALSEGMENTATOR_VERSION}/tests/reference_files"
_AORTA = f"{_REF}/aorta_report/test_result/models"
#: demo source -> folder under ``data/raw/demo/``
FOLDERS = {"torso_ct": "torso_ct", "torso_mr": "torso_mr", "torso_ct_dicom": "torso_ct_dicom"}
SOURCES = tuple(FOLDERS)


class DemoDataError(RuntimeError):
    """The sdist cannot be fetched or is not the pinned one; the message says what to run."""


def default_cache_dir() -> Path:
    """``<repository>/.cache/sdist``: see the module docstring for why there."""
    return REPO_ROOT / ".cache" / "sdist"


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path) -> Path:
    got = sha256(path)
    if got != TOTALSEGMENTATOR_SDIST_SHA256:
        raise DemoDataError(f"{path}: SHA-256 {got} is not the pinned "
                            f"{TOTALSEGMENTATOR_SDIST_SHA256} of {TOTALSEGMENTATOR_SDIST}; "
                            "delete the file and run again")
    return path


def fetch_sdist(cache_dir: str | os.PathLike | None = None, timeout_s: float = 900.0) -> Path:
    """The pinned ``totalsegmentator`` sdist, downloaded with pip on first use and verified.

    Parameters
    ----------
    cache_dir : where the sdist is kept (default :func:`default_cache_dir`).
    timeout_s : give up on pip after this many seconds.

    Returns
    -------
    Path of ``totalsegmentator-<version>.tar.gz`` whose SHA-256 matches the pin.

    Raises
    ------
    DemoDataError
        When pip cannot fetch it (the message names the command to run by hand) or the file
        is not the pinned one.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / TOTALSEGMENTATOR_SDIST
    if target.is_file():
        return _verify(target)
    cache.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", *PIP_ARGS, "--dest"]
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        try:
            done = subprocess.run([*command, tmp], capture_output=True, text=True,
                                  timeout=timeout_s, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise DemoDataError(_fetch_help(cache, f"{type(err).__name__}: {err}")) from err
        got = Path(tmp) / TOTALSEGMENTATOR_SDIST
        if done.returncode != 0 or not got.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise DemoDataError(_fetch_help(cache, " / ".join(tail) or f"exit {done.returncode}"))
        _verify(got)
        os.replace(got, target)  # same folder: atomic, so a half download is never cached
    return target


def _fetch_help(cache: Path, why: str) -> str:
    return (f"could not download {TOTALSEGMENTATOR_SDIST} from the package registry ({why}). "
            f"The demo's real CT and MR cases come from it. With network access run\n"
            f"    python -m {' '.join(PIP_ARGS)} --dest {cache}\n"
            f"or copy the file (SHA-256 {TOTALSEGMENTATOR_SDIST_SHA256}) there, or leave the "
            f"sources {list(SOURCES)} out of the profile's [volumes] sources.")


# ---- laying the cases out ---------------------------------------------------------------

def class_names(task: str) -> dict[int, str]:
    """TotalSegmentator's class map of ``task`` (``total``, ``total_mr``): value -> name."""
    from totalsegmentator.map_to_binary import class_map

    return {int(k): str(v) for k, v in class_map[task].items()}


def _write_label_table(names: dict[int, str], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["index", "name"])
        writer.writerows(sorted(names.items()))


def _extract(tar: tarfile.TarFile, member: str, dest: Path) -> None:
    """Copy one member of the sdist to ``dest`` (a regular file only)."""
    info = tar.getmember(member)
    if not info.isfile():
        raise DemoDataError(f"{member}: not a regular file in {TOTALSEGMENTATOR_SDIST}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tar.extractfile(info) as src, dest.open("wb") as out:
        shutil.copyfileobj(src, out)


def write_cases(source: str, folder: str | os.PathLike, sdist: str | os.PathLike) -> Path:
    """Lay out the cases of one demo source (``torso_ct``, ``torso_mr``, ``torso_ct_dicom``)
    from the sdist under ``folder`` (one sub-folder per case); returns ``folder``."""
    if source not in FOLDERS:
        raise ValueError(f"unknown demo source {source!r}; known: {list(SOURCES)}")
    root = Path(folder)
    with tarfile.open(sdist, "r:gz") as tar:
        members = set(tar.getnames())
        if source == "torso_ct":
            total = set(class_names("total").values())
            case = root / "abdomen_3mm"
            _extract(tar, f"{_REF}/example_ct_sm.nii.gz", case / "ct.nii.gz")
            for name in sorted(total):
                member = f"{_REF}/example_seg_fast/{name}.nii.gz"
                if member in members:
                    _extract(tar, member, case / "segmentations" / f"{name}.nii.gz")
            case = root / "aorta_1p5mm"
            _extract(tar, f"{_AORTA}/ct_cropped.nii.gz", case / "ct.nii.gz")
            for name in sorted(total):  # the aorta report's other masks are other tasks' classes
                member = f"{_AORTA}/{name}.nii.gz"
                if member in members:
                    _extract(tar, member, case / "segmentations" / f"{name}.nii.gz")
        elif source == "torso_mr":
            case = root / "abdomen"
            _extract(tar, f"{_REF}/example_mr_sm.nii.gz", case / "image.nii.gz")
            _extract(tar, f"{_REF}/example_seg_mr.nii.gz", case / "labels.nii.gz")
            _write_label_table(class_names("total_mr"), case / "labels.csv")
        else:
            case = root / "abdomen"
            prefix = f"{_REF}/example_ct_dicom/"
            series = sorted(m for m in members if m.startswith(prefix) and m != prefix)
            if not series:
                raise DemoDataError(f"{sdist}: no DICOM files under {prefix}")
            for member in series:
                _extract(tar, member, case / "image" / Path(member).name)
            _extract(tar, f"{_REF}/example_seg_dicom.nii.gz", case / "labels.nii.gz")
            _write_label_table(class_names("total"), case / "labels.csv")
    return root
