"""Shared test helpers: the repository root and running a script as a user would."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run_script(*args, cwd=REPO, env=None, timeout=300, check=True):
    """Run `python <args>` in a subprocess; return the CompletedProcess (stdout/stderr as text)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc



DDP_STATE_PROBE = """
import os, sys, torch
sys.path.insert(0, {repo!r})
import {script} as script
states, rank = [], int(os.environ.get("RANK", 0))
original_restore = script.restore
script.restore = lambda ckpt, config, state, *a: states.append(state) or original_restore(ckpt, config, state, *a)
script.main(sys.argv[1:])
torch.save({{group: {{name: obj.state_dict() for name, obj in objects.items()}} for group, objects in states[0].items()}},
           sys.argv[sys.argv.index("--out_dir") + 1] + f"/state_rank{{rank}}.pt")
"""  # a model script under torchrun that saves what each rank trained: weights, EMA, optimizer state


def flat_state(state):
    """name -> tensor for every weight, EMA weight and optimizer-state tensor of a {group: {name: state_dict}}, except
    batch-norm statistics (each rank keeps its own)."""
    flat = {}
    for group, objects in state.items():
        for name, sd in objects.items():
            items = sd.items() if group != "optimizers" else ((f"{i}.{k}", v) for i, s in sd["state"].items()
                                                               for k, v in s.items())
            flat.update({f"{group}.{name}.{k}": v for k, v in items
                         if torch.is_tensor(v) and "running" not in k and "num_batches" not in k})
    return flat

def one_process_state(monkeypatch, module, train):
    """flat_state of what train() (module.main in this process) trained, recorded as DDP_STATE_PROBE records a rank's."""
    states, original_restore = [], module.restore
    monkeypatch.setattr(module, "restore", lambda ckpt, config, state, *a: states.append(state)
                        or original_restore(ckpt, config, state, *a))
    train()
    return flat_state({group: {name: obj.state_dict() for name, obj in objects.items()}
                       for group, objects in states[0].items()})

def make_tiny_mnist(root):
    """root/data holding 256 train and 64 test images of the embedded MNIST sample, every class present
    (the arrays are sorted by class, so take every 15th image rather than the first n) -> root/data."""
    import numpy as np
    src, dst = REPO / "data" / "mnist5k", root / "data" / "mnist5k"
    dst.mkdir(parents=True)
    for split, n in (("train", 256), ("test", 64)):
        for suffix in ("", "_labels"):
            np.save(dst / f"{split}{suffix}.npy", np.load(src / f"{split}{suffix}.npy")[::15][:n])
    return root / "data"


@pytest.fixture
def tiny_mnist(tmp_path):
    return make_tiny_mnist(tmp_path)


@pytest.fixture(scope="module")
def one_thread():
    """In-process training with one thread, as run_script's subprocesses (OMP_NUM_THREADS=1): on a busy 2-core
    machine threads that wait on each other make each tiny step several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


INCEPTION_SKIP = "no FID Inception weights"  # how the reason of a test skipped for want of them starts


def pytest_terminal_summary(terminalreporter):
    """One line at the end of the run when tests were skipped for want of the FID Inception weights, and why:
    pytest -q alone says only how many were skipped."""
    reasons = [report.longrepr[2] for report in terminalreporter.stats.get("skipped", [])
               if isinstance(report.longrepr, tuple) and INCEPTION_SKIP in report.longrepr[2]]
    if reasons:
        reason = reasons[0].split(INCEPTION_SKIP, 1)[1]
        terminalreporter.write_line(f"{len(reasons)} tests skipped, {INCEPTION_SKIP}{reason}")
