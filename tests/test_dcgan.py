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

from conftest import REPO, run_script

sys.path.insert(0, str(REPO))
import dcgan  # noqa: E402

TINY = ["--nz", "8", "--ngf", "8", "--ndf", "8", "--batch_size", "16", "--device", "cpu"]


def config(**kw):
    base = dict(nz=16, ngf=16, ndf=16, channels=1, img_size=32, arch="conv", upsample="convtranspose")
    return {**base, **kw}


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


# --- architecture --------------------------------------------------------------------------


@pytest.mark.parametrize("img_size", [32, 64])
@pytest.mark.parametrize("upsample", ["convtranspose", "nearest", "bilinear"])
def test_generator_and_discriminator_shapes(img_size, upsample):
    models = dcgan.build_models(config(img_size=img_size, channels=3, upsample=upsample))
    z = torch.randn(5, 16)
    x = models["G"](z)
    assert x.shape == (5, 3, img_size, img_size)
    assert x.min() >= -1 and x.max() <= 1
    assert models["D"](x).shape == (5,)


def test_handout_layer_tables():
    # seed 000 Table 2 (64x64): 1024-512-256-128-3 with kernel 4, the first with padding 0
    G = dcgan.build_models(config(img_size=64, channels=3, ngf=128, nz=100))["G"]
    convs = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [m.out_channels for m in convs] == [1024, 512, 256, 128, 3]
    assert [m.padding[0] for m in convs] == [0, 1, 1, 1, 1]
    assert [m.stride[0] for m in convs] == [1, 2, 2, 2, 2]
    # seed 001 (32x32, hidden 16): 4h x 4 x 4, 2h x 8 x 8, h x 16 x 16, 1 x 32 x 32
    G = dcgan.build_models(config())["G"]
    shapes, x = [], torch.randn(2, 16, 1, 1)
    for layer in G.net:
        x = layer(x)
        if isinstance(layer, nn.ConvTranspose2d):
            shapes.append(tuple(x.shape[1:]))
    assert shapes == [(64, 4, 4), (32, 8, 8), (16, 16, 16), (1, 32, 32)]
    D = dcgan.build_models(config(img_size=64, channels=3, ndf=64))["D"]
    assert [m.out_channels for m in D.modules() if isinstance(m, nn.Conv2d)] == [64, 128, 256, 512, 1]
    assert not isinstance(D.net[1], nn.BatchNorm2d)  # no batch norm on the input layer


def test_mlp_architecture_and_init():
    models = dcgan.build_models(config(arch="mlp", img_size=28))
    assert models["G"](torch.randn(4, 16)).shape == (4, 1, 28, 28)
    assert models["D"](torch.randn(4, 1, 28, 28)).shape == (4,)
    big = dcgan.build_models(config(img_size=64, ngf=64, ndf=64))
    w = torch.cat([m.weight.flatten() for m in big["G"].modules() if isinstance(m, nn.ConvTranspose2d)])
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    bn = torch.cat([m.weight for m in big["G"].modules() if isinstance(m, nn.BatchNorm2d)])
    assert abs(bn.mean().item() - 1.0) < 0.01


def test_losses_match_their_formulas():
    r, f = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-0.3, 1.2, -2.0])
    D_r, D_f = torch.sigmoid(r), torch.sigmoid(f)
    bce_D = -(torch.log(D_r).mean() + torch.log(1 - D_f).mean())
    assert torch.allclose(dcgan.discriminator_loss("minimax", r, f), bce_D)
    assert torch.allclose(dcgan.discriminator_loss("nonsaturating", r, f), bce_D)
    assert torch.allclose(dcgan.generator_loss("minimax", f), torch.log(1 - D_f).mean())
    assert torch.allclose(dcgan.generator_loss("nonsaturating", f), -torch.log(D_f).mean())
    assert torch.allclose(dcgan.discriminator_loss("lsgan", r, f), ((r - 1) ** 2).mean() + (f ** 2).mean())
    assert torch.allclose(dcgan.generator_loss("lsgan", f), ((f - 1) ** 2).mean())


# --- data ----------------------------------------------------------------------------------


