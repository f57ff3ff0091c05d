import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import REPO, run_script

sys.path.insert(0, str(REPO))
import cgan  # noqa: E402

TINY = ["--ngf", "8", "--ndf", "8", "--nz", "16", "--batch_size", "16", "--device", "cpu"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """In-process training with one thread, as run_script's subprocesses (OMP_NUM_THREADS=1): on a busy 2-core
    machine two spinning threads per process make each step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(**kw):
    base = dict(model="acgan", nz=16, ngf=16, ndf=16, channels=1, img_size=32, n_classes=10,
                cat_codes=1, cat_dim=10, cont_codes=2, lambda_cat=1.0, lambda_cont=1.0)
    return {**base, **kw}


def train(*argv):
    """Run cgan.py's main in this process (faster than a subprocess; the subprocess tests below cover the command line)."""
    cgan.main([str(a) for a in argv])


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def digits(tmp_path):
    """Every digit class of the embedded sample, 25 per class in train and 10 in test (the sample is sorted by class)."""
    src, dst = REPO / "data" / "mnist5k", tmp_path / "data" / "mnist5k"
    dst.mkdir(parents=True)
    for split, n in (("train", 250), ("test", 100)):
        images, labels = np.load(src / f"{split}.npy"), np.load(src / f"{split}_labels.npy")
        idx = np.linspace(0, len(images) - 1, n).astype(int)
        np.save(dst / f"{split}.npy", images[idx])
        np.save(dst / f"{split}_labels.npy", labels[idx])
    assert np.bincount(labels[idx]).min() >= 9
    return tmp_path / "data"


# --- architecture --------------------------------------------------------------------------


@pytest.mark.parametrize("img_size", [32, 64])
def test_acgan_shapes_and_class_input(img_size):
    models = cgan.build_models(config(img_size=img_size, channels=3))
    G, D = models["G"], models["D"]
    assert G.net[0].in_channels == 16 + 10  # noise ++ one-hot class (seed 002: 100 + 1 attribute)
    z, labels = torch.randn(5, 16), torch.tensor([0, 3, 9, 3, 1])
    x = G(z, labels)
    assert x.shape == (5, 3, img_size, img_size) and x.min() >= -1 and x.max() <= 1
    source, classes = D(x)
    assert source.shape == (5,) and classes.shape == (5, 10)
    G.eval()  # the class changes the image, the noise being the same
    assert not torch.allclose(G(z, labels), G(z, (labels + 1) % 10))
    # the conv body is dcgan.py's: 32x32 -> 16 -> 32 -> 64 channels at 4x4, then one 4x4 conv per head
    assert [m.out_channels for m in D.body if isinstance(m, nn.Conv2d)] == [16 * 2 ** i for i in range(int(np.log2(img_size)) - 2)]
    assert not isinstance(D.body[1], nn.BatchNorm2d)


def test_infogan_shapes_layout_and_latent():
    cfg = config(model="infogan", n_classes=0, nz=62, cat_codes=2, cat_dim=10, cont_codes=2)
    models = cgan.build_models(cfg)
    assert models["G"].net[0].in_channels == 62 + 2 * 10 + 2
    layout = cgan.latent_layout(cfg)
    assert [(p["name"], p["kind"], p["start"], p["size"]) for p in layout] == [
        ("noise", "noise", 0, 62), ("cat0", "categorical", 62, 10), ("cat1", "categorical", 72, 10),
        ("cont0", "continuous", 82, 1), ("cont1", "continuous", 83, 1)]
    z = cgan.sample_latent(cfg, 500, "cpu", torch.Generator().manual_seed(0))
    assert z.shape == (500, 84)
    onehots = z[:, 62:82].view(500, 2, 10)
    assert torch.equal(onehots.sum(-1), torch.ones(500, 2)) and set(onehots.unique().tolist()) == {0.0, 1.0}
    assert onehots.sum((0, 1)).min() > 50  # every category drawn
    cont = z[:, 82:]
    assert cont.min() >= -1 and cont.max() <= 1 and cont.std() > 0.5
    noise, cat, c = cgan.split_codes(z, cfg)
    assert torch.equal(noise, z[:, :62]) and torch.equal(cat, onehots.argmax(-1)) and torch.equal(c, cont)
    source, q = models["D"](models["G"](z[:4]))
    assert source.shape == (4,) and q.shape == (4, 22)  # Q: 2 x 10 logits + 2 means
    assert cgan.latent_layout(config()) == [{"name": "noise", "kind": "noise", "start": 0, "size": 16}]


# --- losses --------------------------------------------------------------------------------


def test_acgan_losses_match_their_formulas():
    torch.manual_seed(0)
    r, f = torch.randn(6), torch.randn(6)
    rc, fc = torch.randn(6, 10), torch.randn(6, 10)
    yr, yf = torch.randint(0, 10, (6,)), torch.randint(0, 10, (6,))
    log_p = lambda logits, y: torch.log(torch.softmax(logits, 1)[torch.arange(6), y])  # noqa: E731
    L_S_D = torch.log(torch.sigmoid(r)).mean() + torch.log(1 - torch.sigmoid(f)).mean()
    L_C = log_p(rc, yr).mean() + log_p(fc, yf).mean()
    assert torch.allclose(cgan.acgan_discriminator_loss(r, f, rc, fc, yr, yf), -(L_S_D + L_C))
    expected_G = -torch.log(torch.sigmoid(f)).mean() - log_p(fc, yf).mean()
    assert torch.allclose(cgan.acgan_generator_loss(f, fc, yf), expected_G)
    # a binary attribute: the 2-way softmax is the sigmoid cross-entropy of seed 002 on the logit difference
    two = torch.randn(6, 2)
    y = torch.randint(0, 2, (6,))
    bce = F.binary_cross_entropy_with_logits(two[:, 1] - two[:, 0], y.float())
    assert torch.allclose(F.cross_entropy(two, y), bce)


def test_info_loss_is_the_negative_lower_bound():
    cfg = config(model="infogan", n_classes=0, cat_codes=2, cat_dim=3, cont_codes=2, lambda_cat=1.0, lambda_cont=0.5)
    z = cgan.sample_latent(cfg, 8, "cpu", torch.Generator().manual_seed(1))
    q = torch.randn(8, 2 * 3 + 2)
    _, cat, cont = cgan.split_codes(z, cfg)
    ce = -sum(torch.log_softmax(q[:, 3 * k:3 * k + 3], 1)[torch.arange(8), cat[:, k]] for k in range(2)).mean()
    gauss = 0.5 * ((cont - q[:, 6:]) ** 2).sum(1).mean()
    assert torch.allclose(cgan.info_loss(q, z, cfg), ce + 0.5 * gauss)
    # Q that is sure of the right category: the categorical term vanishes, accuracy is 1
    perfect = torch.cat([z[:, 16:22] * 50, cont], 1)
    assert cgan.info_loss(perfect, z, cfg) < 1e-6 and cgan.code_accuracy(perfect, z, cfg) == 1


# --- data ----------------------------------------------------------------------------------


def test_attribute_labels_pick_one_column(tmp_path):
    names = ["Bald", "Smiling", "Young"]
    labels = torch.tensor([[0, 1, 1], [1, 0, 1], [0, 0, 0]])
    folder = tmp_path / "celeba"
    folder.mkdir()
    (folder / "attr_names.json").write_text(json.dumps(names))
    y, class_names = cgan.class_labels(str(tmp_path), "celeba", labels, "Smiling")
    assert y.tolist() == [1, 0, 0] and class_names == ["not Smiling", "Smiling"]
    with pytest.raises(ValueError, match="--attr"):
        cgan.class_labels(str(tmp_path), "celeba", labels, None)
    with pytest.raises(ValueError, match="Bald, Smiling, Young"):
        cgan.class_labels(str(tmp_path), "celeba", labels, "Smile")
    y, class_names = cgan.class_labels(str(tmp_path), "mnist5k", torch.tensor([3, 0, 9]), None)
    assert y.tolist() == [3, 0, 9] and class_names == [str(c) for c in range(10)]


# --- training runs -------------------------------------------------------------------------


def test_acgan_run_writes_every_output(digits, tmp_path):
    out = tmp_path / "run"
    train("--data_dir", digits, "--out_dir", out, "--max_iters", "4", "--log_interval", "2",
          "--sample_interval", "2", "--ckpt_interval", "2", *TINY)
    for name in ("ckpt.pt", "log.jsonl", "curves.png", "config.json", "samples/step_000002.png", "samples/step_000004.png"):
        assert (out / name).exists(), name
    rows = read_log(out)
    assert [r["step"] for r in rows] == [2, 4]
    assert {"loss_D", "loss_G", "D_x", "D_G_z1", "D_G_z2", "acc_real", "acc_fake", "ms_per_step", "images_per_s"} <= set(rows[0])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    cfg = ckpt["config"]
    assert ckpt["script"] == "cgan" and ckpt["step"] == 4
    assert cfg["n_classes"] == 10 and cfg["class_names"] == [str(c) for c in range(10)] and cfg["channels"] == 1
    models = cgan.load_models(ckpt, "cpu")
    z = cgan.sample_latent(cfg, 4, "cpu")
    images = cgan.generate(models, z, torch.tensor([0, 1, 2, 3]))
    assert images.shape == (4, 1, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(cgan.generate(models, z), images)  # no labels: classes 0, 1, 2, ... in turn
    real, labels = cgan.real_images(cfg, "test")
    assert real.shape == (100, 1, 32, 32) and labels.shape == (100,)
    from PIL import Image
    assert Image.open(out / "samples/step_000004.png").size == (6 * 34 + 2, 6 * 34 + 2)


def test_auxiliary_losses_teach_the_heads(digits, tmp_path):
    """ACGAN: D's class head learns the real digits and G's fakes become classifiable as the requested class.
    InfoGAN: Q learns to recover the categorical code G was given."""
    out = tmp_path / "acgan"
    train("--data_dir", digits, "--out_dir", out, "--max_iters", "40", "--log_interval", "10", "--lr", "1e-3", *TINY)
    rows = read_log(out)
    assert rows[-1]["acc_real"] > 0.6 and rows[-1]["acc_real"] > rows[0]["acc_real"] + 0.2, rows
    assert rows[-1]["acc_fake"] > 0.6 and rows[-1]["acc_fake"] > rows[0]["acc_fake"] + 0.2, rows
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    D = cgan.load_models(ckpt, "cpu")["D"]
    images, labels = cgan.real_images(ckpt["config"], "test")  # digits D never saw
    with torch.no_grad():
        accuracy = (D(cgan.to_unit_range(images))[1].argmax(1) == labels).float().mean()
    assert accuracy > 0.4  # chance is 0.1

    out = tmp_path / "infogan"
    train("--model", "infogan", "--data_dir", digits, "--out_dir", out, "--max_iters", "50", "--log_interval", "10",
          "--lr", "1e-3", *TINY)
    rows = read_log(out)
    assert rows[-1]["acc_code"] > 0.4 and rows[-1]["loss_info"] < rows[0]["loss_info"] - 0.3, rows  # chance: 0.1


def test_sigkill_then_resume_gives_identical_losses(digits, tmp_path):
    common = ["--data_dir", digits, "--log_interval", "1", "--ckpt_interval", "10", "--sample_interval", "1000", *TINY]
    straight = tmp_path / "straight"
    run_script("cgan.py", "--out_dir", straight, "--max_iters", "30", *common)
    expected = {r["step"]: (r["loss_D"], r["loss_G"], r["acc_fake"]) for r in read_log(straight)}

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "cgan.py", "--out_dir", killed, "--max_iters", "100000", *map(str, common)],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (killed / "ckpt.pt").exists() and (killed / "log.jsonl").exists() and len(read_log(killed)) >= 15:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved_step = torch.load(killed / "ckpt.pt", weights_only=True)["step"]
    assert saved_step >= 10 and saved_step % 10 == 0

    run_script("cgan.py", "--out_dir", killed, "--max_iters", "30", "--resume", *common)
    rows = read_log(killed)
    assert [r["step"] for r in rows] == list(range(1, 31))
    for r in rows:
        assert (r["loss_D"], r["loss_G"], r["acc_fake"]) == expected[r["step"]], r["step"]


def test_torchrun_two_processes_infogan(digits, tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29643",
                           "cgan.py", "--model", "infogan", "--data_dir", str(digits), "--out_dir", str(out),
                           "--max_iters", "3", "--log_interval", "1", *TINY],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["config"]["n_classes"] == 0
    assert not any(k.startswith("module.") for k in ckpt["models"]["D"])
    assert len(read_log(out)) == 3


# --- bad input -----------------------------------------------------------------------------


def one_error_line(proc):  # the same for a subprocess
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode != 0
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_missing_dataset_names_prepare_command(tmp_path):
    proc = run_script("cgan.py", "--data_dir", tmp_path, "--dataset", "celeba", "--attr", "Smiling", "--out_dir", tmp_path / "o", check=False)
    assert "python " in one_error_line(proc) and "celeba/prepare.py" in proc.stderr


def error_line(capsys, *argv):
    """cgan.main in this process: it must exit non-zero with exactly one line on stderr."""
    with pytest.raises(SystemExit) as e:
        train(*argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code != 0 and len(lines) == 1, lines
    return lines[0]


def test_bad_settings_one_line_each(digits, tmp_path, capsys):
    assert "--img_size 48" in error_line(capsys, "--data_dir", digits, "--img_size", "48", "--out_dir", tmp_path / "o")
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(digits, unlabelled)
    (unlabelled / "mnist5k" / "train_labels.npy").unlink()
    assert "--model infogan" in error_line(capsys, "--data_dir", unlabelled, "--out_dir", tmp_path / "o")
    assert "--attr Smiling" in error_line(capsys, "--data_dir", digits, "--attr", "Smiling", "--out_dir", tmp_path / "o")
    assert "without labels" in error_line(capsys, "--model", "infogan", "--attr", "Smiling", "--data_dir", digits, "--out_dir", tmp_path / "o")


def test_corrupt_checkpoint_and_nan_keep_what_was_saved(digits, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"not a checkpoint at all")
    common = ["--data_dir", digits, "--out_dir", out, "--ckpt_interval", "2", "--log_interval", "2", *TINY]
    assert "cannot read checkpoint" in error_line(capsys, "--resume", *common)
    assert (out / "ckpt.pt").read_bytes() == b"not a checkpoint at all"

    train("--max_iters", "2", *common)
    good = (out / "ckpt.pt").read_bytes()
    assert "non-finite loss" in error_line(capsys, "--max_iters", "20", "--resume", "--lr", "1e30", *common)
    assert (out / "ckpt.pt").read_bytes() == good


def test_copied_alone_into_an_empty_folder_runs(digits, tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(REPO / "cgan.py", alone)
    shutil.copytree(digits, alone / "data")
    run_script("cgan.py", "--model", "infogan", "--max_iters", "2", *TINY, cwd=alone)
    assert (alone / "out" / "cgan" / "ckpt.pt").exists()
