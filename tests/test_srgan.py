import inspect
import json
import math
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

from conftest import DDP_STATE_PROBE, REPO, flat_state, one_process_state, run_script

sys.path.insert(0, str(REPO))
import srgan  # noqa: E402
from evaluate import load_models  # noqa: E402

TINY = ["--ngf", "8", "--ndf", "8", "--batch_size", "8", "--eval_images", "64", "--device", "cpu"]
F32 = ["--dtype", "float32"]  # the bit-exact reference (auto is bfloat16 on CPUs that compute it)


def config(**kw):
    base = dict(channels=1, ngf=32, ndf=32, sn=False, gan_loss="bce", down="bilinear", low_size=16, residual=False)
    return {**base, **kw}


def run_main(*args):
    """Train in this process (no interpreter start-up): srgan.main with one thread, like run_script's OMP_NUM_THREADS=1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        srgan.main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)


def main_error(capsys, *args):
    """The one stderr line of a run that must stop (in this process: fail() raises SystemExit)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(*args)
    assert exit_info.value.code != 0
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def read_log(out_dir, key="loss_D"):
    """The complete rows of log.jsonl holding `key` (a run being killed may have half-written the last one): the
    losses' rows by default, key="test_mse" for the test rows, None for every row."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.endswith("\n")]
    return [r for r in rows if key is None or key in r]


def strip_columns(path):
    """The 64 x 64 cells of progress_strip.png (below its label line) as uint8 tensors, and their count."""
    from PIL import Image
    strip = torch.from_numpy(np.array(Image.open(path).convert("RGB")))
    assert strip.shape[0] == 64 + 18 and (strip.shape[1] - 2) % 66 == 0, strip.shape
    return [strip[16:80, 2 + 66 * i:66 + 66 * i] for i in range((strip.shape[1] - 2) // 66)]


def grid_cell(path, k):
    """Cell k (row-major) of a saved 6-wide sample grid."""
    from PIL import Image
    grid = torch.from_numpy(np.array(Image.open(path).convert("RGB")))
    row, col = divmod(k, 6)
    return grid[2 + 66 * row:66 + 66 * row, 2 + 66 * col:66 + 66 * col]


# --- runs shared by several tests (each test that changes one works on a copy) -------------------------------

STRAIGHT = ["--log_interval", "1", "--ckpt_interval", "4", "--sample_interval", "6", *TINY, *F32]  # 16 steps
TWO_STEPS = ["--log_interval", "1", "--ckpt_interval", "2", "--sample_interval", "100", *TINY, *F32]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """conftest's tiny_mnist, made once for the shared runs (a resumed run cannot change its --data_dir)."""
    root = tmp_path_factory.mktemp("data")
    (root / "mnist5k").mkdir()
    for split, n in (("train", 256), ("test", 64)):
        for name in (f"{split}.npy", f"{split}_labels.npy"):
            np.save(root / "mnist5k" / name, np.load(REPO / "data" / "mnist5k" / name)[::15][:n])
    return root


def shared_run(tmp_path_factory, data_dir, *flags):
    out = tmp_path_factory.mktemp("run") / "run"
    run_main("--data_dir", data_dir, "--out_dir", out, *flags)
    return out


@pytest.fixture(scope="module")
def outputs_run(tmp_path_factory, data_dir):
    """6 steps: losses' rows every 2, grids, test rows and checkpoints every 3."""
    return shared_run(tmp_path_factory, data_dir, "--max_iters", "6", "--log_interval", "2", "--sample_interval", "3",
                      "--ckpt_interval", "3", *TINY)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, data_dir):
    """16 float32 steps, a row each, checkpoints every 4, grids every 6: the reference run of the resume tests."""
    return shared_run(tmp_path_factory, data_dir, "--max_iters", "16", *STRAIGHT)


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory, data_dir):
    """2 float32 steps and their checkpoint, for the tests that resume, break or refuse it."""
    return shared_run(tmp_path_factory, data_dir, "--max_iters", "2", *TWO_STEPS)


def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / "o")
    return tmp_path / "o"


# --- architecture --------------------------------------------------------------------------


def test_unet_feature_shapes_at_every_level():
    G = srgan.build_models(config(channels=3))["G"].eval()
    shapes = {}

    def record(name):
        def hook(module, inputs, output):
            shapes[name] = (tuple(inputs[0].shape[1:]), tuple(output.shape[1:]))
        return hook

    for i, layer in enumerate(G.encoder):
        layer.register_forward_hook(record(f"enc{i + 1}"))
    for i, layer in enumerate(G.decoder):
        layer.register_forward_hook(record(f"dec{i + 1}"))
    G.out.register_forward_hook(record("out"))
    y = G(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert shapes == {  # the layer table of docs/srgan.md
        "enc1": ((3, 64, 64), (32, 32, 32)),
        "enc2": ((32, 32, 32), (64, 16, 16)),
        "enc3": ((64, 16, 16), (128, 8, 8)),
        "enc4": ((128, 8, 8), (256, 4, 4)),
        "enc5": ((256, 4, 4), (512, 2, 2)),
        "dec1": ((512, 2, 2), (256, 4, 4)),
        "dec2": ((256 + 256, 4, 4), (128, 8, 8)),
        "dec3": ((128 + 128, 8, 8), (64, 16, 16)),
        "dec4": ((64 + 64, 16, 16), (32, 32, 32)),
        "dec5": ((32 + 32, 32, 32), (16, 64, 64)),
        "out": ((16 + 3, 64, 64), (3, 64, 64)),
    }
    assert y.shape == (2, 3, 64, 64) and y.abs().max() <= 1
    tconvs = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.kernel_size, m.stride, m.padding) for m in tconvs] == [((4, 4), (2, 2), (1, 1))] * 5
    convs = [m for m in G.encoder.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [32, 64, 128, 256, 512]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in G.modules()) == 10  # BN on every encoder and decoder layer
    assert (G.out[0].kernel_size, G.out[0].padding) == ((3, 3), (1, 1)) and isinstance(G.out[1], nn.Tanh)


