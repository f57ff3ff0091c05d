import inspect
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from conftest import REPO, flat_state, one_process_state, run_script

sys.path.insert(0, str(REPO))
import wgan  # noqa: E402
from evaluate import load_models  # noqa: E402

TINY = ["--nz", "8", "--ngf", "8", "--ndf", "8", "--batch_size", "16", "--device", "cpu"]


def config(**kw):
    base = dict(nz=16, ngf=16, ndf=16, channels=1, img_size=32, upsample="convtranspose", critic_norm="layer",
                mode="gp", gp_weight=10.0, clip=0.01, depth=None, leaky_slope=0.2)
    return {**base, **kw}


def read_log(out_dir):
    """The complete rows of log.jsonl (a run being killed may have half-written the last one)."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def main_error(capsys, *argv):
    """Run wgan.main in this process, expect it to stop with a non-zero exit; return its one stderr line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        wgan.main([str(a) for a in argv])
    assert stop.value.code != 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def one_thread():
    """In-process training with one thread, as run_script's subprocesses (OMP_NUM_THREADS=1): on a busy 2-core
    machine two spinning threads are many times slower, and the losses match those of the subprocesses exactly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- architecture --------------------------------------------------------------------------


@pytest.mark.parametrize("img_size", [32, 64])
def test_generator_and_critic_shapes(img_size):
    for norm in ("batch", "layer", "none"):
        models = wgan.build_models(config(img_size=img_size, channels=3, critic_norm=norm, ngf=4, ndf=4))
        x = models["G"](torch.randn(5, 16))
        assert x.shape == (5, 3, img_size, img_size) and x.min() >= -1 and x.max() <= 1
        assert models["D"](x).shape == (5,)


def test_critic_is_the_dcgan_discriminator_without_sigmoid():
    D = wgan.build_models(config(img_size=64, channels=3, ndf=64, critic_norm="batch"))["D"]
    convs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [64, 128, 256, 512, 1]
    assert [m.stride[0] for m in convs] == [2, 2, 2, 2, 1] and all(m.bias is None for m in convs)
    assert [type(m) for m in list(D)[:3]] == [nn.Conv2d, nn.LeakyReLU, nn.Conv2d]  # no norm on the input layer
    assert sum(isinstance(m, nn.BatchNorm2d) for m in D.modules()) == 3
    assert [type(m) for m in list(D)[-2:]] == [nn.Conv2d, nn.Flatten]  # an unbounded score: no sigmoid
    with torch.no_grad():
        D[-2].weight.mul_(1000)
        scores = D(torch.randn(8, 3, 64, 64))
    assert scores.abs().max() > 1
    # the generator is the DCGAN one of CIS 680 assignment 4, Table 2
    G = wgan.build_models(config(img_size=64, channels=3, ngf=128, nz=100))["G"]
    assert [m.out_channels for m in G.modules() if isinstance(m, nn.ConvTranspose2d)] == [1024, 512, 256, 128, 3]


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_depth_builds_the_csi5340_generator_and_critic(depth):
    # Critic: conv, LeakyReLU, (depth - 1) x (conv, norm, LeakyReLU), conv, LeakyReLU, linear to 1, no sigmoid
    for mode, norm, norm_type in (("clip", "batch", nn.BatchNorm2d), ("gp", "layer", nn.GroupNorm)):
        models = wgan.build_models(config(depth=depth, nz=100, ngf=8, ndf=8, mode=mode, critic_norm=norm))
        G, D = models["G"], models["D"]
        assert [type(m) for m in G] == ([nn.Unflatten] + [nn.ConvTranspose2d, nn.BatchNorm2d, nn.ReLU] * depth
                                        + [nn.ConvTranspose2d, nn.Tanh])
        assert [type(m) for m in D] == ([nn.Conv2d, nn.LeakyReLU] + [nn.Conv2d, norm_type, nn.LeakyReLU] * (depth - 1)
                                        + [nn.Conv2d, nn.LeakyReLU, nn.Flatten, nn.Linear, nn.Flatten])
    start, top = 32 // 2 ** depth, 8 * 2 ** (depth - 1)
    x = torch.randn(2, 100)
    shapes = []
    for layer in G:
        x = layer(x)
        if isinstance(layer, nn.ConvTranspose2d):
            shapes.append(tuple(x.shape[1:]))
    assert shapes == [(top // 2 ** i, start * 2 ** i, start * 2 ** i) for i in range(depth)] + [(1, 32, 32)]
    shapes = []
    for layer in D:
        x = layer(x)
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            shapes.append(tuple(x.shape[1:]))
    assert shapes == [(8 * 2 ** i, 16 // 2 ** i, 16 // 2 ** i) for i in range(depth)] + [(top, 1, 1), (1,)]
    assert x.shape == (2,)
    with torch.no_grad():  # an unbounded score
        D[-2].weight.mul_(1e4)
        assert D(torch.randn(8, 1, 32, 32)).abs().max() > 1


def test_without_depth_the_dcgan_tables_stay_and_leaky_slope_sets_the_critic():
    default = wgan.build_models(config())
    assert isinstance(default["D"], wgan.Critic) and not any(isinstance(m, nn.Linear) for m in default["D"].modules())
    deep = wgan.build_models(config(depth=3))
    assert isinstance(deep["D"], wgan.Critic) and isinstance(deep["D"][-2], nn.Linear)  # depth: a linear head
    assert {k: v.shape for k, v in deep["G"].state_dict().items()} == {k: v.shape for k, v in default["G"].state_dict().items()}
    assert abs(deep["D"][-2].weight.std().item() - 0.02) < 0.01  # the linear layer starts from N(0, 0.02) too
    for depth in (None, 2):
        for slope in (0.2, 0.1):
            D = wgan.build_models(config(depth=depth, leaky_slope=slope))["D"]
            assert {m.negative_slope for m in D.modules() if isinstance(m, nn.LeakyReLU)} == {slope}


def test_critic_norms():
    layer = wgan.build_models(config(critic_norm="layer"))["D"]
    norms = [m for m in layer.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 2 and all(m.num_groups == 1 for m in norms)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in layer.modules())
    # layer norm is per sample: a sample's score does not depend on the rest of the batch
    layer.train()
    x = torch.randn(6, 1, 32, 32)
    assert torch.allclose(layer(x)[:2], layer(x[:2]), atol=1e-6)
    h = nn.Sequential(*list(layer)[:3])(x)  # the output of the first normalised conv, before its GroupNorm
    flat = h.flatten(1)  # normalised over all of C x H x W, separately for each sample
    expected = (flat - flat.mean(1, keepdim=True)) / (flat.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    assert torch.allclose(layer[3](h).flatten(1), expected, atol=1e-5)
    none = wgan.build_models(config(critic_norm="none"))["D"]
    assert not any(isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)) for m in none.modules())
    assert [m.bias is not None for m in none.modules() if isinstance(m, nn.Conv2d)] == [False, True, True, False]


def test_losses_match_their_formulas():
    r, f = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-0.3, 1.2, -2.0])
    assert torch.allclose(wgan.critic_loss(r, f, torch.tensor(0.25), 10.0), f.mean() - r.mean() + 2.5)
    assert torch.allclose(wgan.generator_loss(f), -f.mean())


# --- the gradient penalty ------------------------------------------------------------------


class TinyCritic(nn.Module):
    """A 2-layer MLP critic on 1 x 4 x 4 inputs."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x).view(-1)


