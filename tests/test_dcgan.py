import argparse
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
from torchvision.utils import save_image

from conftest import REPO, flat_state, make_tiny_mnist, one_process_state, run_script

sys.path.insert(0, str(REPO))
import dcgan  # noqa: E402
from evaluate import load_models  # noqa: E402

TINY = ["--nz", "8", "--ngf", "8", "--ndf", "8", "--batch_size", "16", "--device", "cpu"]


def config(**kw):
    base = dict(nz=16, ngf=16, ndf=16, channels=1, img_size=32, arch="conv", upsample="convtranspose", depth=None,
                leaky_slope=0.2)
    return {**base, **kw}


def read_log(out_dir):
    """The complete rows of log.jsonl (a run being killed may have half-written the last one)."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: in-process runs on one thread


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """conftest's tiny_mnist, made once for the tests that only read it."""
    return make_tiny_mnist(tmp_path_factory.mktemp("shared"))


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """One tiny float32 run that several tests read, and copy before they resume it: 6 steps, a log row every 4 (and
    at the end), a grid every 2 (the first before any log row), a checkpoint every 3, EMA on."""
    out = tmp_path_factory.mktemp("trained") / "run"
    dcgan.main(["--data_dir", str(data_dir), "--out_dir", str(out), "--max_iters", "6", "--log_interval", "4",
                "--sample_interval", "2", "--ckpt_interval", "3", "--dtype", "float32", *TINY])
    return out


def copy_of(run, tmp_path):
    """A copy of a run's folder to resume or damage; --out_dir changes on resume, --data_dir must not."""
    return shutil.copytree(run, tmp_path / "run")