def test_skip_connections_and_input_image_reach_the_output():
    torch.manual_seed(0)
    G = srgan.build_models(config())["G"].eval()
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    enc = {}
    for i, layer in enumerate(G.encoder):
        layer.register_forward_hook(lambda m, inp, out, i=i: enc.__setitem__(i, out))
    base = G(x)

    # decoder layer k (k >= 1) gets [previous decoder output, encoder feature of the same size]
    # and the last layer gets [dec5 output, input image]; perturb only that concatenated part
    targets = [(G.decoder[k], 4 - k) for k in range(1, 5)] + [(G.out, "input")]
    for module, source in targets:
        seen = {}

        def perturb(m, inputs):
            h = inputs[0]
            skip_ch = x.shape[1] if source == "input" else enc[source].shape[1]
            seen["skip"] = h[:, -skip_ch:].clone()
            bumped = h.clone()
            bumped[:, -skip_ch:] += 0.5 * torch.randn_like(bumped[:, -skip_ch:])
            return (bumped,)

        handle = module.register_forward_pre_hook(perturb)
        out = G(x)
        handle.remove()
        expected = x if source == "input" else enc[source]
        assert torch.equal(seen["skip"], expected), source  # the concatenated part is exactly that feature
        assert (out - base).abs().max() > 1e-3, source  # and the output depends on it
    assert torch.equal(G(x), base)  # hooks removed: back to the same output


def test_residual_generator_starts_at_the_bilinear_input_and_learns_a_correction():
    torch.manual_seed(0)
    G = srgan.build_models(config(residual=True))["G"]
    truth = torch.rand(4, 1, 64, 64).round()  # black and white, as digits: exact 0 must stay exact
    low = srgan.degrade(truth, config())
    assert torch.equal(srgan.upscale({"G": G.eval()}, low), low)  # at initialisation: the bilinear baseline
    assert not isinstance(G.out[-1], nn.Tanh)
    optimizer = torch.optim.Adam(G.train().parameters(), 1e-3)
    losses = []
    for _ in range(5):
        loss = F.l1_loss(G(low * 2 - 1), truth * 2 - 1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # the correction is learnt from zero
    out = srgan.upscale({"G": G.eval()}, low)
    assert not torch.equal(out, low) and 0 <= out.min() and out.max() <= 1
    # --no-residual is the handout's generator: a tanh output that does not start at the input
    plain = srgan.build_models(config(residual=False))["G"].eval()
    assert isinstance(plain.out[-1], nn.Tanh) and not torch.allclose(srgan.upscale({"G": plain}, low), low, atol=1e-2)


def test_discriminator_is_the_handout_six_convs():
    D = srgan.build_models(config(channels=3))["D"]
    convs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [32, 64, 128, 256, 512, 1]
    assert [m.kernel_size[0] for m in convs] == [4, 4, 4, 4, 4, 3]
    assert all(m.stride == (2, 2) and m.padding == (1, 1) for m in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in D.modules()) == 5
    x = torch.randn(4, 3, 64, 64)
    assert D(x).shape == (4,)
    for variant in (dict(sn=True), dict(gan_loss="wgan-gp")):
        D2 = srgan.build_models(config(**variant))["D"]
        assert not any(isinstance(m, nn.BatchNorm2d) for m in D2.modules())
        assert D2(torch.randn(2, 1, 64, 64)).shape == (2,)
    D_sn = srgan.build_models(config(sn=True))["D"]
    assert all(nn.utils.parametrize.is_parametrized(m, "weight") for m in D_sn.modules() if isinstance(m, nn.Conv2d))


def test_weight_init():
    models = srgan.build_models(config())
    w = torch.cat([m.weight.flatten() for m in models["G"].modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))])
    assert abs(w.std().item() - 0.02) < 0.002


# --- losses and degradation ----------------------------------------------------------------


def test_losses_match_their_formulas():
    r, f = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-0.3, 1.2, -2.0])
    D_r, D_f = torch.sigmoid(r), torch.sigmoid(f)
    assert torch.allclose(srgan.discriminator_loss("bce", r, f), -(torch.log(D_r).mean() + torch.log(1 - D_f).mean()))
    assert torch.allclose(srgan.generator_adv_loss("bce", f), -torch.log(D_f).mean())
    assert torch.allclose(srgan.discriminator_loss("lsgan", r, f), ((r - 1) ** 2).mean() + (f ** 2).mean())
    assert torch.allclose(srgan.generator_adv_loss("lsgan", f), ((f - 1) ** 2).mean())
    hinge = torch.tensor([0.0, 2.0, 0.5]).mean() + torch.tensor([0.7, 2.2, 0.0]).mean()
    assert torch.allclose(srgan.discriminator_loss("hinge", r, f), hinge)
    assert torch.allclose(srgan.generator_adv_loss("hinge", f), -f.mean())
    assert torch.allclose(srgan.discriminator_loss("wgan-gp", r, f), f.mean() - r.mean())
    assert torch.allclose(srgan.generator_adv_loss("wgan-gp", f), -f.mean())
    a, b = torch.tensor([0.5, -1.0]), torch.tensor([0.0, 1.0])
    assert srgan.reconstruction_loss("l1", a, b).item() == pytest.approx(1.25)
    assert srgan.reconstruction_loss("mse", a, b).item() == pytest.approx(2.125)