def finite_difference_penalty(critic, real, fake, eps, h=1e-5):
    """(||grad D(x_hat)|| - 1)^2 averaged over samples, the gradient by central differences, sample by sample."""
    x_hat = eps * real + (1 - eps) * fake
    penalties = []
    with torch.no_grad():
        for x in x_hat:
            basis = torch.eye(x.numel(), dtype=x.dtype).view(-1, *x.shape) * h
            grad = (critic(x + basis) - critic(x - basis)) / (2 * h)  # one coordinate per row of the batch
            penalties.append((grad.norm() - 1) ** 2)
    return torch.stack(penalties).mean()


@pytest.mark.parametrize("kind", ["mlp", "critic"])
def test_gradient_penalty_matches_finite_differences(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        critic, shape = TinyCritic().double(), (3, 1, 4, 4)
        with torch.no_grad():
            critic.net[1].weight.mul_(3)  # gradient norms well away from 1
    else:  # the real critic, layer norm: per-sample, so its penalty is defined
        critic, shape = wgan.build_models(config(ndf=2))["D"].double(), (2, 1, 32, 32)
        with torch.no_grad():
            critic[-2].weight.mul_(5)
    real, fake = torch.rand(shape, dtype=torch.float64) * 2 - 1, torch.rand(shape, dtype=torch.float64) * 2 - 1
    eps = torch.rand(shape[0], 1, 1, 1, dtype=torch.float64)
    penalty = wgan.gradient_penalty(critic, real, fake, eps)
    expected = finite_difference_penalty(critic, real, fake, eps)
    assert expected > 0.05
    assert abs(penalty.item() - expected.item()) < 1e-6 * max(1.0, expected.item())

    # the penalty is differentiable in the critic's weights (create_graph): check one weight by differences
    penalty.backward()
    weight = critic.net[1].weight if kind == "mlp" else critic[2].weight
    index, h = (0,) * weight.dim(), 1e-6

    def penalty_with_weight_shifted_by(delta):
        with torch.no_grad():
            weight[index] += delta
        value = wgan.gradient_penalty(critic, real, fake, eps).detach()
        with torch.no_grad():
            weight[index] -= delta
        return value

    numeric = (penalty_with_weight_shifted_by(h) - penalty_with_weight_shifted_by(-h)) / (2 * h)
    assert abs(weight.grad[index].item()) > 1e-4
    assert abs(weight.grad[index].item() - numeric.item()) < 1e-6 * max(1.0, abs(numeric.item()))


def test_interpolation_coefficient_is_per_sample():
    seen = []

    def recording_critic(x):
        seen.append(x.detach().clone())
        return x.flatten(1).sum(1)

    torch.manual_seed(1)
    real, fake = torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)
    wgan.gradient_penalty(recording_critic, real, fake)
    x_hat = seen[0]
    d, t = (x_hat - fake).flatten(1), (real - fake).flatten(1)
    coef = (d * t).sum(1) / (t * t).sum(1)  # x_hat - fake = coef * (real - fake), one coef per sample
    assert torch.allclose(d, coef[:, None] * t, atol=1e-5)  # on the segment (fails for one eps per pixel)
    assert (coef >= 0).all() and (coef <= 1).all()
    assert coef.std() > 0.05  # and a different point for each sample


PENALTY_SOURCE = '''def gradient_penalty(critic, real, fake, eps=None):
    """E[(||grad critic(x_hat)||_2 - 1)^2] at x_hat = eps x + (1 - eps) G(z) (Gulrajani et al. 2017, eq. 3), one
    eps ~ U(0, 1) per sample, so that x_hat lies on the segment between a real and a generated image."""
    if eps is None:
        eps = torch.rand(real.shape[0], *[1] * (real.dim() - 1), device=real.device)
    x_hat = (eps * real + (1 - eps) * fake.detach()).requires_grad_(True)
    grad, = torch.autograd.grad(critic(x_hat).float().sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(2, dim=1) - 1).pow(2).mean()
'''


def test_the_project_has_one_gradient_penalty():
    assert inspect.getsource(wgan.gradient_penalty) == PENALTY_SOURCE  # srgan.py holds the same copy


def quadratic_critic(x):
    """sum(x^2) per sample: its gradient 2 x depends on where x_hat lies, so a wrong eps changes the penalty (a linear
    critic's gradient is the same everywhere, and would pass with any eps)."""
    return x.flatten(1).pow(2).sum(1)


def penalty_by_hand(real, fake, eps):
    x_hat = eps * real + (1 - eps) * fake
    return ((2 * x_hat).flatten(1).norm(dim=1) - 1).pow(2).mean()


def test_gradient_penalty_of_a_quadratic_critic_by_hand():
    torch.manual_seed(0)
    real, fake = torch.rand(6, 2, 3, 3, dtype=torch.float64) + 0.5, torch.rand(6, 2, 3, 3, dtype=torch.float64) - 1.5
    eps = torch.rand(6, 1, 1, 1, dtype=torch.float64)
    assert torch.allclose(wgan.gradient_penalty(quadratic_critic, real, fake, eps), penalty_by_hand(real, fake, eps),
                          rtol=1e-12, atol=0)

    def matches_by_hand(penalty):
        """The penalty with its own eps equals the one by hand with eps ~ U(0, 1) drawn once per sample."""
        torch.manual_seed(1)
        value = penalty(quadratic_critic, real, fake)
        torch.manual_seed(1)
        return torch.allclose(value, penalty_by_hand(real, fake, torch.rand(6, 1, 1, 1)), rtol=1e-6, atol=0)

    def per_pixel(critic, real, fake):  # the common bug: one eps per pixel puts x_hat off the segment
        return wgan.gradient_penalty(critic, real, fake, torch.rand(real.shape))

    assert matches_by_hand(wgan.gradient_penalty)
    assert not matches_by_hand(per_pixel)


