"""Shared test helpers: the repository root and running a script as a user would."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_script(*args, cwd=REPO, env=None, timeout=300, check=True):
    """Run `python <args>` in a subprocess; return the CompletedProcess (stdout/stderr as text)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def tiny_mnist(tmp_path):
    """A data_dir holding 256 train and 64 test images of the embedded MNIST sample, every class present
    (the arrays are sorted by class, so take every 15th image rather than the first n)."""
    import numpy as np
    src = REPO / "data" / "mnist5k"
    dst = tmp_path / "data" / "mnist5k"
    dst.mkdir(parents=True)
    for split, n in (("train", 256), ("test", 64)):
        np.save(dst / f"{split}.npy", np.load(src / f"{split}.npy")[::15][:n])
        np.save(dst / f"{split}_labels.npy", np.load(src / f"{split}_labels.npy")[::15][:n])
    return tmp_path / "data"