def test_gradient_penalty_of_a_linear_critic():
    # D(x) = <w, x> has gradient w everywhere, so the penalty is (||w|| - 1)^2 whatever eps is drawn
    w = torch.randn(1, 2, 4, 4)
    D = lambda x: (x * w).flatten(1).sum(1)  # noqa: E731
    real, fake = torch.randn(5, 2, 4, 4), torch.randn(5, 2, 4, 4)
    gp = srgan.gradient_penalty(D, real, fake)
    assert gp.item() == pytest.approx((w.norm().item() - 1) ** 2, rel=1e-5)
    # and it is differentiable (it is part of D's loss)
    w.requires_grad_(True)
    srgan.gradient_penalty(D, real, fake).backward()
    assert torch.allclose(w.grad, 2 * (w.norm() - 1) * w / w.norm(), rtol=1e-4)


def test_gradient_penalty_is_taken_between_real_and_fake_at_eps():
    # critic(x) = ||x||^2 / 2 has gradient x: at eps = 1 the penalty sees only the real images, at eps = 0 only the
    # generated ones, and no gradient flows back into G's output
    critic = lambda x: x.pow(2).flatten(1).sum(1) / 2  # noqa: E731
    real, fake = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4, requires_grad=True)
    norms = {"real": real.flatten(1).norm(dim=1), "fake": fake.detach().flatten(1).norm(dim=1)}
    for eps, side in ((torch.ones(3, 1, 1, 1), "real"), (torch.zeros(3, 1, 1, 1), "fake")):
        gp = srgan.gradient_penalty(critic, real, fake, eps)
        assert gp.item() == pytest.approx((norms[side] - 1).pow(2).mean().item(), rel=1e-5)
    srgan.gradient_penalty(critic, real, fake).backward()
    assert fake.grad is None


def test_degrade_is_downsample_then_bilinear_upsample():
    x = torch.rand(3, 1, 64, 64)
    area = srgan.degrade(x, config(down="area"))
    manual = F.interpolate(F.avg_pool2d(x, 4), size=64, mode="bilinear", align_corners=False)
    assert torch.allclose(area, manual, atol=1e-6)
    for down in ("bilinear", "bicubic", "nearest"):
        y = srgan.degrade(x, config(down=down))
        assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    assert torch.allclose(srgan.degrade(torch.full((1, 3, 64, 64), 0.3), config()), torch.tensor(0.3))
    # a one-pixel checkerboard is lost by the antialiased filter (the detail G must restore), kept aliased by nearest
    checker = (torch.arange(64)[:, None] + torch.arange(64)[None]).remainder(2).float().expand(1, 1, 64, 64)
    assert (srgan.degrade(checker, config()) - 0.5).abs().max() < 0.02
    assert torch.equal(srgan.degrade(checker, config(down="nearest")), torch.zeros(1, 1, 64, 64))
    assert srgan.degrade(x, config(low_size=8)).sub(srgan.degrade(x, config())).abs().max() > 0.01  # --low_size counts


# --- training runs -------------------------------------------------------------------------


def test_training_writes_every_output(outputs_run):
    out = outputs_run
    for name in ("ckpt.pt", "log.jsonl", "config.json", "progress_strip.png", "triplets.png",
                 "samples/step_000003.png", "samples/step_000006.png"):
        assert (out / name).exists(), name
    every = read_log(out, None)
    assert [(r["step"], "test_mse" in r) for r in every] == [(2, False), (3, True), (4, False), (6, False), (6, True)]
    rows = read_log(out)  # the losses' rows; at a sample step the test row follows the losses' row
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert {"loss_D", "loss_G", "recon", "adv", "D_x", "D_G_y", "ms_per_step", "images_per_s"} <= set(rows[0])
    rows = read_log(out, "test_mse")
    assert set(rows[0]) == {"step", "test_mse", "baseline_mse"}
    assert 0 < rows[0]["test_mse"] and 0 < rows[0]["baseline_mse"] < 0.05

    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["script"] == "srgan" and ckpt["format"] == 3 and ckpt["step"] == 6 and ckpt["config"]["channels"] == 1
    models = load_models(srgan, ckpt, "cpu")
    truth = srgan.real_images(ckpt["config"], "test")[0][:4].float() / 255
    assert truth.shape == (4, 1, 64, 64)
    low = srgan.degrade(truth, ckpt["config"])
    up = srgan.upscale(models, low)
    assert up.shape == (4, 1, 64, 64) and 0 <= up.min() and up.max() <= 1
    # the test MSE logged at the last step is the interface's MSE over the same 64 test images
    truth = srgan.real_images(ckpt["config"], "test")[0][:64].float() / 255
    mse = (srgan.upscale(models, srgan.degrade(truth, ckpt["config"])) - truth).pow(2).mean().item()
    assert mse == pytest.approx(rows[-1]["test_mse"], rel=1e-4)
    assert (srgan.degrade(truth, ckpt["config"]) - truth).pow(2).mean().item() == pytest.approx(rows[-1]["baseline_mse"], rel=1e-4)

    from PIL import Image
    assert Image.open(out / "samples/step_000006.png").size == (6 * 66 + 2, 6 * 66 + 2)  # 6x6 grid, 2 px padding
    assert Image.open(out / "triplets.png").size == (3 * 66 + 2, 10 * 66 + 2)  # 10 rows: input | output | truth
    assert Image.open(out / "progress_strip.png").size == (4 * 66 + 2, 66 + 2 + 14)  # input, steps 3 and 6, truth
    # the strip is cut from the grids: the first fixed image's input, its output at each sample step, its truth
    cells = strip_columns(out / "progress_strip.png")
    first, last = out / "samples/step_000003.png", out / "samples/step_000006.png"
    expected = [grid_cell(last, 0), grid_cell(first, 1), grid_cell(last, 1), grid_cell(last, 2)]
    assert all(torch.equal(a, b) for a, b in zip(cells, expected))
    assert not torch.equal(cells[1], cells[2])  # G changed between the two sample steps