def test_load_images_resizes_and_keeps_labels():
    images, labels = dcgan.load_images(str(REPO / "data"), "mnist5k", "test", 32)
    assert images.shape == (1000, 1, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (1000,) and torch.bincount(labels).tolist() == [100] * 10
    raw, _ = dcgan.load_images(str(REPO / "data"), "mnist5k", "test", 28)
    raw_np = np.load(REPO / "data" / "mnist5k" / "test.npy")
    assert torch.equal(raw, torch.from_numpy(raw_np).permute(0, 3, 1, 2))


# --- training runs -------------------------------------------------------------------------


def test_training_writes_every_output(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    run_script("dcgan.py", "--data_dir", tiny_mnist, "--out_dir", out, "--max_iters", "6", "--log_interval", "2",
               "--sample_interval", "3", "--ckpt_interval", "3", *TINY)
    for name in ("ckpt.pt", "log.jsonl", "curves.png", "config.json", "samples/step_000003.png", "samples/step_000006.png"):
        assert (out / name).exists(), name
    rows = read_log(out)
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert {"loss_D", "loss_G", "D_x", "D_G_z1", "D_G_z2", "ms_per_step", "images_per_s"} <= set(rows[0])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["script"] == "dcgan" and ckpt["step"] == 6 and ckpt["config"]["channels"] == 1
    models = dcgan.load_models(ckpt, "cpu")
    images = dcgan.generate(models, dcgan.sample_latent(ckpt["config"], 4, "cpu"))
    assert images.shape == (4, 1, 32, 32) and 0 <= images.min() and images.max() <= 1
    from PIL import Image
    assert Image.open(out / "samples/step_000006.png").size == (6 * 34 + 2, 6 * 34 + 2)  # 6x6 grid, 2 px padding


def test_discriminator_learns_to_separate(tiny_mnist, tmp_path):
    # with G frozen (lr 0 for G is not a flag; use a huge d_steps) D must quickly tell real from fake
    out = tmp_path / "run"
    run_script("dcgan.py", "--data_dir", tiny_mnist, "--out_dir", out, "--max_iters", "20", "--log_interval", "5",
               "--d_steps", "3", *TINY)
    rows = read_log(out)
    assert rows[-1]["loss_D"] < rows[0]["loss_D"]
    assert rows[-1]["D_x"] > rows[-1]["D_G_z1"]


@pytest.mark.parametrize("flags", [["--loss", "lsgan", "--upsample", "nearest"], ["--loss", "minimax", "--arch", "mlp", "--g_steps", "2"]])
def test_variants_train(tiny_mnist, tmp_path, flags):
    out = tmp_path / "run"
    run_script("dcgan.py", "--data_dir", tiny_mnist, "--out_dir", out, "--max_iters", "3", "--log_interval", "1", *TINY, *flags)
    rows = read_log(out)
    assert len(rows) == 3 and all(np.isfinite(r["loss_D"]) and np.isfinite(r["loss_G"]) for r in rows)


def test_sigkill_then_resume_gives_identical_losses(tiny_mnist, tmp_path):
    common = ["--data_dir", tiny_mnist, "--log_interval", "1", "--ckpt_interval", "10", "--sample_interval", "1000", *TINY]
    straight = tmp_path / "straight"
    run_script("dcgan.py", "--out_dir", straight, "--max_iters", "40", *common)
    expected = {r["step"]: r["loss_D"] for r in read_log(straight)} | {-r["step"]: r["loss_G"] for r in read_log(straight)}

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "dcgan.py", "--out_dir", killed, "--max_iters", "100000", *common],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (killed / "ckpt.pt").exists() and (killed / "log.jsonl").exists() and len(read_log(killed)) >= 25:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved_step = torch.load(killed / "ckpt.pt", weights_only=True)["step"]
    assert saved_step >= 20 and saved_step % 10 == 0

    run_script("dcgan.py", "--out_dir", killed, "--max_iters", "40", "--resume", *common)
    rows = read_log(killed)
    assert [r["step"] for r in rows] == list(range(1, 41))  # lines after the checkpoint were replaced, not duplicated
    for r in rows:
        assert r["loss_D"] == expected[r["step"]] and r["loss_G"] == expected[-r["step"]], r["step"]


def test_torchrun_two_processes(tiny_mnist, tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                           "dcgan.py", "--data_dir", str(tiny_mnist), "--out_dir", str(out), "--max_iters", "3",
                           "--log_interval", "1", *TINY],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3
    assert not any(k.startswith("module.") for k in ckpt["models"]["G"])  # saved without the DDP wrapper
    assert len(read_log(out)) == 3  # only rank 0 writes


# --- checkpoints and bad input -------------------------------------------------------------


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    dcgan.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def torn_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        dcgan.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1


def one_error_line(proc):
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode != 0
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_missing_dataset_names_prepare_command(tmp_path):
    proc = run_script("dcgan.py", "--data_dir", tmp_path, "--dataset", "celeba", "--out_dir", tmp_path / "o", check=False)
    assert "python " in one_error_line(proc) and "celeba/prepare.py" in proc.stderr


def test_unsupported_image_size(tiny_mnist, tmp_path):
    proc = run_script("dcgan.py", "--data_dir", tiny_mnist, "--img_size", "48", "--out_dir", tmp_path / "o", check=False)
    assert "--img_size 48" in one_error_line(proc)


def test_corrupt_checkpoint_to_resume(tiny_mnist, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"not a checkpoint at all")
    proc = run_script("dcgan.py", "--data_dir", tiny_mnist, "--out_dir", out, "--resume", *TINY, check=False)
    assert "cannot read checkpoint" in one_error_line(proc)
    assert (out / "ckpt.pt").read_bytes() == b"not a checkpoint at all"


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_mnist, tmp_path):
    out = tmp_path / "o"
    common = ["--data_dir", tiny_mnist, "--out_dir", out, "--ckpt_interval", "2", "--log_interval", "2", *TINY]
    run_script("dcgan.py", "--max_iters", "2", *common)
    good = (out / "ckpt.pt").read_bytes()
    proc = run_script("dcgan.py", "--max_iters", "20", "--resume", "--lr", "1e30", *common, check=False)
    assert "non-finite loss" in one_error_line(proc)
    assert (out / "ckpt.pt").read_bytes() == good
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2


def test_copied_alone_into_an_empty_folder_runs(tiny_mnist, tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(REPO / "dcgan.py", alone)
    shutil.copytree(tiny_mnist, alone / "data")
    run_script("dcgan.py", "--max_iters", "2", *TINY, cwd=alone)
    assert (alone / "out" / "dcgan" / "ckpt.pt").exists()