def test_penalty_under_bf16_autocast_is_float32():
    torch.manual_seed(0)
    critic = wgan.build_models(config(ndf=8))["D"]
    real, fake = torch.rand(4, 1, 32, 32) * 2 - 1, torch.rand(4, 1, 32, 32) * 2 - 1
    eps = torch.rand(4, 1, 1, 1)
    reference = wgan.gradient_penalty(critic, real, fake, eps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        penalty = wgan.gradient_penalty(critic, real, fake, eps)
    assert penalty.dtype == torch.float32
    assert abs(penalty.item() - reference.item()) < 0.05 * reference.item() + 1e-3
    penalty.backward()
    assert all(torch.isfinite(p.grad).all() for p in critic.parameters() if p.grad is not None)


# --- modes and their defaults --------------------------------------------------------------


def get_args_error(capsys, *argv):
    """get_args stops with one stderr line and a non-zero exit; the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        wgan.get_args(list(argv))
    assert stop.value.code != 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_mode_defaults(capsys):
    gp = wgan.get_args([])  # Gulrajani et al.'s, but for 2 critic updates at lr 2e-4 (docs/wgan.md)
    assert gp.mode == "gp" and gp.augment == ["translation"]
    assert (gp.lr, gp.beta1, gp.beta2, gp.n_critic, gp.gp_weight, gp.critic_norm, gp.max_iters) == (
        2e-4, 0.0, 0.9, 2, 10.0, "layer", 7000)
    clip = wgan.get_args(["--mode", "clip"])  # Arjovsky et al.'s
    assert (clip.lr, clip.clip, clip.n_critic, clip.critic_norm, clip.beta1, clip.beta2, clip.max_iters) == (
        5e-5, 0.01, 5, "batch", None, None, 4000)
    paper = wgan.get_args(["--n_critic", "5", "--lr", "1e-4", "--max_iters", "4000"])
    assert (paper.n_critic, paper.lr, paper.max_iters) == (5, 1e-4, 4000)
    assert wgan.get_args(["--lr", "3e-4"]).lr == 3e-4
    assert wgan.get_args(["--mode", "clip", "--lr", "2e-4"]).lr == 2e-4  # typed at gp's default: still the user's
    assert wgan.get_args(["--critic_norm", "none", "--beta1", "0.5"]).critic_norm == "none"
    # only the flags left unset (None) take the mode's defaults
    config = dict(mode="gp", lr=None, beta1=0.5, beta2=None, critic_norm="none")
    assert wgan.resolve_mode_defaults(config) is config
    assert config == dict(mode="gp", lr=2e-4, beta1=0.5, beta2=0.9, critic_norm="none", n_critic=2, max_iters=7000)
    assert wgan.resolve_mode_defaults(dict(mode="clip", lr=None, critic_norm=None, beta1=None, n_critic=3)) == dict(
        mode="clip", lr=5e-5, critic_norm="batch", beta1=None, n_critic=3, max_iters=4000)
    # a resumed run's defaults are its checkpoint's config, which the mode's defaults do not override
    resumed = wgan.get_args([], defaults=dict(vars(gp), lr=3e-4, beta1=0.5, critic_norm="none"))
    assert (resumed.lr, resumed.beta1, resumed.beta2, resumed.critic_norm) == (3e-4, 0.5, 0.9, "none")
    assert "Arjovsky" in get_args_error(capsys, "--mode", "clip", "--beta1", "0.5")
    assert "RMSprop" in get_args_error(capsys, "--mode", "clip", "--beta2", "0.9")
    assert "--critic_norm batch" in get_args_error(capsys, "--critic_norm", "batch")
    assert get_args_error(capsys, "--beta1", "1.5").startswith("wgan.py: error: argument --beta1: 1.5 is outside [0, 1)")
    with pytest.raises(SystemExit):
        wgan.get_args(["--help"])
    help_text = capsys.readouterr().out
    assert "Gulrajani" in help_text and "Arjovsky" in help_text and "weight bound" in help_text and "Zhao" in help_text
    args = wgan.get_args([])
    assert (args.augment, args.ema_decay, args.sample_interval, args.ckpt_interval) == (["translation"], 0.999, 500, 500)
    assert wgan.get_args(["--augment", "none"]).augment == []
    with pytest.raises(SystemExit):
        wgan.get_args(["--max_iter", "5"])  # no abbreviations: a typed flag is matched by name on --resume


def test_no_handout_file_names_reach_users():
    text = (REPO / "wgan.py").read_text()
    assert "seed 00" not in text
    for provenance in ("CIS 680", "CSI5340", "DLCV", "2018 image-generation", "handout table"):  # docs/handouts.md
        assert provenance not in text, provenance


def test_gp_with_batch_norm_is_refused(tiny_mnist, tmp_path, capsys):
    line = main_error(capsys, "--data_dir", tiny_mnist, "--critic_norm", "batch", "--out_dir", tmp_path / "o", *TINY)
    assert line.startswith("wgan.py: error:") and "per-sample gradient penalty" in line
    assert not (tmp_path / "o").exists()


# --- training runs -------------------------------------------------------------------------


def train(*argv):
    """wgan.main in this process (use with the one_thread fixture)."""
    wgan.main([str(a) for a in argv])


def test_clip_mode_critic_only_ever_sees_clipped_weights(tiny_mnist, tmp_path, monkeypatch, one_thread):
    clip, records = 0.01, []
    original = wgan.Critic.forward

    def recording_forward(self, x):
        records.append(max(p.abs().max().item() for p in self.parameters()))
        return original(self, x)

    monkeypatch.setattr(wgan.Critic, "forward", recording_forward)
    out = tmp_path / "clip"
    # a learning rate large enough that unclipped weights would leave the bound at once
    train("--mode", "clip", "--data_dir", tiny_mnist, "--out_dir", out, "--max_iters", 3, "--n_critic", 3,
          "--lr", 0.05, "--clip", clip, "--log_interval", 1, "--dtype", "float32", *TINY)
    assert len(records) == 3 * (3 * 2 + 1)  # each iteration: real and fake in 3 critic updates, then G's fakes
    assert records[0] > clip  # the initial weights (batch-norm scales near 1) are not clipped before the first update
    assert all(r <= clip for r in records[2:])  # after every update, clipped before the critic is used again
    assert max(records[2:]) == pytest.approx(clip)  # the bound is reached, so the clipping did something
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["lr"] == 0.05 and ckpt["config"]["critic_norm"] == "batch"
    bn = [k for k in ckpt["models"]["D"] if k.endswith(".weight") and ckpt["models"]["D"][k].dim() == 1]
    assert bn  # batch-norm scales are critic weights too, and they are clipped
    assert all(v.abs().max() <= clip for k, v in ckpt["models"]["D"].items() if v.is_floating_point() and "running" not in k)
    assert "square_avg" in ckpt["optimizers"]["D"]["state"][0]  # RMSprop
    rows = read_log(out)
    assert all(r["gp"] == 0 for r in rows) and len(rows) == 3


def test_one_generator_forward_per_critic_update(tiny_mnist, tmp_path, monkeypatch, one_thread):
    calls = []
    original = wgan.Generator.forward

    def recording_forward(self, z):
        calls.append((z.shape[0], torch.is_grad_enabled()))
        return original(self, z)

    monkeypatch.setattr(wgan.Generator, "forward", recording_forward)
    train("--data_dir", tiny_mnist, "--out_dir", tmp_path / "o", "--max_iters", 2, "--n_critic", 3, "--ema_decay", 0,
          "--dtype", "float32", *TINY)
    training = [grad for n, grad in calls if n == 16]  # the 36-image sample grid aside
    # fresh fakes for each critic update, the last with their graph, reused by G's update: none extra
    assert training == [False, False, True] * 2


def test_the_critic_sees_augmented_images_and_the_penalty_interpolates_them(tiny_mnist, tmp_path, monkeypatch, one_thread):
    augmented, penalised = [], []
    original_augment, original_penalty = wgan.diff_augment, wgan.gradient_penalty

    def recording_augment(x, policy):
        out = original_augment(x, policy)
        augmented.append((list(policy), x.requires_grad, x, out))
        return out

    def recording_penalty(critic, real, fake, eps=None):
        penalised.append((real, fake))
        return original_penalty(critic, real, fake, eps)

    monkeypatch.setattr(wgan, "diff_augment", recording_augment)
    monkeypatch.setattr(wgan, "gradient_penalty", recording_penalty)
    train("--data_dir", tiny_mnist, "--out_dir", tmp_path / "aug", "--max_iters", 1, "--n_critic", 2, "--dtype", "float32",
          *TINY)
    # real and fake in each of the 2 critic updates, then G's fakes, with their graph
    assert [(policy, grad) for policy, grad, _, _ in augmented] == [(["translation"], False)] * 4 + [(["translation"], True)]
    assert all(not torch.equal(x, out) for _, _, x, out in augmented)
    assert len(penalised) == 2
    for (real, fake), real_seen, fake_seen in zip(penalised, augmented[0:4:2], augmented[1:4:2]):
        assert real is real_seen[3] and fake is fake_seen[3]

    # the papers' plain training: nothing augmented, no averaged generator
    augmented.clear()
    out = tmp_path / "plain"
    train("--data_dir", tiny_mnist, "--out_dir", out, "--max_iters", 1, "--n_critic", 2, "--augment", "none", "--ema_decay", 0,
          "--dtype", "float32", *TINY)
    assert len(augmented) == 5 and all(policy == [] and x is y for policy, _, x, y in augmented)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["ema"] == {}
    G = load_models(wgan, ckpt, "cpu")["G"]
    assert all(torch.equal(v, G.state_dict()[k]) for k, v in ckpt["models"]["G"].items())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One run of wgan.py copied alone into an empty folder, beside tiny_mnist's data under data/, in a subprocess as a
    user would run it, with the default --data_dir and --out_dir; several tests read what it wrote."""
    import numpy as np
    alone = tmp_path_factory.mktemp("alone")
    shutil.copy(REPO / "wgan.py", alone)
    (alone / "data" / "mnist5k").mkdir(parents=True)
    for split, n in (("train", 256), ("test", 64)):  # as the tiny_mnist fixture makes them
        for suffix in ("", "_labels"):
            array = np.load(REPO / "data" / "mnist5k" / f"{split}{suffix}.npy")[::15][:n]
            np.save(alone / "data" / "mnist5k" / f"{split}{suffix}.npy", array)
    run_script("wgan.py", "--max_iters", "6", "--log_interval", "2", "--sample_interval", "3", "--ckpt_interval", "3",
               "--n_critic", "2", "--dtype", "float32", *TINY, cwd=alone)
    return alone


def test_copied_alone_into_an_empty_folder_runs(trained):
    assert (trained / "out" / "wgan" / "ckpt.pt").exists()


def test_training_writes_every_output(trained, monkeypatch):
    monkeypatch.chdir(trained)  # the run's relative --data_dir and --out_dir
    out = trained / "out" / "wgan"
    for name in ("ckpt.pt", "log.jsonl", "config.json", "samples/step_000003.png", "samples/step_000006.png"):
        assert (out / name).exists(), name
    rows = read_log(out)
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert {"loss_D", "wasserstein", "gp", "loss_G", "ms_per_step", "images_per_s"} <= set(rows[0])
    for r in rows:  # loss_D = -W + lambda * gp, all averaged over the same critic steps
        assert r["loss_D"] == pytest.approx(-r["wasserstein"] + 10 * r["gp"], rel=1e-4, abs=1e-5)
        assert r["gp"] > 0
        assert r["images_per_s"] == pytest.approx(2 * 16 * 1000 / r["ms_per_step"])  # n_critic batches through D a step
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["script"] == "wgan" and ckpt["step"] == 6 and ckpt["config"]["channels"] == 1
    assert ckpt["config"]["mode"] == "gp" and tuple(ckpt["optimizers"]["D"]["param_groups"][0]["betas"]) == (0.0, 0.9)
    assert "exp_avg" in ckpt["optimizers"]["D"]["state"][0]  # Adam
    models = load_models(wgan, ckpt, "cpu")
    assert not models["G"].training and not models["D"].training
    images = wgan.generate(models, wgan.sample_latent(ckpt["config"], 4, "cpu"))
    assert images.shape == (4, 1, 32, 32) and 0 <= images.min() and images.max() <= 1
    real, labels = wgan.real_images(ckpt["config"], "test")
    assert real.shape == (64, 1, 32, 32) and real.dtype == torch.uint8 and labels.shape == (64,)
    with pytest.raises(ValueError, match="not a format-2 wgan checkpoint"):
        load_models(wgan, {**ckpt, "script": "dcgan"}, "cpu")
    from PIL import Image
    assert Image.open(out / "samples/step_000006.png").size == (6 * 34 + 2, 6 * 34 + 2)  # 6x6 grid, 2 px padding


def test_saved_ema_batchnorm_stats_belong_to_the_averaged_weights(trained):
    ckpt = torch.load(trained / "out" / "wgan" / "ckpt.pt", weights_only=True)
    G = load_models(wgan, ckpt, "cpu")["G"]  # the averaged weights with their saved statistics
    saved = {k: v.clone() for k, v in G.state_dict().items() if "running" in k}
    config = ckpt["config"]
    wgan.update_bn(wgan.fixed_randn(config["seed"] + 1, 10, config["batch_size"], config["nz"]), G)  # replayed
    for key, value in saved.items():
        assert torch.allclose(value, G.state_dict()[key], atol=1e-5), key
        assert not torch.allclose(value, ckpt["models"]["G"][key], atol=1e-3), key  # not the trained G's statistics


def test_the_averaged_generator_is_saved_used_for_grids_and_loaded(trained, tmp_path):
    import numpy as np
    from PIL import Image
    from torchvision.utils import save_image
    out = trained / "out" / "wgan"
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ema, trained_G = ckpt["ema"]["G"], ckpt["models"]["G"]
    assert ema.keys() == trained_G.keys()
    assert not torch.equal(ema["1.weight"], trained_G["1.weight"])
    assert not torch.equal(ema["2.running_mean"], trained_G["2.running_mean"])  # statistics of its own
    G = load_models(wgan, ckpt, "cpu")["G"]
    assert all(torch.equal(v, G.state_dict()[k]) for k, v in ema.items())  # evaluate.py and interpolate.py get it

    def grid_of(generator):
        with torch.no_grad():
            fixed_noise = wgan.fixed_randn(ckpt["config"]["seed"], 36, ckpt["config"]["nz"])
            save_image(generator(fixed_noise).add(1).div(2), tmp_path / "grid.png", nrow=6, padding=2)
        return np.asarray(Image.open(tmp_path / "grid.png")).astype(int)

    saved = np.asarray(Image.open(out / "samples/step_000006.png")).astype(int)
    assert np.abs(saved - grid_of(G)).max() <= 1  # the grid is the averaged generator's
    plain = wgan.build_models(ckpt["config"])["G"]
    plain.load_state_dict(trained_G)
    assert np.abs(saved - grid_of(plain.eval())).max() > 16


def test_bfloat16_trains(tiny_mnist, tmp_path, one_thread):
    rows = {}
    for dtype in ("float32", "bfloat16"):
        train("--data_dir", tiny_mnist, "--out_dir", tmp_path / dtype, "--max_iters", 3, "--n_critic", 2, "--log_interval", 1,
              "--dtype", dtype, *TINY)
        rows[dtype] = read_log(tmp_path / dtype)
    assert len(rows["bfloat16"]) == 3
    assert all(math.isfinite(r[k]) for r in rows["bfloat16"] for k in ("loss_D", "wasserstein", "gp", "loss_G"))
    first_bf16, first_fp32 = rows["bfloat16"][0], rows["float32"][0]
    assert first_bf16["loss_D"] != first_fp32["loss_D"]  # autocast did compute in bfloat16
    assert first_bf16["loss_D"] == pytest.approx(first_fp32["loss_D"], rel=0.05)  # the same step, to bf16's precision
    assert first_bf16["gp"] == pytest.approx(first_fp32["gp"], rel=0.05)
    ckpt = torch.load(tmp_path / "bfloat16" / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["dtype"] == "bfloat16"
    assert all(v.dtype == torch.float32 for group in (ckpt["models"]["G"], ckpt["ema"]["G"]) for v in group.values() if v.is_floating_point())


def test_sigkill_then_resume_gives_identical_losses_and_weights(tiny_mnist, tmp_path, one_thread):
    common = ["--data_dir", str(tiny_mnist), "--log_interval", "1", "--ckpt_interval", "5", "--sample_interval", "1000",
              "--n_critic", "2", "--dtype", "float32", *TINY]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "wgan.py", "--out_dir", killed, "--max_iters", "100000", *common],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:  # the straight run trains here while the process to kill starts up
        wgan.main(["--out_dir", str(straight), "--max_iters", "20", *common])
        expected = {r["step"]: (r["loss_D"], r["gp"], r["loss_G"]) for r in read_log(straight)}
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (killed / "ckpt.pt").exists() and (killed / "log.jsonl").exists() and len(read_log(killed)) >= 12:
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved_step = torch.load(killed / "ckpt.pt", weights_only=True)["step"]
    assert saved_step >= 10 and saved_step % 5 == 0

    wgan.main(["--out_dir", str(killed), "--max_iters", "20", "--resume", *common])
    rows = read_log(killed)
    assert [r["step"] for r in rows] == list(range(1, 21))  # lines after the checkpoint were replaced, not duplicated
    for r in rows:  # the penalty's random eps and the augmentations included
        assert (r["loss_D"], r["gp"], r["loss_G"]) == expected[r["step"]], r["step"]
    a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (straight, killed))
    assert a["step"] == b["step"] == 20
    for part in ("ema", "models"):
        for name in a[part]:
            assert a[part][name].keys() == b[part][name].keys()
            assert all(torch.equal(v, b[part][name][k]) for k, v in a[part][name].items()), (part, name)