def test_ema_generator_is_saved_and_loaded(outputs_run, tiny_mnist, tmp_path):
    ckpt = torch.load(outputs_run / "ckpt.pt", weights_only=True)
    ema, trained = ckpt["ema"]["G"], ckpt["models"]["G"]
    assert ema.keys() == trained.keys()
    assert any(not torch.equal(ema[k], trained[k]) for k in ema if k.endswith("weight"))  # averaged weights
    # their own batch-norm statistics: the plain average over 10 fixed batches of degraded training images
    assert all(ema[k].item() == 10 for k in ema if k.endswith("num_batches_tracked"))
    assert all(not torch.equal(ema[k], trained[k]) and ema[k].abs().sum() > 0 for k in ema if k.endswith("running_mean"))
    loaded = load_models(srgan, ckpt, "cpu")["G"].state_dict()
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)  # evaluate.py and interpolate.py get the EMA generator

    plain = tmp_path / "plain"
    run_main("--data_dir", tiny_mnist, "--out_dir", plain, "--max_iters", "2", "--ema_decay", "0", *TINY)
    ckpt = torch.load(plain / "ckpt.pt", weights_only=True)
    assert ckpt["ema"] == {}
    loaded = load_models(srgan, ckpt, "cpu")["G"].state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in ckpt["models"]["G"].items())


def test_saved_ema_batchnorm_stats_belong_to_the_averaged_weights(outputs_run):
    ckpt = torch.load(outputs_run / "ckpt.pt", weights_only=True)
    config = ckpt["config"]
    G = load_models(srgan, ckpt, "cpu")["G"]  # the averaged weights with their saved statistics
    saved = {k: v.clone() for k, v in G.state_dict().items() if "running" in k}
    data, _ = srgan.real_images(config, "train")
    batches = torch.randint(0, len(data), (10, config["batch_size"]), generator=torch.Generator().manual_seed(config["seed"]))
    srgan.update_bn((srgan.degrade(data[i].float().div(255), config).mul(2).sub(1) for i in batches), G)  # replayed
    for key, value in saved.items():
        assert torch.allclose(value, G.state_dict()[key], atol=1e-5), key
        assert not torch.allclose(value, ckpt["models"]["G"][key], atol=1e-3), key  # not the trained G's statistics


def test_sampling_leaves_the_training_streams_untouched(data_dir, straight_run, tmp_path):
    # the EMA's batch-norm statistics are recomputed on fixed-seed batches at every sample and checkpoint step; the
    # straight run's first checkpoint and grid come after step 4's losses
    run_main("--data_dir", data_dir, "--out_dir", tmp_path / "often", "--max_iters", "4", *STRAIGHT,
             "--sample_interval", "1", "--ckpt_interval", "1")
    often, once = read_log(tmp_path / "often"), read_log(straight_run)[:4]  # the losses' rows
    assert [r["step"] for r in often] == [r["step"] for r in once] == [1, 2, 3, 4]
    for a, b in zip(often, once):
        assert (a["loss_D"], a["loss_G"]) == (b["loss_D"], b["loss_G"]), a["step"]


def test_one_generator_forward_per_iteration(tiny_mnist, tmp_path, monkeypatch):
    training_calls = []
    forward = srgan.UNetGenerator.forward

    def counted(self, x):
        if self.training and torch.is_grad_enabled():
            training_calls.append(x.shape[0])
        return forward(self, x)

    monkeypatch.setattr(srgan.UNetGenerator, "forward", counted)
    run_main("--data_dir", tiny_mnist, "--out_dir", tmp_path / "run", "--max_iters", "5", *TINY, *F32)
    assert training_calls == [8] * 5  # D's update and G's update share one forward of the batch


@pytest.mark.parametrize("flags", [["--gan_loss", "wgan-gp", "--recon", "mse", "--down", "area"],
                                   ["--gan_loss", "hinge", "--sn"], ["--gan_loss", "lsgan", "--adv_weight", "0.1"]])
def test_variants_train(tiny_mnist, tmp_path, flags):
    out = tmp_path / "run"
    run_main("--data_dir", tiny_mnist, "--out_dir", out, "--max_iters", "3", "--log_interval", "1",
             "--sample_interval", "3", *TINY, *flags)
    rows = read_log(out)
    assert len(rows) == 3 and all(abs(r["loss_D"]) < 1e6 and abs(r["loss_G"]) < 1e6 for r in rows)
    assert load_models(srgan, torch.load(out / "ckpt.pt", weights_only=True), "cpu")["G"] is not None


