"""evaluate.py and interpolate.py on what users hand them: unlabelled images among labelled ones, sets too small
to measure, data moved or damaged, and any value of every number flag. Each ends in a normal run or in one line
on stderr and a non-zero exit, never a traceback or a NaN printed as a result."""
import importlib
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO

sys.path.insert(0, str(REPO))
import evaluate  # noqa: E402
import interpolate  # noqa: E402

TINY = {  # script, flags: two training steps of tiny networks
    "dcgan": ("dcgan", ["--nz", "8", "--ngf", "8", "--ndf", "8", "--batch_size", "16"]),
    "vae": ("vae", ["--arch", "mlp", "--hidden", "32", "--latent_dim", "6", "--batch_size", "16"]),
    "acgan": ("cgan", ["--nz", "8", "--ngf", "8", "--ndf", "8", "--batch_size", "16"]),
    "infogan": ("cgan", ["--model", "infogan", "--nz", "8", "--ngf", "8", "--ndf", "8", "--batch_size", "16",
                         "--cont_codes", "2"]),
}


class PixelFeatures(torch.nn.Module):
    """Stands in for the FID Inception, whose forward pass these tests do not need: 4x4 average pools."""
    has_classifier, weights_sha = False, "pixel-features"

    def forward(self, images):
        features = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)
        return features, features


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as run_script's subprocesses: on a busy 2-core machine threads wait on each other
    yield
    torch.set_num_threads(threads)


def make_data(root, unlabelled=False):
    """A data_dir as conftest's tiny_mnist (256 train, 64 test images, every class); `unlabelled`: every other
    training image and 4 test images labelled -1, as STL-10's train+unlabeled."""
    dst = root / "mnist5k"
    dst.mkdir(parents=True)
    for split, n in (("train", 256), ("test", 64)):
        labels = np.load(REPO / "data" / "mnist5k" / f"{split}_labels.npy")[::15][:n].copy()
        if unlabelled:
            labels[::2 if split == "train" else 16] = -1
        np.save(dst / f"{split}.npy", np.load(REPO / "data" / "mnist5k" / f"{split}.npy")[::15][:n])
        np.save(dst / f"{split}_labels.npy", labels)
    return root


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("shared_scripts")
    data = {False: make_data(root / "data"), True: make_data(root / "unlabelled", unlabelled=True)}
    paths = {"data": data[False], "unlabelled_data": data[True], "cache": root / "cache"}
    for name, (script, flags) in TINY.items():
        for unlabelled in (False, True) if name == "acgan" else (False,):
            out = root / (name + "_unlabelled" * unlabelled)
            importlib.import_module(script).main(["--data_dir", str(data[unlabelled]), "--out_dir", str(out),
                                                  "--max_iters", "2", "--device", "cpu", "--sample_interval", "1000",
                                                  *flags])
            paths[out.name] = out / "ckpt.pt"
    return paths


@pytest.fixture
def no_inception(monkeypatch):
    monkeypatch.setattr(evaluate, "load_inception", lambda path, device: PixelFeatures())