def test_resume_between_log_lines_gives_the_same_log(tiny_mnist, tmp_path, monkeypatch, one_thread):
    common = ["--data_dir", tiny_mnist, "--max_iters", 8, "--log_interval", 4, "--ckpt_interval", 3, "--sample_interval", 1000,
              "--n_critic", 2, "--dtype", "float32", *TINY]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train("--out_dir", straight, *common)
    original = wgan.save_checkpoint

    def save_then_stop(config, step, *rest):  # a run killed just after its checkpoint at step 3, between log lines 0 and 4
        original(config, step, *rest)
        if step == 3:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(wgan, "save_checkpoint", save_then_stop)
        train("--out_dir", stopped, *common)
    assert torch.load(stopped / "ckpt.pt", weights_only=True)["log_window"]["steps"] == 3
    train("--out_dir", stopped, "--resume", *common)

    def losses(out):
        return [(r["step"], r["loss_D"], r["wasserstein"], r["gp"], r["loss_G"]) for r in read_log(out)]

    assert [row[0] for row in losses(straight)] == [4, 8]
    assert losses(stopped) == losses(straight)  # step 4's line averages steps 1-3 of the first run and 4 of the second


def test_resume_takes_typed_flags_even_at_their_default_and_refuses_fixed_ones(tiny_mnist, tmp_path, capsys, one_thread):
    out = tmp_path / "o"
    common = ["--data_dir", tiny_mnist, "--out_dir", out, "--n_critic", 1, *TINY]
    train("--max_iters", 2, "--log_interval", 1, *common)
    saved = {name: (out / name).read_bytes() for name in ("ckpt.pt", "log.jsonl", "config.json")}
    line = main_error(capsys, "--max_iters", 4, "--resume", *common, "--nz", 16)
    assert "--nz cannot change in a resumed run" in line and "8" in line
    assert {name: (out / name).read_bytes() for name in saved} == saved  # nothing touched
    train("--max_iters", 4, "--resume", "--log_interval", 100, *common)  # 100 is the default, typed: it counts
    assert [r["step"] for r in read_log(out)] == [1, 2, 4]
    assert torch.load(out / "ckpt.pt", weights_only=True)["config"]["log_interval"] == 100