def test_bfloat16_trains(data_dir, straight_run, tmp_path):
    run_main("--data_dir", data_dir, "--out_dir", tmp_path / "bf16", "--max_iters", "3", *STRAIGHT,
             "--dtype", "bfloat16")
    bf16, f32 = read_log(tmp_path / "bf16"), read_log(straight_run)
    assert [r["step"] for r in bf16] == [1, 2, 3]
    assert all(math.isfinite(r[k]) for r in bf16 for k in ("loss_D", "loss_G", "recon", "adv"))
    assert 0 < read_log(tmp_path / "bf16", "test_mse")[-1]["test_mse"] < 1
    assert bf16[0]["loss_D"] != f32[0]["loss_D"]  # autocast really ran in bfloat16
    assert abs(bf16[0]["recon"] - f32[0]["recon"]) < 0.05 * f32[0]["recon"]  # and computed the same thing
    ckpt = torch.load(tmp_path / "bf16" / "ckpt.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in ckpt["models"]["G"].values() if v.is_floating_point())


def test_srgan_learns_to_beat_bilinear(tiny_mnist, tmp_path):
    # 40 steps at a high learning rate take the tiny U-Net below the bilinear input's test MSE (about 0.0044 vs 0.0091)
    out = tmp_path / "run"
    run_main("--data_dir", tiny_mnist, "--out_dir", out, "--max_iters", "40", "--log_interval", "40", "--lr", "2e-2", *TINY, *F32)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    truth = srgan.real_images(ckpt["config"], "test")[0].float() / 255
    low = srgan.degrade(truth, ckpt["config"])
    model_mse = (srgan.upscale(load_models(srgan, ckpt, "cpu"), low) - truth).pow(2).mean().item()
    bilinear_mse = (low - truth).pow(2).mean().item()
    assert model_mse < bilinear_mse, (model_mse, bilinear_mse)
    assert read_log(out, "test_mse")[-1]["test_mse"] == pytest.approx(model_mse, rel=1e-4)


def test_sigkill_then_resume_gives_identical_losses(data_dir, straight_run, tmp_path):
    common, straight = ["--data_dir", data_dir, *STRAIGHT], straight_run
    expected = {r["step"]: r for r in read_log(straight)}

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "srgan.py", "--out_dir", killed, "--max_iters", "100000", *common],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (killed / "ckpt.pt").exists() and (killed / "log.jsonl").exists() and len(read_log(killed)) >= 10:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved_step = torch.load(killed / "ckpt.pt", weights_only=True)["step"]
    assert saved_step >= 8 and saved_step % 4 == 0

    run_main("--out_dir", killed, "--max_iters", "16", "--resume", *common)
    rows = read_log(killed)
    assert [r["step"] for r in rows] == list(range(1, 17))  # lines after the checkpoint were replaced, not duplicated
    for r in rows:
        for key in ("loss_D", "loss_G", "recon", "adv"):
            assert r.get(key) == expected[r["step"]].get(key), (r["step"], key)
    assert read_log(killed, "test_mse") == read_log(straight, "test_mse") and len(read_log(straight, "test_mse")) == 3
    assert sorted(os.listdir(killed / "samples")) == ["step_000006.png", "step_000012.png", "step_000016.png"]
    # the resumed run's strip has a column for every sample step, those before the resume too, in order
    cells = strip_columns(killed / "progress_strip.png")
    assert len(cells) == 5  # input, steps 6, 12, 16, truth
    assert all(torch.equal(a, b) for a, b in zip(cells, strip_columns(straight / "progress_strip.png")))
    assert [torch.equal(cells[1 + i], grid_cell(killed / f"samples/step_{s:06d}.png", 1))
            for i, s in enumerate((6, 12, 16))] == [True] * 3
    resumed, reference = (torch.load(d / "ckpt.pt", weights_only=True) for d in (killed, straight))
    for part in ("models", "ema"):
        for name, state in reference[part].items():
            assert state.keys() == resumed[part][name].keys()
            assert all(torch.equal(v, resumed[part][name][k]) for k, v in state.items()), (part, name)


def test_log_after_resume_between_log_steps_equals_uninterrupted(tiny_mnist, tmp_path, monkeypatch):
    # keep a copy of every checkpoint, to resume from step 3 while the log window (steps 1-3 of 4) is open
    save = srgan.save_checkpoint

    def save_and_keep(config, step, *args):
        save(config, step, *args)
        shutil.copy(os.path.join(config["out_dir"], "ckpt.pt"), tmp_path / f"step{step}.pt")

    monkeypatch.setattr(srgan, "save_checkpoint", save_and_keep)
    common = ["--data_dir", tiny_mnist, "--max_iters", "8", "--log_interval", "4", "--ckpt_interval", "3",
              "--sample_interval", "100", *TINY, *F32]
    run_main("--out_dir", tmp_path / "straight", *common)
    run_main("--out_dir", tmp_path / "resumed", "--resume", tmp_path / "step3.pt", *common)
    straight, resumed = read_log(tmp_path / "straight"), read_log(tmp_path / "resumed")
    assert [r["step"] for r in straight] == [r["step"] for r in resumed] == [4, 8]
    for a, b in zip(straight, resumed):
        for key in ("loss_D", "loss_G", "recon", "adv", "D_x", "D_G_y"):
            assert a.get(key) == b.get(key), (a["step"], key)
    assert read_log(tmp_path / "straight", "test_mse") == read_log(tmp_path / "resumed", "test_mse")
    assert [r["step"] for r in read_log(tmp_path / "resumed", "test_mse")] == [8]


def test_resume_honours_typed_flags_and_refuses_fixed_ones(data_dir, two_step_run, tmp_path, capsys):
    out = copy_of(two_step_run, tmp_path)  # 2 steps, --log_interval 1
    common = ["--data_dir", data_dir, "--out_dir", out, "--sample_interval", "100", *TINY]
    # --log_interval 25 is the default, yet typed: the resumed run logs only at its last step
    run_main("--max_iters", "4", "--log_interval", "25", "--resume", *common)
    assert [r["step"] for r in read_log(out)] == [1, 2, 4]
    good = (out / "ckpt.pt").read_bytes()
    line = main_error(capsys, "--max_iters", "6", "--resume", *common, "--ngf", "16")
    assert "--ngf cannot change" in line and "8" in line
    assert (out / "ckpt.pt").read_bytes() == good