def run(main, argv, capsys):
    """(exit code, stderr lines, stdout) of main(argv) as the command line runs it; an exception that escapes
    fails the test, as a traceback would."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, [line for line in err.splitlines() if line.strip()], out


def error(main, argv, capsys):
    """The one line that main(argv) ends with."""
    code, err, _ = run(main, argv, capsys)
    prog = "evaluate.py" if main is evaluate.main else "interpolate.py"
    assert code not in (0, None) and len(err) == 1 and err[0].startswith(f"{prog}: error: "), (argv, code, err)
    return err[0]


# --- ACGAN on partly unlabelled data ---------------------------------------------------------


def test_class_rows_of_a_model_trained_with_unlabelled_images(ckpts, tmp_path, capsys, monkeypatch, one_thread):
    trained_on = []
    load = evaluate.load_label_classifier
    monkeypatch.setattr(evaluate, "load_label_classifier", lambda train, test, *a: trained_on.append((train, test))
                        or load(train, test, *a))
    report = tmp_path / "report.json"
    code, err, out = run(evaluate.main, ["--ckpt", ckpts["acgan_unlabelled"], "--metrics", "classes", "--n", 30,
                                         "--device", "cpu", "--cache_dir", ckpts["cache"], "--json", report], capsys)
    assert code == 0, err
    (train, train_labels), (test, test_labels) = trained_on[0]
    assert len(train) == len(train_labels) == 128 and len(test) == len(test_labels) == 60  # the labelled ones
    assert train_labels.min() >= 0 and test_labels.min() >= 0
    metrics, notes = (json.loads(report.read_text())[k] for k in ("metrics", "notes"))
    assert 0 <= metrics["classifier_accuracy"] <= 1 and "60 labelled test images" in notes["classifier_accuracy"]
    assert sum(metrics["class_histogram"]) == 30 and len(metrics["class_histogram"]) == 10
    assert 0 <= metrics["class_tv"] <= 1 and 0 <= metrics["class_agreement"] <= 1
    assert "not applicable" not in out


def test_class_ids_of_labels_with_unlabelled_images():
    assert evaluate.class_ids(torch.tensor([-1, 0, 3, -1])) == 4
    for labels in (torch.tensor([-1, -1]), torch.tensor([-2, 0]), torch.tensor([0.5, 1.0]), torch.zeros(3, 2).long(),
                   None):
        assert evaluate.class_ids(labels) is None


# --- degenerate counts ---------------------------------------------------------------------


def test_too_few_images_or_steps_end_with_one_line(ckpts, tmp_path, capsys, no_inception):
    one = tmp_path / "one"
    one.mkdir()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(one / "0.png")
    np.save(tmp_path / "one.npy", np.zeros((1, 28, 28, 1), np.uint8))
    two = tmp_path / "two.npy"
    np.save(two, np.random.default_rng(0).integers(0, 255, (2, 28, 28, 1), dtype=np.uint8))
    for argv, expected in [
        (["--real", tmp_path / "one.npy", "--fake", two], f"--real {tmp_path / 'one.npy'} holds 1 image;"),
        (["--real", one, "--fake", two], f"--real {one} holds 1 image;"),
        (["--real", one, "--save_stats", tmp_path / "one.npz"], "holds 1 image;"),
        (["--real", two, "--fake", one], f"--fake {one} holds 1 image;"),
        (["--ckpt", ckpts["dcgan"], "--n_real", 1, "--metrics", "fid"], "the test split (--n_real 1) holds 1 image;"),
        (["--ckpt", ckpts["dcgan"], "--n", 0], "--n must be at least 2"),
        (["--ckpt", ckpts["dcgan"], "--n", 1], "--n must be at least 2"),
    ]:
        assert expected in error(evaluate.main, argv, capsys), argv
    assert not (tmp_path / "one.npz").exists()
    code, err, out = run(evaluate.main, ["--real", two, "--fake", two, "--no_cache", "--json", tmp_path / "r.json"],
                         capsys)  # two images: the least
    values = [v for v in json.loads((tmp_path / "r.json").read_text())["metrics"].values() if isinstance(v, float)]
    assert code == 0 and values and np.isfinite(values).all(), (err, out)
    for argv, expected in [(["--steps", 0], "--steps must be at least 2"),
                           (["--pairs", 0], "--pairs must be at least 1")]:
        assert expected in error(interpolate.main, ["--ckpt", ckpts["dcgan"], *argv], capsys)


# --- moved or damaged data -----------------------------------------------------------------


def moved(ckpt, folder, data_dir):
    """ckpt with its config's data_dir changed, as when the data has moved since training."""
    state = torch.load(ckpt, weights_only=True)
    state["config"]["data_dir"] = str(data_dir)
    folder.mkdir(exist_ok=True)
    torch.save(state, folder / "ckpt.pt")
    return folder / "ckpt.pt"


