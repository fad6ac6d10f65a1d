"""JupyterLab on this checkout with the project's kernel (what ``make lab`` calls).

The kernel is registered as ``mis-ground`` ("MIS-Ground (mislib)"), the kernel every
numbered notebook names in its metadata, in a folder of this checkout
(``build/jupyter/share/jupyter/kernels/``) rather than in the user's or the environment's
Jupyter folders: its Python is the interpreter that registered it and its ``PYTHONPATH`` is
this checkout, so a notebook opened in the Lab imports ``mislib`` from the files next to it
even when the environment is shared with another checkout. ``JUPYTER_PATH`` points the
server at that folder.

Pairing with the jupytext scripts works from the Lab UI through jupytext's server extension
(installed with the ``jupytext`` package): it reads ``notebooks/jupytext.toml``, so saving
``NN_name.ipynb`` also writes ``NN_name.py`` and opening either file shows the notebook.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from mislib.paths import project_paths

KERNEL_NAME = "mis-ground"
KERNEL_DISPLAY_NAME = "MIS-Ground (mislib)"


def jupyter_prefix(root: str | os.PathLike | None = None) -> Path:
    """The checkout's Jupyter prefix, ``build/jupyter`` (its ``share/jupyter`` holds kernels)."""
    return project_paths(root).build / "jupyter"


def install_kernel(root: str | os.PathLike | None = None) -> Path:
    """Register the project's kernel for this checkout; return the kernel's folder.

    Uses ipykernel's own installer (``python -m ipykernel install --prefix``) with the
    running interpreter, and ``PYTHONPATH`` set to the checkout so that ``import mislib``
    in the kernel is this checkout's package. Re-running it replaces the spec.
    """
    from ipykernel.kernelspec import install

    paths = project_paths(root)
    where = install(kernel_name=KERNEL_NAME, display_name=KERNEL_DISPLAY_NAME,
                    prefix=str(jupyter_prefix(root)), env={"PYTHONPATH": str(paths.root)})
    return Path(where)


def lab_environment(root: str | os.PathLike | None = None,
                    base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) with the checkout's kernels first on ``JUPYTER_PATH``."""
    env = dict(os.environ if base is None else base)
    share = str(jupyter_prefix(root) / "share" / "jupyter")
    env["JUPYTER_PATH"] = os.pathsep.join(p for p in (share, env.get("JUPYTER_PATH")) if p)
    return env


def lab_command(root: str | os.PathLike | None = None,
                extra: Sequence[str] = ()) -> list[str]:
    """The ``jupyter lab`` command line: served from the checkout, new notebooks on our kernel.

    As root (a container, CI) the server refuses to start without ``--allow-root``; it still
    listens on 127.0.0.1 only and asks for its token.
    """
    paths = project_paths(root)
    as_root = ["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    return [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={paths.root}",
            f"--MappingKernelManager.default_kernel_name={KERNEL_NAME}", *as_root, *extra]


def main_lab(extra: Sequence[str] = ()) -> int:
    """Register the kernel, then replace this process with JupyterLab (Ctrl-C stops it)."""
    where = install_kernel()
    print(f"kernel {KERNEL_NAME!r} ({KERNEL_DISPLAY_NAME}) registered in {where}", flush=True)
    cmd = lab_command(extra=extra)
    os.execve(cmd[0], cmd, lab_environment())
    return 0  # not reached