def test_empty_test_split_shows_training_images(tiny_mnist, tmp_path, capsys):
    # data/folder/prepare.py --test_size 0 writes a test.npy of 0 images
    np.save(tiny_mnist / "mnist5k" / "test.npy", np.zeros((0, 28, 28, 1), np.uint8))
    (tiny_mnist / "mnist5k" / "test_labels.npy").unlink()
    out = tmp_path / "run"
    capsys.readouterr()
    run_main("--data_dir", tiny_mnist, "--out_dir", out, "--max_iters", "4", "--log_interval", "2", "--sample_interval", "2", *TINY)
    assert "test split of 'mnist5k' is empty" in capsys.readouterr().out
    rows = read_log(out, None)
    assert [r["step"] for r in rows] == [2, 4] and not any("test_mse" in r for r in rows)
    from PIL import Image
    assert Image.open(out / "samples/step_000004.png").size == (6 * 66 + 2, 6 * 66 + 2)  # 12 training images
    assert len(strip_columns(out / "progress_strip.png")) == 4  # input, steps 2 and 4, truth


def test_test_split_of_other_channels_stops_with_one_line(tiny_mnist, tmp_path, capsys):
    np.save(tiny_mnist / "mnist5k" / "test.npy", np.zeros((4, 28, 28, 3), np.uint8))
    (tiny_mnist / "mnist5k" / "test_labels.npy").unlink()
    line = main_error(capsys, "--data_dir", tiny_mnist, "--out_dir", tmp_path / "o", *TINY)
    assert "has 1 channels in its train split, 3 in test" in line
    assert not (tmp_path / "o").exists()


def test_torchrun_two_processes(tiny_mnist, tmp_path, monkeypatch):
    # the real loop under DDP: both ranks end with the same networks, EMA and optimizer states, unlike one process
    # with the same global batch (the ranks draw different halves of it)
    out, common = tmp_path / "ddp", ["--data_dir", str(tiny_mnist), "--max_iters", "3", "--log_interval", "1", *TINY, *F32]
    (tmp_path / "probe.py").write_text(DDP_STATE_PROBE.format(repo=str(REPO), script='srgan'))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29645",
                           str(tmp_path / "probe.py"), "--out_dir", str(out), *common],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3
    assert not any(k.startswith("module.") for k in ckpt["models"]["G"])  # saved without the DDP wrapper
    assert "G" in ckpt["ema"]
    assert len(read_log(out)) == 3 and len(read_log(out, "test_mse")) == 1  # only rank 0 writes
    rank0, rank1 = (flat_state(torch.load(out / f"state_rank{r}.pt", weights_only=True)) for r in (0, 1))
    groups = {".".join(k.split(".")[:2]) for k in rank0}
    assert groups == {"models.G", "models.D", "optimizers.G", "optimizers.D", "ema.G"}, groups
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    single = one_process_state(monkeypatch, srgan, lambda: run_main("--out_dir", tmp_path / "alone", *common))
    for network in ("models.G", "models.D"):
        assert any(not torch.equal(single[k], rank0[k]) for k in rank0 if k.startswith(network)), network


# --- checkpoints and bad input -------------------------------------------------------------


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    state = {"models": {"G": nn.Linear(2, 2)}, "optimizers": {}, "ema": {}}
    config, data_gen = {"out_dir": str(tmp_path)}, torch.Generator()
    srgan.save_checkpoint(config, 1, state, data_gen, {}, True)
    original_open = open

    def torn_open(path, mode="r", *args, **kwargs):
        f = original_open(path, mode, *args, **kwargs)
        if "w" in mode and str(path).endswith(".tmp"):
            f.write(b"PK\x03\x04 half a file")
            raise KeyboardInterrupt  # killed mid-write
        return f

    monkeypatch.setattr("builtins.open", torn_open)
    with pytest.raises(KeyboardInterrupt):
        srgan.save_checkpoint(config, 2, state, data_gen, {}, True)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 1


def test_load_models_refuses_another_scripts_checkpoint():
    with pytest.raises(ValueError, match="not a format-3 srgan checkpoint"):
        load_models(srgan, {"script": "dcgan", "format": 2, "config": {}}, "cpu")


def test_missing_dataset_names_prepare_command(tmp_path, capsys):
    line = main_error(capsys, "--data_dir", tmp_path, "--dataset", "celeba", "--out_dir", tmp_path / "o")
    assert "python " in line and "celeba/prepare.py" in line


def test_unsupported_image_size(tiny_mnist, tmp_path, capsys):
    assert "--img_size 128" in main_error(capsys, "--data_dir", tiny_mnist, "--img_size", "128", "--out_dir", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_corrupt_checkpoint_to_resume(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"not a checkpoint at all")
    assert "cannot read checkpoint" in main_error(capsys, "--data_dir", tiny_mnist, "--out_dir", out, "--resume", *TINY)
    assert (out / "ckpt.pt").read_bytes() == b"not a checkpoint at all"


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_dir, two_step_run, tmp_path, capsys):
    out = copy_of(two_step_run, tmp_path)
    common = ["--data_dir", data_dir, "--out_dir", out, "--ckpt_interval", "2", "--log_interval", "2", *TINY]
    good = (out / "ckpt.pt").read_bytes()
    assert "non-finite loss" in main_error(capsys, "--max_iters", "20", "--resume", "--lr", "1e30", *common)
    assert (out / "ckpt.pt").read_bytes() == good
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2


@pytest.mark.parametrize("flag,value", [("batch_size", "0"), ("max_iters", "0"), ("log_interval", "-1"), ("sample_interval", "0"),
                                        ("ckpt_interval", "0"), ("low_size", "0"), ("low_size", "64"), ("ngf", "0"), ("ngf", "7"),
                                        ("ndf", "-8"), ("lr", "0"), ("eval_images", "-1"), ("adv_weight", "-1"),
                                        ("beta1", "1"), ("ema_decay", "1")])