def test_moved_data_names_the_data_dir_flag(ckpts, tmp_path, capsys, one_thread):
    gone = tmp_path / "was_here"
    gan, vae = moved(ckpts["dcgan"], tmp_path / "gan", gone), moved(ckpts["vae"], tmp_path / "vae", gone)
    line = error(evaluate.main, ["--ckpt", gan, "--metrics", "classes", "--n", 10, "--device", "cpu"], capsys)
    assert "--data_dir" in line and str(gone) in line and "prepare.py" in line
    for argv in (["--mode", "latents"], ["--mode", "pairs", "--endpoints", "test"]):
        line = error(interpolate.main, ["--ckpt", vae, "--device", "cpu", *argv], capsys)
        assert "--data_dir" in line and str(gone) in line
    given = ["--data_dir", ckpts["data"], "--device", "cpu"]
    assert run(evaluate.main, ["--ckpt", gan, "--metrics", "classes", "--n", 10, "--cache_dir", ckpts["cache"], *given],
               capsys)[0] == 0
    code, err, out = run(interpolate.main, ["--ckpt", vae, "--mode", "latents", "--projection", "pca", *given], capsys)
    assert code == 0 and out.split() == [str(tmp_path / "vae" / "interpolations" / "latents.png")], err


def test_damaged_data_is_named_in_one_line(ckpts, tmp_path, capsys, no_inception):
    data = tmp_path / "data"
    shutil.copytree(ckpts["data"], data)
    folder = data / "mnist5k"
    argv = ["--ckpt", ckpts["dcgan"], "--data_dir", data, "--metrics", "classes", "--n", 10, "--device", "cpu"]
    np.save(folder / "test_labels.npy", np.load(folder / "test_labels.npy")[:50])
    line = error(evaluate.main, argv, capsys)
    assert f"{folder / 'test_labels.npy'} has 50 labels for 64 images" in line and "prepare.py" in line
    (folder / "test.npy").write_bytes((folder / "test.npy").read_bytes()[:3000])  # cut off
    line = error(evaluate.main, argv, capsys)
    assert str(folder / "test.npy") in line and f"python {data / 'mnist5k' / 'prepare.py'}" in line
    (tmp_path / "a_file").write_text("")
    line = error(evaluate.main, [*argv[:3], tmp_path / "a_file", *argv[4:]], capsys)
    assert "a_file is a file, not the folder of the datasets" in line

    real = tmp_path / "real.npy"
    np.save(real, np.zeros((40, 28, 28, 3), np.uint8))
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (28, 28), dtype=np.uint8)).save(images / f"{i}.png")
    for name, content in (("cut.npy", real.read_bytes()[:2000]), ("empty.npy", b""), ("text.npy", b"not an array")):
        (tmp_path / name).write_bytes(content)
        line = error(evaluate.main, ["--real", tmp_path / name, "--fake", images, "--no_cache"], capsys)
        assert str(tmp_path / name) in line and "cannot read it as an .npy array" in line, line
    (images / "1.png").write_bytes((images / "1.png").read_bytes()[:400])  # a truncated PNG
    line = error(evaluate.main, ["--real", real, "--fake", images, "--no_cache"], capsys)
    assert str(images / "1.png") in line and "cannot read it as an image" in line


# --- every number flag: 0, -1 and a huge value -----------------------------------------------

EVALUATE_BASE = ["--n", 20, "--n_real", 20, "--bpd_k", 4, "--bpd_n", 4, "--bootstrap", 3, "--batch_size", 16]
EVALUATE_METRICS = {"n": "fid", "bootstrap": "fid,kid"}  # fid_std with 10^9 resamples would run for days
INTERPOLATE_BASE = ["--pairs", 2, "--steps", 3, "--n_noise", 2]


