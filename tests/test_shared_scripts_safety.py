"""evaluate.py and interpolate.py import only the project's model scripts, or one the user names (--script);
the test fixture finds the FID Inception weights as a user's machine can, and the run says why it skipped."""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import conftest
from conftest import REPO, run_script

sys.path.insert(0, str(REPO))
import evaluate  # noqa: E402
import test_evaluate  # noqa: E402


def marker_module(folder, name):
    """folder/name.py, which leaves folder/name.ran behind when it is imported."""
    (folder / f"{name}.py").write_text(f"open({str(folder / (name + '.ran'))!r}, 'w').close()\n")
    return folder / f"{name}.ran"


@pytest.mark.parametrize("script", ["evaluate.py", "interpolate.py"])
def test_a_checkpoint_never_chooses_the_module_imported(script, tmp_path):
    marker = marker_module(tmp_path, "sideeffect")
    torch.save({"script": "sideeffect", "format": 2, "config": {}, "models": {}}, tmp_path / "ckpt.pt")
    proc = run_script(script, "--ckpt", tmp_path / "ckpt.pt", "--device", "cpu", env={"PYTHONPATH": str(tmp_path)},
                      check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert "names the script 'sideeffect', not one of this project's" in lines[0] and "--script PATH" in lines[0]
    assert not marker.exists()


def test_project_scripts_come_from_their_files_and_others_only_when_named(tmp_path, monkeypatch):
    marker = marker_module(tmp_path, "dcgan")  # a dcgan.py that comes first on sys.path
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "dcgan", None)  # whatever this test imports as dcgan goes after it
    del sys.modules["dcgan"]
    module = evaluate.import_script("dcgan")
    assert Path(module.__file__) == REPO / "dcgan.py" and not marker.exists()
    assert evaluate.import_script("dcgan") is module  # imported once
    for name in ("../dcgan", "this", "os", "dcgan.py", None, ["dcgan"]):  # "this" prints the Zen of Python
        with pytest.raises(ValueError, match="not one of this project's"):
            evaluate.import_script(name)
    mine = marker_module(tmp_path, "my_model")
    assert Path(evaluate.import_script("anything", tmp_path / "my_model.py").__file__) == tmp_path / "my_model.py"
    assert mine.exists()  # the user named it: it runs
    (tmp_path / "broken.py").write_text("def f(:\n")
    with pytest.raises(ImportError, match="broken.py .SyntaxError"):
        evaluate.import_script("broken", tmp_path / "broken.py")
    with pytest.raises(FileNotFoundError, match="no model script"):
        evaluate.import_script("dcgan", tmp_path / "missing.py")


# --- the FID Inception weights on a user's machine -----------------------------------------


def test_the_fixture_downloads_first_then_rebuilds_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache
    tried = []
    monkeypatch.setattr(test_evaluate, "build_inception_weights", lambda tmp: tried.append("offline") or False)

    def download(url, dst):
        tried.append(url)
        dst.parent.mkdir(parents=True)
        dst.write_bytes(b"weights")

    monkeypatch.setattr(evaluate, "download", download)
    path, why_not = test_evaluate.fetch_inception_weights(tmp_path)
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    assert tried == [evaluate.INCEPTION_URL] and path == hub / evaluate.INCEPTION_FILE and why_not is None

    path.unlink()  # offline, without the developers' tool: skipped, saying what was tried
    tried.clear()
    monkeypatch.setattr(evaluate, "INCEPTION_URL", "http://127.0.0.1:9/" + evaluate.INCEPTION_FILE)
    def refused(url, dst):
        tried.append(url)
        raise OSError("refused")

    monkeypatch.setattr(evaluate, "download", refused)
    path, why_not = test_evaluate.fetch_inception_weights(tmp_path)
    assert path is None and tried == [evaluate.INCEPTION_URL, "offline"]
    assert why_not.startswith(conftest.INCEPTION_SKIP) and evaluate.INCEPTION_FILE in why_not and str(hub) in why_not
    assert "make_fid_inception.py" in why_not and "\n" not in why_not


def test_the_run_ends_with_one_line_when_inception_tests_were_skipped():
    lines = []
    reporter = SimpleNamespace(stats={}, write_line=lines.append)
    conftest.pytest_terminal_summary(reporter)
    reason = f"Skipped: {conftest.INCEPTION_SKIP}: weights file x.pth is not in /hub; put it there"
    reporter.stats["skipped"] = [SimpleNamespace(longrepr=("t.py", 1, reason)) for _ in range(3)]
    reporter.stats["skipped"].append(SimpleNamespace(longrepr=("t.py", 2, "Skipped: something else")))
    conftest.pytest_terminal_summary(reporter)
    assert lines == [f"3 tests skipped, {conftest.INCEPTION_SKIP}: weights file x.pth is not in /hub; put it there"]