def test_bad_sizes_and_counts_stop_with_one_line(tiny_mnist, tmp_path, capsys, flag, value):
    line = main_error(capsys, "--data_dir", tiny_mnist, "--out_dir", tmp_path / "o", *TINY, f"--{flag}", value)
    assert line.startswith("srgan.py: error: ") and f"--{flag}" in line and value in line
    assert not (tmp_path / "o").exists()


def test_unwritable_out_dir_stops_and_keeps_the_checkpoint(data_dir, two_step_run, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    line = main_error(capsys, "--data_dir", data_dir, "--out_dir", tmp_path / "a_file" / "run", *TINY)
    assert "cannot write to --out_dir" in line
    # a run whose samples/ cannot be made (a file is in the way): the resume stops before touching what is there
    out = copy_of(two_step_run, tmp_path)
    before = {name: (out / name).read_bytes() for name in ("ckpt.pt", "log.jsonl", "config.json")}
    shutil.rmtree(out / "samples")
    (out / "samples").write_text("")
    assert "cannot write to --out_dir" in main_error(capsys, "--data_dir", data_dir, "--out_dir", out, "--max_iters", "4", "--resume", *TINY)
    assert {name: (out / name).read_bytes() for name in before} == before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_out_dir(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert "cannot write to --out_dir" in main_error(capsys, "--data_dir", tiny_mnist, "--out_dir", out, *TINY)
    finally:
        out.chmod(0o700)


def test_resume_refuses_another_scripts_checkpoint(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    torch.save({"script": "dcgan", "format": 1, "config": {"nz": 100}, "step": 5}, out / "ckpt.pt")
    before = (out / "ckpt.pt").read_bytes()
    line = main_error(capsys, "--data_dir", tiny_mnist, "--out_dir", out, "--resume", *TINY)
    assert "is not a format-3 srgan checkpoint" in line
    assert (out / "ckpt.pt").read_bytes() == before and sorted(os.listdir(out)) == ["ckpt.pt"]


def test_shared_helpers_are_dcgans_verbatim():
    import dcgan
    banner = "# Run plumbing, the same in every model script"
    ours, theirs = ((REPO / f"{name}.py").read_text() for name in ("srgan", "dcgan"))
    assert ours.count(banner) == 1 and ours.split(banner)[1] == theirs.split(banner)[1]
    for name in ("load_images", "resize_uint8", "real_images", "update_ema", "init_weights", "number", "parse_run_flags",
                 "parse_config", "setup_distributed", "train_data", "choose_precision", "restore", "check_finite",
                 "save_checkpoint", "prepare_out_dir", "accumulate", "write_log_row"):
        assert inspect.getsource(getattr(srgan, name)) == inspect.getsource(getattr(dcgan, name)), name


def test_copied_alone_into_an_empty_folder_runs(tiny_mnist, tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(REPO / "srgan.py", alone)
    shutil.copytree(tiny_mnist, alone / "data")
    run_script("srgan.py", "--max_iters", "2", *TINY, cwd=alone)
    assert (alone / "out" / "srgan" / "ckpt.pt").exists()


# --- the run plumbing's guarantees, through srgan's main -----------------------------------


def test_old_format_checkpoint_is_refused(data_dir, two_step_run, tmp_path, capsys):
    out = copy_of(two_step_run, tmp_path)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["format"] = 1
    torch.save(ckpt, out / "ckpt.pt")
    before = (out / "ckpt.pt").read_bytes()
    line = main_error(capsys, "--data_dir", data_dir, "--out_dir", out, "--max_iters", "3", "--resume", *TINY)
    assert "not a format-3 srgan checkpoint" in line
    assert (out / "ckpt.pt").read_bytes() == before
    with pytest.raises(ValueError, match="format-3"):
        load_models(srgan, ckpt, "cpu")


def poison_first(module_type, tensor_name):
    """A function setting the first element of `tensor_name` of the first `module_type` of a model to NaN."""
    def poison(model):
        module = next(m for m in model.modules() if isinstance(m, module_type))
        getattr(module, tensor_name).data.view(-1)[0] = float("nan")
    return poison


@pytest.mark.parametrize("where", ["D_batchnorm_buffer", "ema_weights", "ema_batchnorm_statistics"])
def test_non_finite_state_never_reaches_a_checkpoint(data_dir, two_step_run, tmp_path, capsys, monkeypatch, where):
    # the losses stay finite: only what a checkpoint saves is poisoned, and the save refuses it
    out = copy_of(two_step_run, tmp_path)
    common = ["--data_dir", data_dir, "--out_dir", out, *TWO_STEPS]
    good = (out / "ckpt.pt").read_bytes()
    if where == "D_batchnorm_buffer":  # D's batch norm keeps a NaN running mean; training uses batch statistics
        build = srgan.build_models

        def build_poisoned(config):
            models = build(config)
            models["D"].register_forward_hook(lambda m, i, o: poison_first(nn.BatchNorm2d, "running_mean")(m))
            return models
        monkeypatch.setattr(srgan, "build_models", build_poisoned)
    elif where == "ema_weights":
        update, poison = srgan.update_ema, poison_first(nn.Conv2d, "weight")
        monkeypatch.setattr(srgan, "update_ema", lambda ema, model, decay: (update(ema, model, decay), poison(ema)))
    else:  # the statistics recomputed for the averaged weights
        recompute, poison = srgan.update_bn, poison_first(nn.BatchNorm2d, "running_var")
        monkeypatch.setattr(srgan, "update_bn", lambda batches, model: (recompute(batches, model), poison(model)))
    line = main_error(capsys, "--max_iters", "4", "--resume", *common)
    assert "non-finite loss or weights by step 4" in line
    assert all(math.isfinite(r["loss_D"]) and math.isfinite(r["loss_G"]) for r in read_log(out))
    assert (out / "ckpt.pt").read_bytes() == good and not (out / "ckpt.pt.tmp").exists()


def test_D_is_frozen_during_Gs_update(tiny_mnist, tmp_path, monkeypatch):
    # at G's optimiser step D's gradients are still exactly those of D's own loss: G's loss added none
    models, seen = {}, []
    build, adam_step = srgan.build_models, torch.optim.Adam.step
    monkeypatch.setattr(srgan, "build_models", lambda config: models.update(build(config)) or models)

    def recording_step(self, *args, **kwargs):
        D = list(models["D"].parameters())
        name = "D" if self.param_groups[0]["params"][0] is D[0] else "G"
        seen.append((name, [p.grad.clone() for p in D], [p.requires_grad for p in D]))
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    run_main("--data_dir", tiny_mnist, "--out_dir", tmp_path / "run", "--max_iters", "3", *TINY, *F32)
    assert [name for name, _, _ in seen] == ["D", "G"] * 3
    for (_, after_D, trainable_D), (_, after_G, trainable_G) in zip(seen[::2], seen[1::2]):
        assert all(torch.equal(a, b) for a, b in zip(after_D, after_G))
        assert all(trainable_D) and not any(trainable_G)  # frozen in G's update, unfrozen for D's
    assert all(p.requires_grad for p in models["D"].parameters())


@pytest.mark.parametrize("faster", ["float32", "bfloat16"])
def test_dtype_auto_takes_the_faster_of_a_timed_trial(data_dir, straight_run, tmp_path, monkeypatch, faster):
    trials = []

    def fake_trial(step, device, dtype):
        step()  # the trial step runs (on copies of the networks)
        trials.append(dtype)
        return 1.0 if dtype == faster else 2.0

    monkeypatch.setattr(srgan, "cpu_computes_bfloat16", lambda: True)
    monkeypatch.setattr(srgan, "time_trial", fake_trial)
    out = tmp_path / "run"
    run_main("--data_dir", data_dir, "--out_dir", out, "--max_iters", "2", "--log_interval", "1", *TINY)
    config = json.loads((out / "config.json").read_text())
    assert sorted(trials) == ["bfloat16", "float32"] and config["dtype"] == "auto" and config["precision"] == faster
    assert config["dtype_trial_ms"] == {"float32": 1.0 if faster == "float32" else 2.0,
                                        "bfloat16": 1.0 if faster == "bfloat16" else 2.0}
    assert [r["step"] for r in read_log(out)] == [1, 2]
    # the trial leaves the training streams alone: float32 by trial equals float32 asked for (the same flags)
    if faster == "float32":
        assert [r["loss_D"] for r in read_log(out)] == [r["loss_D"] for r in read_log(straight_run)[:2]]


INT_FLAGS = ["batch_size", "max_iters", "log_interval", "sample_interval", "ckpt_interval", "seed", "img_size",
             "low_size", "ngf", "ndf", "eval_images"]
FLOAT_FLAGS = ["lr", "beta1", "beta2", "ema_decay", "gp_weight", "recon_weight", "adv_weight"]
SMALLEST = ["--ngf", "2", "--ndf", "1", "--batch_size", "2", "--eval_images", "8", "--device", "cpu", *F32]


def test_every_numeric_flag_takes_zero_minus_one_and_a_billion_without_a_traceback(tiny_mnist, tmp_path, capsys,
                                                                                    monkeypatch):
    # each value ends in a normal run or in exactly one line on stderr and a non-zero exit; in this process, where
    # fail() raises SystemExit and anything else would be a traceback; one step of the smallest networks each
    flags = vars(srgan.get_args([]))
    assert set(INT_FLAGS) == {k for k, v in flags.items() if type(v) is int}  # every numeric flag is fuzzed
    assert set(FLOAT_FLAGS) == {k for k, v in flags.items() if type(v) is float}
    outcomes = {}
    for flag in INT_FLAGS + FLOAT_FLAGS:
        values = ["0", "-1", "1e9"] + (["1000000000"] if flag in INT_FLAGS else [])
        for value in values:
            if flag == "max_iters" and value == "1000000000":
                continue  # a run of a billion steps: below, stopped after its second step
            out = tmp_path / f"{flag}{value}"
            argv = ["--data_dir", tiny_mnist, "--out_dir", out, "--max_iters", "1", "--log_interval", "1", *SMALLEST,
                    *(["--gan_loss", "wgan-gp"] if flag == "gp_weight" else []), f"--{flag}", value]
            capsys.readouterr()
            try:
                run_main(*argv)
                outcomes[flag, value] = "ran"
                assert (out / "ckpt.pt").exists(), (flag, value)
            except SystemExit as e:
                err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
                assert e.code != 0 and len(err) == 1 and err[0].startswith("srgan.py: error: "), (flag, value, err)
                outcomes[flag, value] = "refused"
    assert outcomes["batch_size", "1000000000"] == outcomes["ngf", "1000000000"] == "refused"
    assert outcomes["lr", "0"] == outcomes["ngf", "-1"] == outcomes["img_size", "1000000000"] == "refused"
    assert outcomes["seed", "-1"] == outcomes["eval_images", "1000000000"] == outcomes["ema_decay", "0"] == "ran"

    # a billion steps trains and logs (with its days left) until a Ctrl-C at step 2; any other exception fails here
    write_log_row = srgan.write_log_row

    def interrupt_at_step_2(log_path, step, *args):
        write_log_row(log_path, step, *args)
        if step == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(srgan, "write_log_row", interrupt_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        run_main("--data_dir", tiny_mnist, "--out_dir", tmp_path / "long", "--max_iters", "1000000000",
                 "--log_interval", "1", *SMALLEST)
    assert [r["step"] for r in read_log(tmp_path / "long")] == [1, 2]