def number_flags(parser):
    return sorted(a.dest for a in parser._actions if a.type in (int, float))


def test_the_fuzz_covers_every_number_flag(monkeypatch):
    flags, original = {}, evaluate.OneLineParser.parse_args
    monkeypatch.setattr(evaluate.OneLineParser, "parse_args", lambda self, argv=None: flags.setdefault(
        self.prog, number_flags(self)) and original(self, argv))
    for module in (evaluate, interpolate):
        module.get_args(["--ckpt", "x"])
    assert flags == {"evaluate.py": sorted(["n", "class_id", "n_real", "bpd_k", "bpd_n", "bootstrap", "batch_size",
                                            "seed"]),
                     "interpolate.py": sorted(["pairs", "steps", "extrapolate", "range", "n_noise", "code_range",
                                               "seed"])}


@pytest.mark.parametrize("value", ["0", "-1", "huge"])
def test_every_number_flag_runs_or_ends_with_one_line(ckpts, value, tmp_path, capsys, monkeypatch, no_inception):
    real_sysconf = os.sysconf  # memory checks as on a machine of 16 GB, whatever this one has
    monkeypatch.setattr(os, "sysconf", lambda name: 2 ** 34 // 4096 if name == "SC_PHYS_PAGES" else real_sysconf(name))
    report = tmp_path / "report.json"
    base = ["--ckpt", ckpts["vae"], *EVALUATE_BASE, "--cache_dir", ckpts["cache"], "--json", report]
    cases = [(evaluate.main, base, flag, EVALUATE_METRICS.get(flag))
             for flag in ("n", "class", "n_real", "bpd_k", "bpd_n", "bootstrap", "batch_size", "seed")]
    cases += [(interpolate.main, ["--ckpt", ckpts["infogan"], *INTERPOLATE_BASE, "--out_dir", tmp_path], flag, None)
              for flag in ("pairs", "steps", "extrapolate", "range", "n_noise", "code_range", "seed")]
    outcomes = {}
    for main, base, flag, metrics in cases:
        number = {"huge": "1e9" if flag in ("range", "code_range") else "1000000000"}.get(value, value)
        argv = [*base, f"--{flag}", number, "--device", "cpu"] + (["--metrics", metrics] if metrics else [])
        code, err, out = run(main, argv, capsys)
        prog = "evaluate.py" if main is evaluate.main else "interpolate.py"
        if code in (0, None):
            assert not any("error" in line for line in err), (argv, err, out)
            if main is evaluate.main:  # no NaN reported: a number, or None with a note saying why
                values = [v for v in json.loads(report.read_text())["metrics"].values() if isinstance(v, float)]
                assert np.isfinite(values).all() and "nan" not in out.split(), (argv, out)
                report.unlink()
        else:
            assert len(err) == 1 and err[0].startswith(f"{prog}: error: ") and str(flag) in err[0], (argv, err)
        outcomes[prog, flag] = "ran" if code in (0, None) else "refused"
    refused = {key for key, outcome in outcomes.items() if outcome == "refused"}
    expected = {  # what must be refused; everything else runs (--class: the VAE has no classes)
        "0": {("evaluate.py", f) for f in ("n", "class", "n_real", "bpd_k", "bpd_n", "bootstrap", "batch_size")}
        | {("interpolate.py", f) for f in ("pairs", "steps", "n_noise")},
        "-1": {("evaluate.py", f) for f in ("n", "class", "n_real", "bpd_k", "bpd_n", "bootstrap", "batch_size", "seed")}
        | {("interpolate.py", f) for f in ("pairs", "steps", "extrapolate", "range", "n_noise", "code_range")},
        "huge": {("evaluate.py", "n"), ("evaluate.py", "class"), ("evaluate.py", "bpd_k")}
        | {("interpolate.py", f) for f in ("pairs", "steps", "extrapolate", "n_noise")},
    }[value]
    assert refused == expected