def test_csi5340_depth_run_saves_its_flags_reloads_and_resumes(tiny_mnist, tmp_path, capsys, one_thread):
    out = tmp_path / "o"
    common = ["--data_dir", tiny_mnist, "--out_dir", out, "--n_critic", 1, "--depth", 2, "--leaky_slope", 0.1, *TINY]
    for mode, norm in (("clip", nn.BatchNorm2d), ("gp", nn.GroupNorm)):  # the handout's batch norm, and layer norm with the penalty
        train("--max_iters", 2, "--mode", mode, *common, "--out_dir", out / mode)
        ckpt = torch.load(out / mode / "ckpt.pt", weights_only=True)
        assert (ckpt["config"]["depth"], ckpt["config"]["leaky_slope"]) == (2, 0.1)
        models = load_models(wgan, ckpt, "cpu")
        assert isinstance(models["D"], wgan.Critic) and isinstance(models["D"][-2], nn.Linear)
        assert any(isinstance(m, norm) for m in models["D"].modules())
        assert wgan.generate(models, wgan.sample_latent(ckpt["config"], 3, "cpu")).shape == (3, 1, 32, 32)
    line = main_error(capsys, "--max_iters", 3, "--resume", *common, "--out_dir", out / "gp", "--depth", 3)
    assert "--depth cannot change in a resumed run" in line
    train("--max_iters", 3, "--resume", *common, "--out_dir", out / "gp")
    assert torch.load(out / "gp" / "ckpt.pt", weights_only=True)["step"] == 3
    assert "multiple of 2^depth = 8" in main_error(capsys, *common, "--img_size", 28, "--depth", 3, "--out_dir", out / "bad")
    assert "argument --leaky_slope: 1.5 is outside [0, 1)" in main_error(capsys, *common, "--leaky_slope", 1.5,
                                                                         "--out_dir", out / "bad")