def error_line(capsys, argv):
    """The one stderr line of an in-process run that must stop with an error."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        dcgan.main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code != 0 and len(lines) == 1, lines
    return lines[0]


# --- architecture --------------------------------------------------------------------------


@pytest.mark.parametrize("img_size", [32, 64])
@pytest.mark.parametrize("upsample", ["convtranspose", "nearest", "bilinear"])
def test_generator_and_discriminator_shapes(img_size, upsample):
    models = dcgan.build_models(config(img_size=img_size, channels=3, upsample=upsample))
    z = torch.randn(5, 16)
    x = models["G"](z)
    assert x.shape == (5, 3, img_size, img_size)
    transposed = [m for m in models["G"].modules() if isinstance(m, nn.ConvTranspose2d)]
    resized = [m for m in models["G"].modules() if isinstance(m, nn.Upsample)]
    if upsample == "convtranspose":  # only the first 1x1 -> 4x4 layer stays a transposed conv otherwise
        assert len(transposed) == int(np.log2(img_size)) - 1 and not resized
    else:
        assert len(transposed) == 1 and len(resized) == int(np.log2(img_size)) - 2
        assert all(m.mode == upsample for m in resized)
    assert x.min() >= -1 and x.max() <= 1
    assert models["D"](x).shape == (5,)


def test_handout_layer_tables():
    # CIS 680 Table 2 (64x64): 1024-512-256-128-3 with kernel 4, the first with padding 0
    G = dcgan.build_models(config(img_size=64, channels=3, ngf=128, nz=100))["G"]
    convs = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [m.out_channels for m in convs] == [1024, 512, 256, 128, 3]
    assert [m.padding[0] for m in convs] == [0, 1, 1, 1, 1]
    assert [m.stride[0] for m in convs] == [1, 2, 2, 2, 2]
    # the MNIST homework (32x32, hidden 16): 4h x 4 x 4, 2h x 8 x 8, h x 16 x 16, 1 x 32 x 32
    G = dcgan.build_models(config())["G"]
    shapes, x = [], torch.randn(2, 16)
    for layer in G:
        x = layer(x)
        if isinstance(layer, nn.ConvTranspose2d):
            shapes.append(tuple(x.shape[1:]))
    assert shapes == [(64, 4, 4), (32, 8, 8), (16, 16, 16), (1, 32, 32)]
    D = dcgan.build_models(config(img_size=64, channels=3, ndf=64))["D"]
    assert [m.out_channels for m in D.modules() if isinstance(m, nn.Conv2d)] == [64, 128, 256, 512, 1]
    assert not isinstance(D[1], nn.BatchNorm2d)  # no batch norm on the input layer


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


@pytest.mark.parametrize("kind", ["nonsaturating", "minimax", "lsgan", "sigmoid_mse"])
def test_each_loss_gives_the_generator_its_own_gradient(kind):
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0], requires_grad=True)
    (grad,) = torch.autograd.grad(dcgan.generator_loss(kind, logits), logits)
    n = len(logits)
    expected = {"nonsaturating": -torch.sigmoid(-logits) / n,  # d/dl of -log sigmoid(l)
                "minimax": -torch.sigmoid(logits) / n,  # d/dl of log(1 - sigmoid(l))
                "lsgan": 2 * (logits - 1) / n,
                "sigmoid_mse": 2 * (torch.sigmoid(logits) - 1) * torch.sigmoid(logits) * torch.sigmoid(-logits) / n}[kind]
    assert torch.allclose(grad, expected.detach())


def csi5340_table(G, D, nz, img_size):
    """The layer types and output shapes (C, H, W) of G and D, as CSI5340 assignment 4's modules list them."""
    shapes = {"G": [], "D": []}
    x = torch.randn(2, nz)
    for layer in G:
        x = layer(x)
        if isinstance(layer, nn.ConvTranspose2d):
            shapes["G"].append(tuple(x.shape[1:]))
    x = torch.randn(2, 1, img_size, img_size)
    for layer in D:
        x = layer(x)
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            shapes["D"].append(tuple(x.shape[1:]))
    return shapes


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_depth_builds_the_csi5340_modules(depth):
    # Generator: depth x (transposed conv, BN, ReLU), then transposed conv, tanh
    # Discriminator: conv, LeakyReLU, (depth - 1) x (conv, BN, LeakyReLU), conv, LeakyReLU, linear to 1 (sigmoid in the loss)
    models = dcgan.build_models(config(depth=depth, nz=100, ngf=8, ndf=8))
    G, D = models["G"], models["D"]
    kinds = [type(m) for m in G]
    assert kinds == [nn.Unflatten] + [nn.ConvTranspose2d, nn.BatchNorm2d, nn.ReLU] * depth + [nn.ConvTranspose2d, nn.Tanh]
    kinds = [type(m) for m in D]
    assert kinds == ([nn.Conv2d, nn.LeakyReLU] + [nn.Conv2d, nn.BatchNorm2d, nn.LeakyReLU] * (depth - 1)
                     + [nn.Conv2d, nn.LeakyReLU, nn.Flatten, nn.Linear, nn.Flatten])
    start, top = 32 // 2 ** depth, 8 * 2 ** (depth - 1)
    shapes = csi5340_table(G, D, 100, 32)
    # G doubles the resolution and halves the width after a first start x start map
    assert shapes["G"] == [(top // 2 ** i, start * 2 ** i, start * 2 ** i) for i in range(depth)] + [(1, 32, 32)]
    # D mirrors it, then a conv to 1 x 1 and the linear layer
    assert shapes["D"] == [(8 * 2 ** i, 16 // 2 ** i, 16 // 2 ** i) for i in range(depth)] + [(top, 1, 1), (1,)]
    assert D(G(torch.randn(3, 100))).shape == (3,)


def test_without_depth_the_dcgan_tables_stay_and_depth_3_keeps_their_generator():
    default = dcgan.build_models(config())
    assert isinstance(default["D"], dcgan.Discriminator) and not any(isinstance(m, nn.Linear) for m in default["D"].modules())
    deep = dcgan.build_models(config(depth=3))
    assert isinstance(deep["D"], dcgan.Discriminator) and any(isinstance(m, nn.Linear) for m in deep["D"].modules())
    assert {k: v.shape for k, v in deep["G"].state_dict().items()} == {k: v.shape for k, v in default["G"].state_dict().items()}
    big = dcgan.build_models(config(img_size=64, channels=3, depth=2, upsample="bilinear"))
    assert big["G"](torch.randn(2, 16)).shape == (2, 3, 64, 64) and big["D"](torch.randn(2, 3, 64, 64)).shape == (2,)
    assert big["D"][-2].weight.std() < 0.03  # the linear layer starts from N(0, 0.02) too


@pytest.mark.parametrize("arch,depth", [("conv", None), ("conv", 2), ("mlp", None)])
def test_leaky_slope_sets_every_discriminator_leaky_relu(arch, depth):
    for slope in (0.2, 0.1):
        models = dcgan.build_models(config(arch=arch, depth=depth, img_size=32, leaky_slope=slope))
        slopes = [m.negative_slope for m in models["D"].modules() if isinstance(m, nn.LeakyReLU)]
        assert len(slopes) >= 2 and set(slopes) == {slope}
        assert not any(isinstance(m, nn.LeakyReLU) for m in models["G"].modules())


def test_csi5340_loss_is_mse_on_the_sigmoid_with_d_halved():
    r = torch.tensor([2.0, -1.0, 0.5], requires_grad=True)
    f = torch.tensor([-0.3, 1.2, -2.0, 0.7], requires_grad=True)
    mse = nn.MSELoss()
    D_r, D_f = torch.sigmoid(r), torch.sigmoid(f)
    expected_D = (mse(D_f, torch.zeros(4)) + mse(D_r, torch.ones(3))) / 2  # disc_loss = (mse(fake, 0) + mse(real, 1)) / 2
    expected_G = mse(D_f, torch.ones(4))  # gen_loss = mse(fake, 1)
    loss_D = dcgan.discriminator_loss("sigmoid_mse", r, f)
    loss_G = dcgan.generator_loss("sigmoid_mse", f)
    assert torch.allclose(loss_D, expected_D) and torch.allclose(loss_G, expected_G)
    assert not torch.allclose(loss_D, dcgan.discriminator_loss("lsgan", r, f))
    # the gradients by hand: d/dl sigmoid(l) = s (1 - s)
    s_r, s_f = D_r.detach(), D_f.detach()
    grad_r, grad_f = torch.autograd.grad(loss_D, (r, f))
    assert torch.allclose(grad_r, (s_r - 1) * s_r * (1 - s_r) / 3)
    assert torch.allclose(grad_f, s_f * s_f * (1 - s_f) / 4)
    (grad_G,) = torch.autograd.grad(loss_G, f)
    assert torch.allclose(grad_G, 2 * (s_f - 1) * s_f * (1 - s_f) / 4)
    assert torch.equal(dcgan.discriminator_output("sigmoid_mse", r), torch.sigmoid(r))  # D_x and D_G_z are probabilities


# --- training aids: augmentation, EMA, dtype -----------------------------------------------


def test_lr_factor_holds_then_falls_linearly_to_zero():
    config = {"max_iters": 1000, "lr_decay": 0.5}
    assert [dcgan.lr_factor(step, config) for step in (0, 499, 500, 750, 999)] == [1.0, 1.0, 1.0, 0.5, 0.002]
    assert {dcgan.lr_factor(step, {**config, "lr_decay": 0.0}) for step in range(1000)} == {1.0}  # the handouts'


def test_d_learns_at_twice_g_lr_and_both_decay(trained):
    """The defaults: D's lr is --d_lr_scale times G's, and both fall over the last half of the 6 steps; the last
    update (step 5 of 6) used a third of each."""
    ckpt = torch.load(trained / "ckpt.pt", weights_only=True)
    lr = ckpt["config"]["lr"]
    assert ckpt["config"]["d_lr_scale"] == 2.0 and ckpt["config"]["lr_decay"] == 0.5
    assert ckpt["optimizers"]["G"]["param_groups"][0]["lr"] == pytest.approx(lr / 3)
    assert ckpt["optimizers"]["D"]["param_groups"][0]["lr"] == pytest.approx(2 * lr / 3)



def test_translation_moves_pixels_and_cutout_zeroes_a_square():
    torch.manual_seed(0)
    x = torch.rand(64, 2, 16, 16) + 0.5  # no zeros, so a zeroed pixel was cut out
    shifted = dcgan.augment_translation(x)
    assert shifted.shape == x.shape and not torch.equal(shifted, x)
    for i in range(len(x)):  # every output pixel is some pixel of the same image and channel
        assert torch.isin(shifted[i], x[i]).all()
    cut = dcgan.augment_cutout(x)
    zeroed = (cut == 0).all(dim=1)  # N x H x W, the same square in every channel
    assert ((cut == 0) | (cut == x)).all()
    sides = zeroed.sum(dim=(1, 2))
    assert sides.max() == 8 * 8 and 0 < sides.min()  # half the side, hanging over the edge at most by half
    rows, cols = zeroed.any(dim=2), zeroed.any(dim=1)
    assert torch.equal(zeroed, rows[:, :, None] & cols[:, None, :])  # a rectangle
    colored = dcgan.augment_color(x)
    assert colored.shape == x.shape and not torch.allclose(colored, x)
    assert dcgan.diff_augment(x, []) is x


def test_augment_policy_parses_and_rejects():
    assert dcgan.augment_policy("none") == []
    assert dcgan.augment_policy("translation,cutout") == ["translation", "cutout"]
    with pytest.raises(argparse.ArgumentTypeError, match="translation,flip"):
        dcgan.augment_policy("translation,flip")
    with pytest.raises(SystemExit):
        dcgan.get_args(["--augment", "flip"])


def test_augmentation_changes_what_D_sees_never_the_samples(tiny_mnist, tmp_path, monkeypatch):
    seen = []
    original_forward = dcgan.Discriminator.forward

    def recording_forward(self, x):
        seen.append(x.detach().clone())
        return original_forward(self, x)

    monkeypatch.setattr(dcgan.Discriminator, "forward", recording_forward)
    drawn = []
    original_to_unit_range = dcgan.to_unit_range
    monkeypatch.setattr(dcgan, "to_unit_range", lambda x: drawn.append(original_to_unit_range(x)) or drawn[-1])
    out = tmp_path / "run"
    dcgan.main(["--data_dir", str(tiny_mnist), "--out_dir", str(out), "--max_iters", "2", "--sample_interval", "2",
                "--dtype", "float32", "--augment", "translation,cutout", *TINY])
    # D's first input of each iteration is the real batch: augmented, so not the batch that was drawn
    assert not torch.equal(seen[0], drawn[0]) and seen[0].shape == drawn[0].shape
    assert (seen[0] == 0).flatten(1).any(dim=1).all()  # a cut-out square in each image (uint8 / 127.5 - 1 is never 0)
    assert len(seen) == 6  # per iteration: reals and fakes in D's update, fakes in G's update
    for fakes in (seen[1], seen[2], seen[4], seen[5]):  # tanh outputs are never exactly 0: cutout reached the fakes
        assert (fakes == 0).flatten(1).any(dim=1).all()
    # the grid is the EMA generator's plain output on the fixed noise: no augmentation
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    G = load_models(dcgan, ckpt, "cpu")["G"]
    with torch.no_grad():
        grid = G(dcgan.fixed_randn(ckpt["config"]["seed"], 36, ckpt["config"]["nz"]))
    save_image(grid.add(1).div(2), tmp_path / "expected.png", nrow=6, padding=2)  # torchvision's, the reference
    from PIL import Image
    expected = np.asarray(Image.open(tmp_path / "expected.png"), dtype=int)
    saved = np.asarray(Image.open(out / "samples" / "step_000002.png"), dtype=int)
    assert np.abs(expected - saved).max() <= 1  # channels_last in training vs contiguous here: rounding at most


def test_no_augmentation_shows_D_the_drawn_batch(tiny_mnist, tmp_path, monkeypatch):
    seen = []
    original_forward = dcgan.Discriminator.forward
    monkeypatch.setattr(dcgan.Discriminator, "forward", lambda self, x: seen.append(x.detach().clone()) or original_forward(self, x))
    drawn = []
    original_to_unit_range = dcgan.to_unit_range
    monkeypatch.setattr(dcgan, "to_unit_range", lambda x: drawn.append(original_to_unit_range(x)) or drawn[-1])
    dcgan.main(["--data_dir", str(tiny_mnist), "--out_dir", str(tmp_path / "run"), "--max_iters", "1", "--augment", "none",
                "--dtype", "float32", *TINY])
    assert torch.equal(seen[0], drawn[0])


def test_ema_follows_the_weights():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = dcgan.copy.deepcopy(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    dcgan.update_ema(ema, net, 0.9)
    for e, p in zip(ema.parameters(), net.parameters()):
        assert torch.allclose(e, 0.9 * (p - 1.0) + 0.1 * p)


def test_saved_ema_batchnorm_stats_belong_to_the_averaged_weights(trained):
    ckpt = torch.load(trained / "ckpt.pt", weights_only=True)
    G = dcgan.build_models(ckpt["config"])["G"]
    G.load_state_dict(ckpt["ema"]["G"])
    saved = {k: v.clone() for k, v in G.state_dict().items() if "running" in k}
    noise = dcgan.fixed_randn(ckpt["config"]["seed"] + 1, 10, 16, ckpt["config"]["nz"])
    dcgan.update_bn(noise, G)  # the same statistics, replayed on the saved averaged weights
    for key, value in saved.items():
        assert torch.allclose(value, G.state_dict()[key], atol=1e-5), key
        assert not torch.allclose(value, ckpt["models"]["G"][key], atol=1e-3), key  # not the trained G's statistics


class FakeTrials:
    def __init__(self, float32_ms, bfloat16_ms):
        self.ms, self.calls = {"float32": float32_ms, "bfloat16": bfloat16_ms}, []

    def __call__(self, step, device, dtype):
        step()  # the real trial step runs: it must work on the copies
        self.calls.append(dtype)
        return self.ms[dtype]


@pytest.mark.parametrize("float32_ms,bfloat16_ms,chosen", [(10.0, 20.0, "float32"), (20.0, 10.0, "bfloat16"),
                                                           (10.0, 9.5, "float32")])  # within 10%: not worth it
def test_dtype_auto_is_decided_by_timing_and_recorded(tiny_mnist, tmp_path, monkeypatch, float32_ms, bfloat16_ms, chosen):
    trials = FakeTrials(float32_ms, bfloat16_ms)
    monkeypatch.setattr(dcgan, "cpu_computes_bfloat16", lambda: True)
    monkeypatch.setattr(dcgan, "time_trial", trials)
    out = tmp_path / "run"
    common = ["--data_dir", str(tiny_mnist), "--out_dir", str(out), *TINY]
    dcgan.main(["--max_iters", "1", *common])
    saved = json.loads((out / "config.json").read_text())
    assert saved["precision"] == chosen and saved["dtype"] == "auto"
    assert saved["dtype_trial_ms"] == {"float32": float32_ms, "bfloat16": bfloat16_ms}
    assert sorted(trials.calls) == ["bfloat16", "float32"]
    dcgan.main(["--max_iters", "2", "--resume", *common])  # a resumed run keeps its precision: no new trial
    assert len(trials.calls) == 2 and json.loads((out / "config.json").read_text())["precision"] == chosen
    dcgan.main(["--max_iters", "3", "--resume", "--dtype", "float32", *common])  # unless --dtype names one
    assert json.loads((out / "config.json").read_text())["precision"] == "float32"


def test_dtype_auto_without_a_trial(monkeypatch):
    trials = FakeTrials(1.0, 1.0)
    monkeypatch.setattr(dcgan, "time_trial", trials)
    monkeypatch.setattr(dcgan, "cpu_computes_bfloat16", lambda: False)
    for device, dtype, chosen in (("cpu", "auto", "float32"), ("mps", "auto", "float32"), ("cpu", "bfloat16", "bfloat16"),
                                  ("cpu", "float32", "float32")):
        config = {"dtype": dtype}
        dcgan.choose_precision(config, torch.device(device), lambda: None)
        assert config["precision"] == chosen
    for supported in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
        config = {"dtype": "auto"}
        dcgan.choose_precision(config, torch.device("cuda"), lambda: None)
        assert config["precision"] == ("bfloat16" if supported else "float32")
    assert trials.calls == []


def test_native_bfloat16_detection(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert dcgan.cpu_computes_bfloat16() is False  # AVX-512 without BF16 (e.g. Skylake) emulates it: slower
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert dcgan.cpu_computes_bfloat16() is True


def test_d_is_frozen_during_g_update(tiny_mnist, tmp_path, monkeypatch):
    models, after_D, unchanged = {}, [], []
    original_build, original_step = dcgan.build_models, torch.optim.Adam.step
    monkeypatch.setattr(dcgan, "build_models", lambda config: models.update(original_build(config)) or models)

    def recording_step(self, *args, **kwargs):
        D_grads = [p.grad.clone() for p in models["D"].parameters()]
        if self.param_groups[0]["params"][0] is next(models["G"].parameters()):  # right after G's backward
            unchanged.append(all(torch.equal(a, b) for a, b in zip(after_D[-1], D_grads)))
        else:
            after_D.append(D_grads)
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    dcgan.main(["--data_dir", str(tiny_mnist), "--out_dir", str(tmp_path / "run"), "--max_iters", "2", *TINY])
    assert unchanged == [True, True]  # G's backward added nothing to D's gradients
    assert all(p.requires_grad for p in models["D"].parameters())  # unfrozen again for D's own update


def test_the_chosen_loss_and_compile_reach_the_training_loop(tiny_mnist, tmp_path, monkeypatch):
    kinds, compiled = set(), []
    original_D_loss, original_G_loss = dcgan.discriminator_loss, dcgan.generator_loss
    monkeypatch.setattr(dcgan, "discriminator_loss", lambda kind, *a: kinds.add(("D", kind)) or original_D_loss(kind, *a))
    monkeypatch.setattr(dcgan, "generator_loss", lambda kind, *a: kinds.add(("G", kind)) or original_G_loss(kind, *a))
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(model) or model)
    common = ["--data_dir", str(tiny_mnist), "--max_iters", "1", "--dtype", "float32", *TINY]
    dcgan.main([*common, "--out_dir", str(tmp_path / "a"), "--loss", "lsgan"])
    assert kinds == {("D", "lsgan"), ("G", "lsgan")} and compiled == []
    kinds.clear()
    dcgan.main([*common, "--out_dir", str(tmp_path / "b"), "--loss", "sigmoid_mse", "--compile"])
    assert kinds == {("D", "sigmoid_mse"), ("G", "sigmoid_mse")}
    assert [type(m) for m in compiled] == [dcgan.Generator, dcgan.Discriminator]


def test_grid_before_the_first_log_row(trained):
    assert read_log(trained)[0]["step"] == 4  # the grid of step 2 came first
    assert (trained / "samples" / "step_000002.png").exists()


# --- data ----------------------------------------------------------------------------------


def test_load_images_resizes_and_keeps_labels():
    images, labels = dcgan.load_images(str(REPO / "data"), "mnist5k", "test", 32)
    assert images.shape == (1000, 1, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (1000,) and torch.bincount(labels).tolist() == [100] * 10
    raw, _ = dcgan.load_images(str(REPO / "data"), "mnist5k", "test", 28)
    raw_np = np.load(REPO / "data" / "mnist5k" / "test.npy")
    assert torch.equal(raw, torch.from_numpy(raw_np).permute(0, 3, 1, 2))


# --- training runs -------------------------------------------------------------------------


def test_training_writes_every_output(trained):
    out = trained
    for name in ("ckpt.pt", "log.jsonl", "config.json", "samples/step_000004.png", "samples/step_000006.png"):
        assert (out / name).exists(), name
    rows = read_log(out)
    assert [r["step"] for r in rows] == [4, 6]  # every --log_interval, and at the end
    assert {"loss_D", "loss_G", "D_x", "D_G_z1", "D_G_z2", "ms_per_step", "images_per_s"} <= set(rows[0])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["script"] == "dcgan" and ckpt["step"] == 6 and ckpt["config"]["channels"] == 1
    models = load_models(dcgan, ckpt, "cpu")
    images = dcgan.generate(models, dcgan.sample_latent(ckpt["config"], 4, "cpu"))
    assert images.shape == (4, 1, 32, 32) and 0 <= images.min() and images.max() <= 1
    from PIL import Image
    assert Image.open(out / "samples/step_000006.png").size == (6 * 34 + 2, 6 * 34 + 2)  # 6x6 grid, 2 px padding


def test_discriminator_learns_to_separate(tiny_mnist, tmp_path):
    # with G frozen (lr 0 for G is not a flag; use a huge d_steps) D must quickly tell real from fake
    out = tmp_path / "run"
    dcgan.main(["--data_dir", str(tiny_mnist), "--out_dir", str(out), "--max_iters", "20", "--log_interval", "5",
                "--d_steps", "3", *TINY])
    rows = read_log(out)
    assert rows[-1]["loss_D"] < rows[0]["loss_D"]
    assert rows[-1]["D_x"] > rows[-1]["D_G_z1"]


@pytest.mark.parametrize("flags", [["--loss", "lsgan", "--upsample", "nearest"], ["--loss", "minimax", "--arch", "mlp", "--g_steps", "2"],
                                   ["--dtype", "bfloat16", "--augment", "color,translation,cutout"]])
def test_variants_train(tiny_mnist, tmp_path, flags):
    out = tmp_path / "run"
    dcgan.main(["--data_dir", str(tiny_mnist), "--out_dir", str(out), "--max_iters", "3", "--log_interval", "1", *TINY, *flags])
    rows = read_log(out)
    assert len(rows) == 3 and all(np.isfinite(r["loss_D"]) and np.isfinite(r["loss_G"]) for r in rows)


def test_sigkill_then_resume_gives_identical_log_and_ema(tiny_mnist, tmp_path):
    # checkpoints every 5 steps, log rows every 7: the resumed run starts mid-window, and its rows must
    # still average the same steps as the uninterrupted run's (the window's sums are checkpointed)
    common = ["--data_dir", str(tiny_mnist), "--log_interval", "7", "--ckpt_interval", "5", "--sample_interval", "1000",
              "--dtype", "float32", *TINY]
    straight = tmp_path / "straight"  # in this process, on one thread as the subprocesses: the same numbers
    dcgan.main(["--out_dir", str(straight), "--max_iters", "40", *common])
    expected = read_log(straight)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "dcgan.py", "--out_dir", killed, "--max_iters", "100000", *common],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (killed / "ckpt.pt").exists() and (killed / "log.jsonl").exists() and len(read_log(killed)) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved_step = torch.load(killed / "ckpt.pt", weights_only=True)["step"]
    assert 15 <= saved_step < 40 and saved_step % 5 == 0

    run_script("dcgan.py", "--out_dir", killed, "--max_iters", "40", "--resume", *common)
    rows = read_log(killed)
    assert [r["step"] for r in rows] == [7, 14, 21, 28, 35, 40]  # lines after the checkpoint replaced, not duplicated
    for r, e in zip(rows, expected):
        for key in ("loss_D", "loss_G", "D_x", "D_G_z1", "D_G_z2"):
            assert r[key] == e[key], (r["step"], key)
    a = torch.load(straight / "ckpt.pt", weights_only=True)
    b = torch.load(killed / "ckpt.pt", weights_only=True)
    for name in ("models", "ema"):
        for key, value in a[name]["G"].items():
            assert torch.equal(value, b[name]["G"][key]), (name, key)


def test_ema_weights_are_saved_and_returned_by_load_models(trained, tiny_mnist, tmp_path):
    ckpt = torch.load(trained / "ckpt.pt", weights_only=True)
    G = load_models(dcgan, ckpt, "cpu")["G"]
    for key, value in G.state_dict().items():
        assert torch.equal(value, ckpt["ema"]["G"][key]), key
    weight = "1.weight"
    assert not torch.equal(ckpt["ema"]["G"][weight], ckpt["models"]["G"][weight])
    dcgan.main(["--data_dir", str(tiny_mnist), "--out_dir", str(tmp_path / "off"), "--max_iters", "1", "--ema_decay", "0", *TINY])
    assert torch.load(tmp_path / "off" / "ckpt.pt", weights_only=True)["ema"] == {}


def test_d_steps_and_g_steps_count_the_updates(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    dcgan.main(["--data_dir", str(tiny_mnist), "--out_dir", str(out), "--max_iters", "2", "--d_steps", "3", "--g_steps", "2",
                *TINY])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    adam_steps = {name: {float(s["step"]) for s in ckpt["optimizers"][name]["state"].values()} for name in ("G", "D")}
    assert adam_steps == {"D": {6.0}, "G": {4.0}}


def test_resume_takes_a_typed_flag_even_at_its_default(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--data_dir", str(tiny_mnist), "--out_dir", str(out), *TINY]
    dcgan.main(["--max_iters", "1", "--lr", "1e-3", *common])
    dcgan.main(["--max_iters", "2", "--lr", "4e-4", "--resume", *common])  # 4e-4 is the default
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["lr"] == 4e-4
    lrs = {name: opt["param_groups"][0]["lr"] for name, opt in ckpt["optimizers"].items()}
    assert lrs == {"G": 4e-4, "D": 8e-4}  # D at --d_lr_scale 2; step 1 of 2 is before the decay
    assert "--ngf cannot change" in error_line(capsys, ["--max_iters", "3", "--resume", *common, "--ngf", "16"])


def test_csi5340_run_saves_its_flags_reloads_and_resumes(tiny_mnist, tmp_path, capsys):
    # the README's CSI5340 command, shortened: the checkpoint's config rebuilds the deep networks for evaluate.py
    out = tmp_path / "run"
    common = ["--data_dir", str(tiny_mnist), "--out_dir", str(out), "--depth", "2", "--loss", "sigmoid_mse",
              "--leaky_slope", "0.1", "--log_interval", "1", *TINY]
    dcgan.main(["--max_iters", "2", *common])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert (ckpt["config"]["depth"], ckpt["config"]["loss"], ckpt["config"]["leaky_slope"]) == (2, "sigmoid_mse", 0.1)
    models = load_models(dcgan, ckpt, "cpu")
    assert isinstance(models["D"], dcgan.Discriminator) and isinstance(models["D"][-2], nn.Linear)
    assert {m.negative_slope for m in models["D"].modules() if isinstance(m, nn.LeakyReLU)} == {0.1}
    assert dcgan.generate(models, dcgan.sample_latent(ckpt["config"], 3, "cpu")).shape == (3, 1, 32, 32)
    rows = read_log(out)
    assert all(0 < r["D_x"] < 1 and np.isfinite(r["loss_G"]) for r in rows)  # sigmoid outputs are logged
    for flag, value in (("--depth", "3"), ("--leaky_slope", "0.2"), ("--loss", "lsgan")):
        with pytest.raises(SystemExit):
            dcgan.main(["--max_iters", "3", "--resume", *common, flag, value])
        assert f"{flag} cannot change in a resumed run" in capsys.readouterr().err
    dcgan.main(["--max_iters", "3", "--resume", *common])
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 3
    for bad, message in ((["--arch", "mlp"], "--arch mlp"), (["--img_size", "28", "--depth", "3"], "multiple of 2^depth"),
                         (["--leaky_slope", "-0.1"], "--leaky_slope: -0.1 is outside")):
        with pytest.raises(SystemExit):
            dcgan.main(["--max_iters", "1", *common, "--out_dir", str(tmp_path / "bad"), *bad])
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("poison", ["G weight", "D batch-norm buffer", "EMA weight", "EMA batch-norm statistics"])
def test_non_finite_state_never_reaches_a_checkpoint(trained, data_dir, tmp_path, monkeypatch, poison):
    # the losses of step 7 are computed before the poison: only what is about to be saved is non-finite
    out = copy_of(trained, tmp_path)
    common = ["--data_dir", str(data_dir), "--out_dir", str(out), "--ckpt_interval", "1", "--log_interval", "100", *TINY]
    good = (out / "ckpt.pt").read_bytes()
    models, original_build = {}, dcgan.build_models
    monkeypatch.setattr(dcgan, "build_models", lambda config: models.update(original_build(config)) or models)
    original_update, original_bn = dcgan.update_ema, dcgan.update_bn

    def poisoning_update(ema, G, decay):
        with torch.no_grad():
            if poison == "G weight":
                next(G.parameters()).fill_(float("nan"))
            if poison == "D batch-norm buffer":
                next(m for m in models["D"].modules() if isinstance(m, nn.BatchNorm2d)).running_var.fill_(float("inf"))
            original_update(ema, G, decay)
            if poison == "EMA weight":
                next(ema.parameters()).fill_(float("nan"))

    def poisoning_bn(batches, model):
        original_bn(batches, model)
        if poison == "EMA batch-norm statistics":
            next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).running_var.fill_(float("inf"))

    monkeypatch.setattr(dcgan, "update_ema", poisoning_update)
    monkeypatch.setattr(dcgan, "update_bn", poisoning_bn)
    with pytest.raises(SystemExit):
        dcgan.main(["--max_iters", "7", "--resume", *common])
    assert (out / "ckpt.pt").read_bytes() == good


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compile_trains_a_step(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    run_script("dcgan.py", "--data_dir", tiny_mnist, "--out_dir", out, "--max_iters", "2", "--compile", "--ema_decay", "0",
               "--log_interval", "1", *TINY, timeout=600)
    rows = read_log(out)
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss_G"]) for r in rows)


DDP_PROBE = """
import os, sys, torch
sys.path.insert(0, {repo!r})
import dcgan
states, rank = [], int(os.environ.get("RANK", 0))
original_restore = dcgan.restore
dcgan.restore = lambda ckpt, config, state, *a: states.append(state) or original_restore(ckpt, config, state, *a)
if rank == {poisoned_rank}:  # this rank alone sees a non-finite weight after the first step
    original_update = dcgan.update_ema
    def poisoning_update(ema, G, decay):
        original_update(ema, G, decay)
        with torch.no_grad():
            next(G.parameters()).fill_(float("nan"))
    dcgan.update_ema = poisoning_update
dcgan.main(sys.argv[1:])
torch.save({{group: {{name: obj.state_dict() for name, obj in objects.items()}} for group, objects in states[0].items()}},
           {out!r} + f"/state_rank{{rank}}.pt")
"""


def run_probe(tmp_path, name, common, nproc, poisoned_rank=-1, port=29517):
    out = tmp_path / name
    out.mkdir()
    probe = tmp_path / f"{name}.py"
    probe.write_text(DDP_PROBE.format(repo=str(REPO), out=str(out), poisoned_rank=poisoned_rank))
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}"]
    proc = subprocess.run([*launch, str(probe), "--out_dir", str(out), *common], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    return out, proc


def test_torchrun_two_processes(tiny_mnist, tmp_path, monkeypatch):
    # the real training loop under DDP: both ranks end with the same networks and optimizer states, unlike one
    # process with the same global batch (the ranks draw different halves of it)
    common = ["--data_dir", str(tiny_mnist), "--max_iters", "3", "--log_interval", "1", "--dtype", "float32",
              "--ema_decay", "0", *TINY]
    out, proc = run_probe(tmp_path, "ddp", common, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3
    assert not any(k.startswith("module.") for k in ckpt["models"]["G"])  # saved without the DDP wrapper
    assert len(read_log(out)) == 3  # only rank 0 writes
    rank0, rank1 = (flat_state(torch.load(out / f"state_rank{r}.pt", weights_only=True)) for r in (0, 1))
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in rank0} == {"models.G", "models.D", "optimizers.G", "optimizers.D"}
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    single = one_process_state(monkeypatch, dcgan, lambda: dcgan.main(["--out_dir", str(tmp_path / "alone"), *common]))
    for network in ("models.G", "models.D"):
        assert any(not torch.equal(single[k], rank0[k]) for k in rank0 if k.startswith(network)), network


def test_torchrun_one_rank_non_finite_stops_both(tiny_mnist, tmp_path):
    common = ["--data_dir", str(tiny_mnist), "--max_iters", "5", "--ckpt_interval", "2", "--log_interval", "100",
              "--dtype", "float32", *TINY]
    out, proc = run_probe(tmp_path, "poisoned", common, 2, poisoned_rank=1, port=29519)  # a hang would time out
    assert proc.returncode != 0
    assert proc.stderr.count("dcgan.py: error: non-finite loss or weights by step 2") == 2, proc.stderr[-3000:]
    assert 'dcgan.py", line' not in proc.stderr  # no traceback from the script (torchrun reports the exit codes itself)
    assert not (out / "ckpt.pt").exists()


# --- checkpoints and bad input -------------------------------------------------------------


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    config = {"out_dir": str(tmp_path), "x": 1}
    net, data_gen = nn.Linear(2, 2), torch.Generator()
    dcgan.save_checkpoint(config, 1, {"models": {"G": net}}, data_gen, {}, master=True)

    original_open = open

    def torn_open(path, mode="r", *args, **kwargs):
        f = original_open(path, mode, *args, **kwargs)
        if "w" in mode and str(path).endswith(".tmp"):
            f.write(b"PK\x03\x04 half a file")
            raise KeyboardInterrupt  # killed mid-write
        return f

    monkeypatch.setattr("builtins.open", torn_open)
    with pytest.raises(KeyboardInterrupt):
        dcgan.save_checkpoint(config, 2, {"models": {"G": net}}, data_gen, {}, master=True)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 1


def test_old_format_checkpoint_is_refused_in_one_line(trained, data_dir, tmp_path):
    out = copy_of(trained, tmp_path)
    common = ["--data_dir", data_dir, "--out_dir", out, *TINY]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["format"] = 1
    torch.save(ckpt, out / "ckpt.pt")
    before = (out / "ckpt.pt").read_bytes()
    proc = run_script("dcgan.py", "--max_iters", "7", "--resume", *common, check=False)
    assert "not a format-3 dcgan checkpoint" in one_error_line(proc)
    assert (out / "ckpt.pt").read_bytes() == before
    with pytest.raises(ValueError, match="format-3"):
        load_models(dcgan, ckpt, "cpu")


def one_error_line(proc):
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode != 0
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("fault", ["truncated images", "labels of another length", "data_dir is a file"])
def test_faults_in_the_data_give_one_line(tiny_mnist, tmp_path, fault):
    data_dir, named = tiny_mnist, tiny_mnist / "mnist5k" / "train.npy"
    if fault == "truncated images":
        named.write_bytes(named.read_bytes()[:5000])
    elif fault == "labels of another length":
        named = tiny_mnist / "mnist5k" / "train_labels.npy"
        np.save(named, np.load(named)[:-1])
    else:
        data_dir = named = tmp_path / "a_file"
        named.write_text("not a folder")
    proc = run_script("dcgan.py", "--data_dir", data_dir, "--out_dir", tmp_path / "o", *TINY, check=False)
    line = one_error_line(proc)
    assert str(named) in line and "prepare.py" in line, line


def test_a_disk_that_fills_up_during_a_save(tiny_mnist, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    common = ["--data_dir", tiny_mnist, "--out_dir", disk, "--ckpt_interval", "1", "--sample_interval", "1000", *TINY]
    dcgan.main(["--max_iters", "1", *map(str, common)])  # how large a checkpoint is
    size = (disk / "ckpt.pt").stat().st_size
    shutil.rmtree(disk)
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2 // 4096 * 4096 + 65536}", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip() or 'mount failed'})")
    try:
        proc = run_script("dcgan.py", "--max_iters", "3", *common, check=False)  # the second save cannot fit beside the first
        assert "cannot save" in one_error_line(proc) and "previous checkpoint is kept" in proc.stderr
        assert sorted(p.name for p in disk.iterdir() if p.suffix == ".tmp") == []
        assert torch.load(disk / "ckpt.pt", weights_only=True)["step"] == 1
    finally:
        subprocess.run(["umount", str(disk)])


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


def test_nan_loss_stops_and_keeps_last_good_checkpoint(trained, data_dir, tmp_path):
    out = copy_of(trained, tmp_path)
    common = ["--data_dir", data_dir, "--out_dir", out, "--ckpt_interval", "2", "--log_interval", "2", *TINY]
    good = (out / "ckpt.pt").read_bytes()
    proc = run_script("dcgan.py", "--max_iters", "20", "--resume", "--lr", "1e30", *common, check=False)
    assert "non-finite loss" in one_error_line(proc)
    assert (out / "ckpt.pt").read_bytes() == good
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 6


def test_copied_alone_into_an_empty_folder_runs(tiny_mnist, tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(REPO / "dcgan.py", alone)
    shutil.copytree(tiny_mnist, alone / "data")
    run_script("dcgan.py", "--max_iters", "2", *TINY, cwd=alone)
    assert (alone / "out" / "dcgan" / "ckpt.pt").exists()


def numeric_flags(module):
    """(flag, 'int' or 'float') for every flag of the script's parser whose value is a number."""
    parsers, original = [], module.parse_run_flags
    module.parse_run_flags = lambda p, *a, **k: parsers.append(p) or original(p, *a, **k)
    try:
        module.get_args([])
    finally:
        module.parse_run_flags = original
    flags = []
    for action in parsers[0]._actions:
        if action.type is None or not action.option_strings or action.type is module.augment_policy:
            continue
        try:
            action.type("1.5")
            flags.append((action.option_strings[0], "float"))
        except Exception:  # int() refuses 1.5 (argparse.ArgumentTypeError or ValueError)
            flags.append((action.option_strings[0], "int"))
    return flags


class FirstRowWritten(Exception):
    pass


def test_every_numeric_flag_at_zero_negative_and_huge_runs_or_gives_one_line(tiny_mnist, tmp_path, capsys, monkeypatch):
    flags = numeric_flags(dcgan)
    assert {"--nz", "--lr", "--max_iters", "--ema_decay", "--batch_size", "--seed"} <= {f for f, _ in flags}
    base = ["--data_dir", str(tiny_mnist), "--max_iters", "2", "--sample_interval", "1", *TINY]
    original_write = dcgan.write_log_row

    def write_then_stop(*args):
        original_write(*args)
        raise FirstRowWritten

    for flag, kind in flags:
        for value in ("0", "-1", "1000000000" if kind == "int" else "1e9"):
            if flag == "--max_iters" and value == "1000000000":  # a valid, very long run: it trains and logs, no error
                with monkeypatch.context() as patch, pytest.raises(FirstRowWritten):
                    patch.setattr(dcgan, "write_log_row", write_then_stop)
                    dcgan.main([*base, flag, value, "--log_interval", "1", "--out_dir", str(tmp_path / "long")])
                assert "step 1/1000000000" in capsys.readouterr().out
                continue
            try:
                dcgan.main([*base, "--out_dir", str(tmp_path / f"{flag[2:]}{value}"), flag, value])
            except SystemExit as e:
                err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
                assert e.code != 0 and len(err) == 1 and err[0].startswith("dcgan.py: error:"), (flag, value, err)
