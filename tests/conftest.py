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


INCEPTION_SKIP = "no FID Inception weights"  # how the reason of a test skipped for want of them starts


def pytest_terminal_summary(terminalreporter):
    """One line at the end of the run when tests were skipped for want of the FID Inception weights, and why:
    pytest -q alone says only how many were skipped."""
    reasons = [report.longrepr[2] for report in terminalreporter.stats.get("skipped", [])
               if isinstance(report.longrepr, tuple) and INCEPTION_SKIP in report.longrepr[2]]
    if reasons:
        reason = reasons[0].split(INCEPTION_SKIP, 1)[1]
        terminalreporter.write_line(f"{len(reasons)} tests skipped, {INCEPTION_SKIP}{reason}")