DDP_GRADIENT_CHECK = r'''
import os, sys, torch
sys.path.insert(0, sys.argv[1])
import wgan
from torch.nn.parallel import DistributedDataParallel as DDP
# a store of its own, next to torchrun's: wgan.main then joins torchrun's as if it ran alone (a second group on the
# same store can read the first one's stale keys)
torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{int(os.environ['MASTER_PORT']) + 1}",
                                     rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
rank = torch.distributed.get_rank()
torch.manual_seed(0)
D = wgan.build_models(dict(nz=8, ngf=4, ndf=4, channels=1, img_size=32, upsample="convtranspose", critic_norm="layer",
                           depth=None, leaky_slope=0.2))["D"].double()
real, fake = torch.rand(8, 1, 32, 32, dtype=torch.float64), torch.rand(8, 1, 32, 32, dtype=torch.float64)
eps = torch.rand(8, 1, 1, 1, dtype=torch.float64)
def loss(critic, part):
    penalty = wgan.gradient_penalty(critic, real[part], fake[part], eps[part])
    return wgan.critic_loss(critic(real[part]), critic(fake[part]), penalty, 10.0)
loss(D, slice(None)).backward()
whole_batch = [p.grad.clone() for p in D.parameters()]
D.zero_grad()
ddp = DDP(D)  # kept alive through backward: its hooks do the all-reduce
loss(ddp, slice(4 * rank, 4 * rank + 4)).backward()
assert all(torch.allclose(p.grad, g, atol=1e-12) for p, g in zip(D.parameters(), whole_batch)), "DDP gradients differ"
del ddp  # a DDP reducer still alive when the process group goes can abort the process at exit
torch.distributed.destroy_process_group()
print(f"rank {rank}: DDP gradients are the whole batch's", flush=True)
states, original_restore = [], wgan.restore  # then train, as `torchrun wgan.py ARGS` does, in a group of its own,
wgan.restore = lambda ckpt, config, state, *a: states.append(state) or original_restore(ckpt, config, state, *a)
wgan.main(sys.argv[2:])  # and save what this rank trained: weights, EMA and optimizer state
torch.save({group: {name: obj.state_dict() for name, obj in objects.items()} for group, objects in states[0].items()},
           sys.argv[sys.argv.index("--out_dir") + 1] + f"/state_rank{rank}.pt")
'''


def torchrun(*args, port):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", *map(str, args)],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)


def test_torchrun_two_processes(tiny_mnist, tmp_path, monkeypatch):
    # the penalty's double backward through DDP gives the gradient of the whole batch; then wgan.main trains under DDP
    # and both ranks end with the same networks, EMA and optimizer states, unlike one process with the same global
    # batch (one torchrun launch: each starts three processes that import torch, tens of seconds on a busy machine)
    (tmp_path / "ddp_check.py").write_text(DDP_GRADIENT_CHECK)
    out, common = tmp_path / "ddp", ["--data_dir", tiny_mnist, "--max_iters", "3", "--log_interval", "1", "--n_critic",
                                     "2", "--dtype", "bfloat16", *TINY]  # CPU autocast: bf16 + DDP + penalty
    proc = torchrun(tmp_path / "ddp_check.py", REPO, "--out_dir", out, *common, port=29871)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(f"rank {rank}: DDP gradients are the whole batch's" in proc.stdout for rank in (0, 1)), proc.stdout[-3000:]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3
    assert not any(k.startswith("module.") for k in ckpt["models"]["D"])  # saved without the DDP wrapper
    assert ckpt["ema"]["G"].keys() == ckpt["models"]["G"].keys()
    rows = read_log(out)
    assert len(rows) == 3 and all(r["gp"] > 0 and abs(r["loss_D"]) < 1e3 for r in rows)  # only rank 0 writes
    rank0, rank1 = (flat_state(torch.load(out / f"state_rank{r}.pt", weights_only=True)) for r in (0, 1))
    assert {".".join(k.split(".")[:2]) for k in rank0} == {"models.G", "models.D", "optimizers.G", "optimizers.D", "ema.G"}
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    single = one_process_state(monkeypatch, wgan, lambda: wgan.main([str(a) for a in ["--out_dir", tmp_path / "alone", *common]]))
    for network in ("models.G", "models.D"):
        assert any(not torch.equal(single[k], rank0[k]) for k in rank0 if k.startswith(network)), network


# --- checkpoints and bad input -------------------------------------------------------------


def test_missing_dataset_names_prepare_command(tmp_path, capsys):
    line = main_error(capsys, "--data_dir", tmp_path, "--dataset", "celeba", "--out_dir", tmp_path / "o")
    assert "python " in line and "celeba/prepare.py" in line


def test_unsupported_image_size_and_bad_flags(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "o"
    assert "--img_size 48" in main_error(capsys, "--data_dir", tiny_mnist, "--img_size", "48", "--out_dir", out)
    assert "argument --clip: -0.01 is outside (0, inf]" in main_error(capsys, "--data_dir", tiny_mnist, "--mode", "clip",
                                                                      "--clip", "-0.01", "--out_dir", out)
    assert "RMSprop" in main_error(capsys, "--data_dir", tiny_mnist, "--mode", "clip", "--beta1", "0.5", "--out_dir", out)
    assert "--beta2: 1.0 is outside [0, 1)" in main_error(capsys, "--data_dir", tiny_mnist, "--beta2", "1.0", "--out_dir", out)
    assert "--ema_decay: 1.0 is outside [0, 1)" in main_error(capsys, "--data_dir", tiny_mnist, "--ema_decay", "1.0",
                                                              "--out_dir", out)
    assert "--augment: flip: use none or a comma list" in main_error(capsys, "--data_dir", tiny_mnist, "--augment", "flip",
                                                                      "--out_dir", out)
    assert not out.exists()


def test_zero_or_negative_sizes_and_counts(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "o"
    for flag, value in [("--batch_size", 0), ("--max_iters", -1), ("--log_interval", 0), ("--sample_interval", 0),
                        ("--ckpt_interval", -5), ("--nz", 0), ("--ngf", 0), ("--ndf", -2), ("--n_critic", 0), ("--lr", 0.0),
                        ("--gp_weight", -1.0)]:
        line = main_error(capsys, "--data_dir", tiny_mnist, "--out_dir", out, "--max_iters", 1, "--n_critic", 1, *TINY, flag, value)
        assert line.startswith(f"wgan.py: error: argument {flag}: {value} is outside"), line
    assert not out.exists()


def test_unwritable_out_dir_and_checkpoint(tiny_mnist, tmp_path, capsys, one_thread):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert "cannot write to --out_dir" in main_error(capsys, "--data_dir", tiny_mnist, "--out_dir", blocker / "o", *TINY)
    if os.geteuid() != 0:  # permissions do not bind root
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "cannot write to --out_dir" in main_error(capsys, "--data_dir", tiny_mnist, "--out_dir", locked, *TINY)
    # the checkpoint cannot be written (here ckpt.pt is a folder in the way)
    out = tmp_path / "o"
    (out / "ckpt.pt").mkdir(parents=True)
    line = main_error(capsys, "--data_dir", tiny_mnist, "--out_dir", out, "--max_iters", 1, "--n_critic", 1, *TINY)
    assert "cannot save" in line and "previous checkpoint is kept" in line
    assert (out / "ckpt.pt").is_dir() and not (out / "ckpt.pt.tmp").exists()


def test_corrupt_foreign_or_old_checkpoint_to_resume(tiny_mnist, tmp_path, capsys, one_thread):
    out = tmp_path / "o"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"not a checkpoint at all")
    assert "cannot read checkpoint" in main_error(capsys, "--data_dir", tiny_mnist, "--out_dir", out, "--resume", *TINY)
    assert (out / "ckpt.pt").read_bytes() == b"not a checkpoint at all"
    torch.save({"script": "dcgan", "format": 1}, out / "dcgan.pt")
    assert "is not a format-2 wgan checkpoint" in main_error(capsys, "--data_dir", tiny_mnist, "--out_dir", out,
                                                             "--resume", out / "dcgan.pt", *TINY)
    # a checkpoint of an older wgan.py (format 1): refused on --resume and by load_models, and left as it is
    old = tmp_path / "old"
    train("--data_dir", tiny_mnist, "--out_dir", old, "--max_iters", 1, "--n_critic", 1, "--dtype", "float32", *TINY)
    ckpt = torch.load(old / "ckpt.pt", weights_only=True)
    load_models(wgan, ckpt, "cpu")  # format 2 loads
    torch.save({**ckpt, "format": 1}, old / "ckpt.pt")
    saved = (old / "ckpt.pt").read_bytes()
    line = main_error(capsys, "--data_dir", tiny_mnist, "--out_dir", old, "--resume", "--max_iters", 2, *TINY)
    assert line.startswith("wgan.py: error: --resume:") and "is not a format-2 wgan checkpoint" in line
    assert (old / "ckpt.pt").read_bytes() == saved and [r["step"] for r in read_log(old)] == [1]
    with pytest.raises(ValueError, match="not a format-2 wgan checkpoint"):
        load_models(wgan, {**ckpt, "format": 1}, "cpu")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_mnist, tmp_path, capsys, one_thread):
    out = tmp_path / "o"
    common = ["--data_dir", tiny_mnist, "--out_dir", out, "--ckpt_interval", "2", "--log_interval", "2", "--n_critic", "2", *TINY]
    wgan.main([str(a) for a in ["--max_iters", "2", *common]])
    good = (out / "ckpt.pt").read_bytes()
    assert "non-finite loss" in main_error(capsys, "--max_iters", "20", "--resume", "--lr", "1e30", *common)
    assert (out / "ckpt.pt").read_bytes() == good
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2


def test_non_finite_weights_never_reach_a_checkpoint(tiny_mnist, tmp_path, monkeypatch, capsys, one_thread):
    # step 3's losses come before its updates; G's update then leaves NaN weights, which only the weights' check sees
    out = tmp_path / "o"
    common = ["--data_dir", tiny_mnist, "--out_dir", out, "--ckpt_interval", 1, "--log_interval", 100, "--n_critic", 1, *TINY]
    train("--max_iters", 2, *common)
    good = (out / "ckpt.pt").read_bytes()
    original = wgan.update_ema

    def poisoning_update(ema, G, decay):
        with torch.no_grad():
            next(G.parameters()).fill_(float("nan"))
        original(ema, G, decay)

    monkeypatch.setattr(wgan, "update_ema", poisoning_update)
    assert "non-finite loss or weights by step 3" in main_error(capsys, "--max_iters", 3, "--resume", *common)
    assert (out / "ckpt.pt").read_bytes() == good


def poison_d_batchnorm(monkeypatch):
    """Every forward of D's first batch norm leaves NaN in its running variance only: in train mode it normalises with
    the batch's statistics, so D's scores, the losses and all weights stay finite."""
    original = wgan.build_models

    def build_models(config):
        models = original(config)
        norm = next(m for m in models["D"].modules() if isinstance(m, nn.BatchNorm2d))
        norm.register_forward_hook(lambda module, inputs, output: setattr(  # a new tensor: autograd saved the old one
            module, "running_var", torch.full_like(module.running_var, float("nan"))))
        return models

    monkeypatch.setattr(wgan, "build_models", build_models)


def poison_ema_weights(monkeypatch):
    original = wgan.update_ema

    def update_ema(ema, G, decay):
        original(ema, G, decay)
        with torch.no_grad():
            next(ema.parameters()).fill_(float("nan"))

    monkeypatch.setattr(wgan, "update_ema", update_ema)


def poison_ema_batchnorm_statistics(monkeypatch):
    original = wgan.update_bn

    def update_bn(loader, model):
        original(loader, model)
        next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).running_mean.fill_(float("nan"))

    monkeypatch.setattr(wgan, "update_bn", update_bn)


@pytest.mark.parametrize("poison,mode", [(poison_d_batchnorm, "clip"), (poison_ema_weights, "gp"),
                                         (poison_ema_batchnorm_statistics, "gp")])
def test_non_finite_values_anywhere_in_a_checkpoint_stop_the_run(poison, mode, tiny_mnist, tmp_path, monkeypatch, capsys,
                                                                 one_thread):
    out = tmp_path / "o"
    common = ["--data_dir", tiny_mnist, "--out_dir", out, "--mode", mode, "--n_critic", 1, "--dtype", "float32", *TINY]
    train("--max_iters", 1, *common)  # a good checkpoint first, then the poisoned run resumes from it
    good = (out / "ckpt.pt").read_bytes()
    poison(monkeypatch)
    line = main_error(capsys, "--max_iters", 3, "--ckpt_interval", 2, "--log_interval", 1, "--resume", *common)
    assert line == (f"wgan.py: error: non-finite loss or weights by step 2; the last good checkpoint in {out} is kept; "
                    f"try a lower --lr")
    assert (out / "ckpt.pt").read_bytes() == good and not (out / "ckpt.pt.tmp").exists()
    fresh = tmp_path / "fresh"  # a new run writes none
    assert "non-finite" in main_error(capsys, "--max_iters", 1, *common, "--out_dir", fresh)
    assert not (fresh / "ckpt.pt").exists()


@pytest.mark.parametrize("mode", ["gp", "clip"])
def test_the_critic_is_frozen_during_the_generator_update(mode, tiny_mnist, tmp_path, monkeypatch, one_thread):
    built, steps = {}, []
    original = wgan.build_models
    monkeypatch.setattr(wgan, "build_models", lambda config: built.update(original(config)) or built)

    def record(optimizer, args, kwargs):  # D's gradients and requires_grad as each optimizer is about to step
        name = "G" if optimizer.param_groups[0]["params"][0] is next(built["G"].parameters()) else "D"
        D = list(built["D"].parameters())
        steps.append((name, [p.grad.clone() for p in D], [p.requires_grad for p in D]))

    handle = register_optimizer_step_pre_hook(record)
    try:
        train("--data_dir", tiny_mnist, "--out_dir", tmp_path / "o", "--mode", mode, "--max_iters", 2, "--n_critic", 2,
              "--dtype", "float32", *TINY)
    finally:
        handle.remove()
    assert [name for name, _, _ in steps] == ["D", "D", "G"] * 2
    for (_, d_grads, d_trainable), (_, g_grads, g_trainable) in zip(steps[1::3], steps[2::3]):
        assert all(d_trainable) and not any(g_trainable)  # frozen for G's update only
        assert any(g.abs().sum() > 0 for g in d_grads)
        # G's backward went through D but left D's gradients (those of D's last update) as they were
        assert all(torch.equal(a, b) for a, b in zip(d_grads, g_grads))


@pytest.mark.parametrize("slower,chosen", [("bfloat16", "float32"), ("float32", "bfloat16")])
def test_dtype_auto_on_a_cpu_times_a_trial_step(slower, chosen, tiny_mnist, tmp_path, monkeypatch, one_thread):
    trials = []

    def time_trial(step, device, dtype):
        rng = torch.get_rng_state()
        step()  # a forward and backward of copies of the networks, on fixed inputs
        assert torch.equal(torch.get_rng_state(), rng)  # the training stream untouched
        trials.append(dtype)
        return 20.0 if dtype == slower else 10.0

    monkeypatch.setattr(wgan, "cpu_computes_bfloat16", lambda: True)
    monkeypatch.setattr(wgan, "time_trial", time_trial)
    common = ["--data_dir", tiny_mnist, "--max_iters", 2, "--n_critic", 2, *TINY]
    train("--out_dir", tmp_path / "auto", *common)
    config = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert sorted(trials) == ["bfloat16", "float32"]
    assert (config["dtype"], config["precision"]) == ("auto", chosen)
    assert config["dtype_trial_ms"] == {"float32": 10.0 if slower == "bfloat16" else 20.0, "bfloat16": 20.0 if slower
                                        == "bfloat16" else 10.0}
    # the trial runs on copies of the networks: the run is the one that --dtype <chosen> trains
    train("--out_dir", tmp_path / "typed", *common, "--dtype", chosen)
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("auto", "typed"))
    for group in ("models", "ema"):
        for name in a[group]:
            assert all(torch.equal(v, b[group][name][k]) for k, v in a[group][name].items()), (group, name)


INT_FLAGS = ["img_size", "depth", "nz", "ngf", "ndf", "n_critic", "batch_size", "max_iters", "log_interval",
             "sample_interval", "ckpt_interval", "seed"]
FLOAT_FLAGS = ["leaky_slope", "clip", "gp_weight", "lr", "beta1", "beta2", "ema_decay"]


def test_fuzzed_numbers_end_a_run_or_give_one_line(tiny_mnist, tmp_path, capsys, one_thread):
    """0, -1 and 1e9 for every int and float flag: a run that ends normally, or one stderr line and a non-zero exit."""
    numeric = {k for k, v in vars(wgan.get_args([])).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric | {"depth"} == set(INT_FLAGS + FLOAT_FLAGS)  # every int and float flag (--depth is unset by default)
    outcomes = {}
    for i, (flag, value) in enumerate((f, v) for f in INT_FLAGS + FLOAT_FLAGS for v in ("0", "-1", "1e9")):
        argv = ["--data_dir", str(tiny_mnist), "--out_dir", str(tmp_path / str(i)), "--max_iters", "2", "--n_critic", "1",
                "--sample_interval", "2", "--dtype", "float32", *TINY, *(["--mode", "clip"] if flag == "clip" else []),
                f"--{flag}", value]
        capsys.readouterr()
        try:
            wgan.main(argv)
            outcomes[flag, value] = "ran"
        except SystemExit as stop:
            lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
            assert stop.code != 0 and len(lines) == 1 and lines[0].startswith("wgan.py: error: "), (flag, value, lines)
            outcomes[flag, value] = "refused"
    assert outcomes["nz", "0"] == outcomes["max_iters", "1e9"] == outcomes["lr", "-1"] == "refused"
    assert outcomes["seed", "-1"] == outcomes["beta1", "0"] == outcomes["ema_decay", "0"] == "ran"
