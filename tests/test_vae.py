import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import DDP_STATE_PROBE, REPO, flat_state, make_tiny_mnist, one_process_state, run_script

sys.path.insert(0, str(REPO))
import vae  # noqa: E402
from evaluate import load_models  # noqa: E402

TINY = ["--hidden", "32", "--latent_dim", "4", "--batch_size", "16", "--device", "cpu"]
TINY_CONV = ["--arch", "conv", "--img_size", "32", "--depth", "2", "--width", "4", "--latent_dim", "4", "--batch_size", "16", "--device", "cpu"]


def config(**kw):
    base = dict(channels=1, img_size=28, arch="mlp", hidden=400, latent_dim=20, depth=4, width=32, h_dim=1024,
                upsample="convtranspose", recon="bce", mixture=1, flow="none", flow_length=2, flow_hidden=0)
    return {**base, **kw}


def read_log(out_dir):
    """The complete rows of log.jsonl (a run being killed may have half-written the last one)."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def mnist_batch(n=32, size=28):
    images, _ = vae.load_images(str(REPO / "data"), "mnist5k", "test", size)
    return vae.to_unit_interval(images[:n])


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: in-process runs on one thread


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory):
    """conftest's tiny_mnist made once, for the tests that only read it."""
    return make_tiny_mnist(tmp_path_factory.mktemp("shared"))


BASE_FLAGS = ["--max_iters", "2", "--lr", "1e-3", "--ckpt_interval", "2", "--log_interval", "2", "--dtype", "float32",
              *TINY]


@pytest.fixture(scope="module")
def base_run(shared_data, tmp_path_factory):
    """One tiny MLP run on shared_data, trained once: the earlier run that several tests resume (BASE_FLAGS)."""
    out = tmp_path_factory.mktemp("base") / "o"
    return trained(["--data_dir", str(shared_data), "--out_dir", str(out), *BASE_FLAGS])


DTYPE_FLAGS = ["--max_iters", "3", "--log_interval", "1", "--recon", "dlogistic", *TINY_CONV]


@pytest.fixture(scope="module")
def dtype_runs(shared_data, tmp_path_factory):
    """{dtype: out_dir} of a conv run (DTYPE_FLAGS) under --dtype float32 and under --dtype bfloat16."""
    root = tmp_path_factory.mktemp("dtypes")
    return {dtype: trained(["--data_dir", str(shared_data), "--out_dir", str(root / dtype), "--dtype", dtype,
                            *DTYPE_FLAGS]) for dtype in ("float32", "bfloat16")}


def trained(argv):
    """vae.main(argv) for a module-scoped fixture -> its out_dir."""
    vae.main(argv)
    return Path(argv[argv.index("--out_dir") + 1])


def copy_of(run, tmp_path):
    """A copy of a run's out_dir, to resume or damage without touching the original."""
    return shutil.copytree(run, tmp_path / "o")


# --- architecture --------------------------------------------------------------------------


def test_defaults_follow_the_handouts():
    args = vae.get_args([])
    assert (args.arch, args.dataset, args.img_size, args.hidden, args.latent_dim) == ("mlp", "mnist5k", 28, 400, 20)
    assert (args.recon, args.kl_weight, args.batch_size, args.lr, args.beta1, args.iw_k) == ("bce", 1.0, 64, 2e-4, 0.5, 1)
    assert (args.sample_interval, args.ckpt_interval, args.max_iters) == (2000, 2000, 20000)
    assert vae.get_args(["--arch", "conv"]).img_size == 32
    assert not hasattr(args, "latent_map") and not hasattr(args, "map_attr")  # the latent map is interpolate.py's


def test_mlp_is_table_1():
    # CIS 680 Table 1: 784 - 400 - (20, 20) - 400 - 784, sigmoid output
    models = vae.build_models(config())
    shapes = lambda m: [(l.in_features, l.out_features) for l in m.modules() if isinstance(l, nn.Linear)]
    assert shapes(models["encoder"]) == [(784, 400), (400, 20), (400, 20)]
    assert shapes(models["decoder"]) == [(20, 400), (400, 784)]
    x = mnist_batch(5)
    mu, logvar = vae.encode(models, x)
    assert mu.shape == logvar.shape == (5, 20)
    out = vae.generate(models, vae.sample_latent(config(), 5, "cpu"))
    assert out.shape == (5, 1, 28, 28) and 0 <= out.min() and out.max() <= 1


@pytest.mark.parametrize("img_size,depth,upsample", [(64, 4, "convtranspose"), (32, 1, "nearest"), (32, 5, "bilinear"),
                                                      (28, 2, "convtranspose")])
def test_conv_shapes(img_size, depth, upsample):
    models = vae.build_models(config(arch="conv", channels=3, img_size=img_size, depth=depth, upsample=upsample, latent_dim=16, width=8))
    convs = [m for m in models["encoder"].modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [8 * 2 ** i for i in range(depth)]
    assert all(m.stride == (2, 2) for m in convs)
    assert models["encoder"].feature_dim == 8 * 2 ** (depth - 1) * (img_size // 2 ** depth) ** 2
    slopes = {m.negative_slope for m in models["encoder"].modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.01} and sum(isinstance(m, nn.BatchNorm2d) for m in models["encoder"].modules()) == depth
    x = torch.rand(3, 3, img_size, img_size)
    mu, logvar = vae.encode(models, x)
    assert mu.shape == logvar.shape == (3, 16)
    assert vae.generate(models, mu).shape == (3, 3, img_size, img_size)


@pytest.mark.parametrize("upsample", ["convtranspose", "nearest", "bilinear"])
def test_upsample_modes_build_resize_then_conv_layers(upsample):
    depth = 3
    decoder = vae.build_models(config(arch="conv", img_size=32, depth=depth, upsample=upsample, width=8))["decoder"]
    transposed = [m for m in decoder.modules() if isinstance(m, nn.ConvTranspose2d)]
    resized = [m for m in decoder.modules() if isinstance(m, nn.Upsample)]
    convs = [m for m in decoder.modules() if isinstance(m, nn.Conv2d)]
    if upsample == "convtranspose":
        assert len(transposed) == depth and not resized and not convs
    else:  # each doubling is an Upsample of that mode followed by a 3x3 stride-1 conv (Odena et al. 2016)
        assert not transposed and len(resized) == len(convs) == depth
        assert all(m.mode == upsample and m.scale_factor == 2 for m in resized)
        assert all(m.kernel_size == (3, 3) and m.stride == (1, 1) for m in convs)
        for block in (m for m in decoder.modules() if isinstance(m, nn.Sequential) and isinstance(m[0], nn.Upsample)):
            assert isinstance(block[1], nn.Conv2d)
    assert decoder(torch.randn(2, 20)).shape == (2, 1, 32, 32)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_decoder_output_layer_runs_in_float32_under_bfloat16_autocast(arch):
    torch.manual_seed(0)
    decoder = vae.build_models(config(arch=arch, img_size=32, depth=2, width=8, hidden=32, latent_dim=4, recon="dlogistic"))["decoder"]
    z = torch.randn(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decoded = decoder(z)
        hidden = decoder.net(decoder.fc(z).view(-1, *decoder.start))
    assert hidden.dtype == torch.bfloat16 and decoded.dtype == torch.float32  # the mean needs more than 8 bits
    assert torch.equal(decoded, decoder.out(hidden.float()).view(decoded.shape))


def test_dlcv_face_model():
    # four strided convs to a 512-d mean and log-variance, four layers back up to 64x64x3
    models = vae.build_models(config(arch="conv", channels=3, img_size=64, depth=4, latent_dim=512))
    x, shapes = torch.rand(2, 3, 64, 64), []
    for layer in models["encoder"].body:
        x = layer(x)
        if isinstance(layer, nn.Conv2d):
            shapes.append(tuple(x.shape[1:]))
    assert shapes == [(32, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4)]
    assert models["encoder"].fc_mu.out_features == models["encoder"].fc_logvar.out_features == 512
    ups = [m for m in models["decoder"].modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [m.out_channels for m in ups] == [128, 64, 32, 3]


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_csi5340_is_the_reports_vae(depth):
    # CSI5340 assignment 4, Module 1: (conv, BN, ReLU) x depth -> linear(h_dim) -> mu, sigma heads;
    # linear(z, h_dim) -> (transposed conv, BN, ReLU) x (depth - 1) -> conv -> BN -> tanh
    torch.manual_seed(0)
    models = vae.build_models(config(arch="csi5340", img_size=32, depth=depth, width=8, h_dim=1024, latent_dim=100, recon="mse_mean"))
    encoder, decoder = models["encoder"], models["decoder"]
    kinds = [type(m).__name__ for m in encoder.body]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU"] * depth + ["Flatten", "Linear"]
    assert encoder.body[-1].out_features == 1024 and encoder.fc_mu.in_features == encoder.fc_logvar.in_features == 1024
    assert encoder.fc_mu.out_features == 100
    assert decoder.fc.in_features == 100 and decoder.fc.out_features == 1024
    assert decoder.start == (1024 // (32 // 2 ** (depth - 1)) ** 2, 32 // 2 ** (depth - 1), 32 // 2 ** (depth - 1))
    assert [type(m).__name__ for m in decoder.net] == ["ConvTranspose2d", "BatchNorm2d", "ReLU"] * (depth - 1)
    assert [type(m).__name__ for m in decoder.out] == ["Conv2d", "BatchNorm2d", "Tanh"]
    assert decoder.out[0].stride == (1, 1) and decoder.out[0].out_channels == 1
    assert not any(isinstance(m, nn.LeakyReLU) for model in models.values() for m in model.modules())
    for m in models.values():
        m.eval()
    x = mnist_batch(4, 32)
    assert torch.allclose(encoder(x)[0], encoder.fc_mu(encoder.body(2 * x - 1)))  # images enter in [-1, 1]
    z = torch.randn(4, 100) * 3
    out = decoder(z)
    assert out.shape == (4, 1, 32, 32) and out.min() >= -1 and out.max() <= 1 and out.min() < 0  # tanh, in [-1, 1]
    assert torch.equal(vae.generate(models, z), (out + 1) / 2)  # the interface still hands out [0, 1]


def test_mse_mean_and_kl_weight_are_the_reports_loss_and_kl_factor():
    # rec = mse(x, x') (mean over pixels and batch, in the tanh decoder's [-1, 1]);
    # KL = -0.5 * mean(sum(1 + log sigma^2 - mu^2 - sigma^2)); loss = rec + KL * KL_factor
    models = vae.build_models(config(arch="csi5340", img_size=32, depth=3, width=4, h_dim=256, latent_dim=8, recon="mse_mean"))
    e, d = models["encoder"], models["decoder"]
    x = mnist_batch(6, 32)
    torch.manual_seed(3)
    loss, recon, kl, _ = vae.vae_loss(models, x, "mse_mean", 0.05, 1, tanh=True)
    torch.manual_seed(3)
    mu, logvar, _ = e(x)
    x_rec = d(mu + (0.5 * logvar).exp() * torch.randn_like(mu))
    kl_report = -0.5 * torch.mean(torch.sum(1 + logvar - mu ** 2 - logvar.exp(), dim=1))
    assert torch.allclose(loss, F.mse_loss(x_rec, 2 * x - 1) + 0.05 * kl_report, rtol=1e-5)
    # --recon mse sums the same error over the D pixels: --kl_weight = KL_factor * D gives D times that loss
    torch.manual_seed(3)
    summed, _, _, _ = vae.vae_loss(models, x, "mse", 0.05 * 32 * 32, 1, tanh=True)
    assert torch.allclose(summed, 32 * 32 * loss, rtol=1e-5)
    # a sigmoid decoder's mse_mean is in [0, 1] units
    logits = torch.randn(6, 1, 32, 32)
    assert torch.allclose(vae.reconstruction_loss("mse_mean", x, logits), ((torch.sigmoid(logits) - x) ** 2).mean((1, 2, 3)))


def test_reconstruction_grid_puts_36_originals_beside_their_reconstructions():
    x, x_rec = torch.rand(36, 1, 4, 4), torch.rand(36, 1, 4, 4)
    grid = vae.reconstruction_grid(x, x_rec).view(6, 13, 1, 4, 4)  # drawn 13 cells wide
    assert torch.equal(grid[:, :6].flatten(0, 1), x) and torch.equal(grid[:, 7:].flatten(0, 1), x_rec)
    assert (grid[:, 6] == 1).all()  # a white cell between the two halves


# --- losses and densities ------------------------------------------------------------------


def test_losses_match_their_formulas():
    torch.manual_seed(0)
    x, logits = torch.rand(3, 1, 4, 4), torch.randn(3, 1, 4, 4) * 3
    p = torch.sigmoid(logits)
    bern = (x * p.log() + (1 - x) * (1 - p).log()).sum((1, 2, 3))
    assert torch.allclose(vae.bernoulli_log_likelihood(x, logits), bern, atol=1e-4)
    assert torch.allclose(vae.reconstruction_loss("bce", x, logits), -bern, atol=1e-4)
    assert torch.allclose(vae.reconstruction_loss("mse", x, logits), ((p - x) ** 2).sum((1, 2, 3)))
    cb = torch.distributions.ContinuousBernoulli(logits=logits.double()).log_prob(x.double()).sum((1, 2, 3))
    assert torch.allclose(vae.bernoulli_log_likelihood(x, logits) + vae.continuous_bernoulli_log_norm(logits), cb.float(), atol=1e-3)
    log_sigma = torch.tensor(-1.3)
    normal = torch.distributions.Normal(p, log_sigma.exp()).log_prob(x).sum((1, 2, 3))
    assert torch.allclose(vae.gaussian_nll(x, p, log_sigma), -normal, atol=1e-4)
    mu, logvar = torch.randn(3, 5), torch.randn(3, 5)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1)
    assert torch.allclose(vae.gaussian_kl(mu, logvar), kl, atol=1e-5)
    z = torch.randn(2, 3, 5)
    assert torch.allclose(vae.log_standard_normal(z), torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1))


def test_continuous_bernoulli_is_a_density_on_the_unit_interval():
    x = torch.linspace(0, 1, 20001, dtype=torch.double)
    for logit in (-40.0, -3.0, -1e-3, 0.0, 5e-3, 0.7, 25.0):
        l = torch.tensor(logit, dtype=torch.double)
        log_p = x * F.logsigmoid(l) + (1 - x) * F.logsigmoid(-l) + vae.continuous_bernoulli_log_norm(l.view(1, 1, 1))
        assert abs(torch.trapezoid(log_p.exp(), x).item() - 1) < 1e-6, logit


def logistic_params(mean, log_scale, shape=(1, 1, 1)):
    """A decoder output for --recon dlogistic: the mean map, then the log-scale map."""
    return torch.cat([torch.full(shape, mean, dtype=torch.double), torch.full(shape, log_scale, dtype=torch.double)])


def test_discretised_logistic_sums_to_one_and_integrates_the_density():
    levels = torch.arange(256, dtype=torch.double).view(256, 1, 1, 1)
    for mean, log_scale in [(0.0, -1.0), (0.3, -4.0), (-0.999, -6.0), (1.7, -2.0), (-3.0, 0.5), (0.51, -7.0), (0.2, -9.0)]:
        decoded = logistic_params(mean, log_scale)
        log_p = vae.discretised_logistic_log_likelihood(levels / 255, decoded)
        assert log_p.shape == (256,) and torch.isfinite(log_p).all()
        assert abs(log_p.exp().sum().item() - 1) < 1e-9, (mean, log_scale)
        # interior bins: the logistic density integrated numerically over [c - 1/255, c + 1/255], c = 2k/255 - 1
        s = math.exp(max(log_scale, vae.LOG_SCALE_MIN))
        for k in (1, 37, 128, 200, 254):
            t = torch.linspace(2 * k / 255 - 1 - 1 / 255, 2 * k / 255 - 1 + 1 / 255, 4001, dtype=torch.double)
            u = ((t - mean) / s).abs()  # the density is symmetric; e^-|u| cannot overflow
            density = torch.exp(-u) / (s * (1 + torch.exp(-u)) ** 2)
            expected = torch.trapezoid(density, t).item()
            assert abs(log_p[k].exp().item() - expected) <= 1e-6 * max(expected, 1e-12) + 1e-15, (mean, log_scale, k)
        # the edge levels take the tails: P(0) = F(-1 + 1/255), P(255) = 1 - F(1 - 1/255)
        log_sigmoid = lambda u: -(max(-u, 0.0) + math.log1p(math.exp(-abs(u))))  # log 1 / (1 + e^-u), in plain math
        assert math.isclose(log_p[0].item(), log_sigmoid((-1 + 1 / 255 - mean) / s), rel_tol=1e-9)  # log F(t)
        assert math.isclose(log_p[255].item(), log_sigmoid(-(1 - 1 / 255 - mean) / s), rel_tol=1e-9)  # log (1 - F(t))


def test_discretised_logistic_is_stable_in_float32():
    # a sharp logistic far from the pixel's bin, and a wide one: log P finite, with finite gradients
    x = torch.tensor([0.0, 1.0, 0.5, 0.5, 0.25]).view(5, 1, 1, 1)
    decoded = torch.tensor([[5.0, -7.0], [-5.0, -7.0], [-0.9, -7.0], [0.0, 6.0], [-0.5, -20.0]]).view(5, 2, 1, 1).requires_grad_()
    log_p = vae.discretised_logistic_log_likelihood(x, decoded)
    log_p.sum().backward()
    assert torch.isfinite(log_p).all() and torch.isfinite(decoded.grad).all()
    assert log_p[2] < -100 and log_p[0] < -100 and log_p[1] < -100  # far out: tiny, but not -inf
    reference = vae.discretised_logistic_log_likelihood(x.double(), decoded.detach().double())
    assert torch.allclose(log_p.detach().double(), reference, rtol=1e-6, atol=1e-4)


def test_discretised_logistic_mean_and_pixel_levels():
    torch.manual_seed(0)
    decoded = torch.cat([torch.randn(3, 1, 2, 2) * 0.8, torch.rand(3, 1, 2, 2) * 4 - 6], dim=1).double()
    levels = torch.arange(256, dtype=torch.double).view(256, 1, 1, 1, 1)
    mean = vae.discretised_logistic_mean(decoded)
    for i in range(3):
        for r in range(2):
            for c in range(2):
                one = decoded[i:i + 1, :, r:r + 1, c:c + 1]
                p = vae.discretised_logistic_log_likelihood(levels.view(256, 1, 1, 1) / 255, one).exp()
                assert math.isclose(mean[i, 0, r, c].item(), (p * levels.view(256)).sum().item() / 255, rel_tol=1e-9)
    assert 0 <= mean.min() and mean.max() <= 1
    k = torch.arange(256.0)
    u = torch.rand(256)
    assert torch.equal(vae.pixel_levels(k / 255), k)  # training images
    assert torch.equal(vae.pixel_levels((k + u) / 256), k)  # evaluate.py's dequantised images
    assert torch.equal(vae.pixel_levels(torch.tensor([0.0, 1.0])), torch.tensor([0.0, 255.0]))


def test_logistic_mixture_is_the_weighted_sum_of_its_components():
    torch.manual_seed(0)
    K = 3
    logits, means, log_scales = torch.randn(K).double(), (torch.rand(K) * 2 - 1).double(), (torch.rand(K) * 4 - 6).double()
    decoded = torch.cat([logits, means, log_scales]).view(1, 3 * K, 1, 1)  # --mixture 3: logits, means, log-scales
    levels = torch.arange(256, dtype=torch.double)
    log_p = vae.discretised_logistic_log_likelihood(levels.view(256, 1, 1, 1) / 255, decoded, K)
    weights = torch.softmax(logits, 0)
    expected = sum(w * vae.discretised_logistic_log_likelihood(levels.view(256, 1, 1, 1) / 255, logistic_params(m, s)).exp()
                   for w, m, s in zip(weights, means.tolist(), log_scales.tolist()))
    assert torch.allclose(log_p.exp(), expected, rtol=1e-9, atol=1e-15) and abs(log_p.exp().sum().item() - 1) < 1e-9
    mean = vae.discretised_logistic_mean(decoded, K)
    assert math.isclose(mean.item(), (expected * levels).sum().item() / 255, rel_tol=1e-9)
    models = vae.build_models(config(hidden=32, latent_dim=4, recon="dlogistic", mixture=K))
    assert models["decoder"](torch.randn(2, 4)).shape == (2, 3 * K, 28, 28) and models["decoder"].mixture == K


def test_dlogistic_decoder_gives_exact_discrete_bits_per_dim():
    import evaluate

    torch.manual_seed(0)
    models = vae.build_models(config(hidden=32, latent_dim=4, recon="dlogistic"))
    for m in models.values():
        m.eval()
    assert models["decoder"](torch.randn(2, 4)).shape == (2, 2, 28, 28)  # mean and log-scale maps
    images, _ = vae.load_images(str(REPO / "data"), "mnist5k", "test", 28)
    images = images[::100][:6]
    x = vae.to_unit_interval(images)
    dequantised = (images.float() + torch.rand(images.shape)) / 256
    torch.manual_seed(1)
    log_w = vae.log_importance_weights(models, x, 5)
    torch.manual_seed(1)
    assert torch.equal(vae.log_importance_weights(models, dequantised, 5), log_w)  # the noise leaves no trace
    # each weight is log P(x | z) + D log 256 + log p(z) - log q(z|x) with the discrete P
    torch.manual_seed(1)
    mu, logvar, h = models["encoder"](x)
    z, log_q = vae.posterior_samples(mu, logvar, h, None, 5)
    log_P = vae.discretised_logistic_log_likelihood(x, models["decoder"](z.flatten(0, 1)).view(5, 6, 2, 28, 28))
    assert torch.allclose(log_w, log_P + 784 * math.log(256) + vae.log_standard_normal(z) - log_q, rtol=1e-6)
    # evaluate.py's bits/dim is then -log2 P / D whatever its dequantisation noise (its seed)
    torch.manual_seed(2)
    a = evaluate.bits_per_dim(vae, models, images, 8, 6, "cpu", seed=0)
    torch.manual_seed(2)
    b = evaluate.bits_per_dim(vae, models, images, 8, 6, "cpu", seed=1)
    assert a == b and 0 < a < 8
    torch.manual_seed(2)
    log_w = vae.log_importance_weights(models, x, 8).double()
    direct = -((torch.logsumexp(log_w, 0) - math.log(8)) - 784 * math.log(256)) / (784 * math.log(2))
    assert math.isclose(a, direct.mean().item(), rel_tol=1e-9)


def test_vae_loss_is_reconstruction_plus_weighted_kl():
    models = vae.build_models(config(hidden=16, latent_dim=3))
    e, d = models["encoder"], models["decoder"]
    x = mnist_batch(8)
    torch.manual_seed(5)
    loss, recon, kl, _ = vae.vae_loss(models, x, "bce", 0.3, 1)
    torch.manual_seed(5)
    mu, logvar, _ = e(x)
    z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
    expected_recon = F.binary_cross_entropy(torch.sigmoid(d(z)), x, reduction="none").sum((1, 2, 3))
    assert torch.allclose(recon, expected_recon, rtol=1e-4)
    assert torch.allclose(loss, (expected_recon + 0.3 * vae.gaussian_kl(mu, logvar)).mean(), rtol=1e-5)


def test_sigma_loss_trains_only_sigma_and_tracks_the_mse():
    models = vae.build_models(config(hidden=16, latent_dim=3, recon="mse"))
    d = models["decoder"]
    assert "log_sigma" in d.state_dict()
    x = mnist_batch(8)
    logits = d(torch.randn(8, 3))
    loss = vae.decoder_sigma_loss(x, logits, d.log_sigma)
    loss.backward()
    assert all(p.grad is None for n, p in d.named_parameters() if n != "log_sigma") and d.log_sigma.grad != 0
    mse = ((torch.sigmoid(logits) - x) ** 2).mean().detach()
    at = lambda s: vae.decoder_sigma_loss(x, logits, torch.tensor(s)).item()
    best = 0.5 * mse.log().item()  # d/dlog_sigma = D - SSE / sigma^2 = 0 at sigma^2 = MSE
    assert at(best) < at(best - 0.05) and at(best) < at(best + 0.05)


# --- flows and the importance-weighted bound -------------------------------------------------


@pytest.mark.parametrize("kind", ["planar", "iaf"])
def test_flow_logdet_equals_autograd_jacobian(kind):
    torch.manual_seed(0)
    L, context = 4, 6
    flow = vae.PlanarFlow(L, 3) if kind == "planar" else vae.InverseAutoregressiveFlow(L, 3, 12, context)
    with torch.no_grad():
        for p in flow.parameters():  # move away from the near-identity initialisation
            p.add_(torch.randn_like(p) * 0.5)
    flow.double()
    h = torch.randn(1, context, dtype=torch.double)
    for _ in range(3):
        z0 = torch.randn(L, dtype=torch.double) * 2
        _, logdet = flow(z0[None], h)
        jacobian = torch.autograd.functional.jacobian(lambda z: flow(z[None], h)[0][0], z0)
        sign, logabsdet = torch.linalg.slogdet(jacobian)
        assert sign != 0 and torch.allclose(logdet[0], logabsdet, atol=1e-9)


@pytest.mark.parametrize("kind", ["planar", "iaf"])
def test_flow_posterior_density_is_a_change_of_variables(kind):
    # log q(z_K|x) from posterior_samples against log q0(z_0|x) - log |det dz_K/dz_0|, the determinant taken from
    # autograd's Jacobian of the flow at the same z_0: a flipped sign of the log-det correction fails
    torch.manual_seed(0)
    L, context, k = 3, 5, 4
    flow = vae.PlanarFlow(L, 3) if kind == "planar" else vae.InverseAutoregressiveFlow(L, 2, 8, context)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    flow.double()
    mu, logvar, h = torch.randn(2, L, dtype=torch.double), torch.randn(2, L, dtype=torch.double) * 0.5, torch.randn(2, context, dtype=torch.double)
    torch.manual_seed(1)
    z, log_q = vae.posterior_samples(mu, logvar, h, flow, k)
    torch.manual_seed(1)
    eps = torch.randn(k, 2, L).double()  # the same draws as posterior_samples (float32 noise)
    z0 = mu + (0.5 * logvar).exp() * eps
    base = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    for j in range(k):
        for n in range(2):
            jacobian = torch.autograd.functional.jacobian(lambda v: flow(v[None], h[n:n + 1])[0][0], z0[j, n])
            _, logabsdet = torch.linalg.slogdet(jacobian)
            expected = base.log_prob(z0[j])[n].sum() - logabsdet
            assert torch.allclose(z[j, n], flow(z0[j, n][None], h[n:n + 1])[0][0])
            assert torch.allclose(log_q[j, n], expected, atol=1e-9), (j, n)
            assert abs(logabsdet) > 1e-3  # the correction is not zero, so its sign matters


def test_planar_flow_stays_invertible_and_iaf_step_is_autoregressive():
    flow = vae.PlanarFlow(3, 1)
    with torch.no_grad():
        flow.u.copy_(-5 * flow.w)  # w.u << -1: the raw parameters would fold the space
    w, u = flow.w[0], flow.u[0]
    u_hat = u + (F.softplus(w @ u) - 1 - w @ u) * w / (w @ w)
    assert w @ u_hat > -1
    _, logdet = flow(torch.randn(100, 3))
    assert torch.isfinite(logdet).all()
    step = vae.IAFStep(5, 16, 2)
    with torch.no_grad():
        for p in step.parameters():
            p.add_(torch.randn_like(p))
    J = torch.autograd.functional.jacobian(lambda z: step(z[None], torch.zeros(1, 2))[0][0], torch.randn(5))
    assert torch.equal(J.triu(1), torch.zeros(5, 5)) and (J.diagonal() > 0).all()  # output i sees inputs < i


@pytest.mark.parametrize("flow", ["none", "iaf"])
def test_log_importance_weights_and_the_bound_tighten_with_k(flow):
    torch.manual_seed(0)
    models = vae.build_models(config(hidden=32, latent_dim=4, flow=flow))
    for m in models.values():
        m.eval()
    x = mnist_batch(16)
    log_w = vae.log_importance_weights(models, x, 1000, max_elements=400000)  # decoded 31 draws at a time, then 8
    assert log_w.shape == (1000, 16) and torch.isfinite(log_w).all()
    bound = {k: (torch.logsumexp(log_w.view(1000 // k, k, 16), 1) - math.log(k)).mean().item() for k in (1, 5, 50)}
    assert bound[1] < bound[5] < bound[50], bound
    # the training objective on the same model and batch: IWAE with K=5 is at least the ELBO (K=1)
    with torch.no_grad():
        elbo = -torch.stack([vae.vae_loss(models, x, "bce", 1.0, 1)[0] for _ in range(20)]).mean()
        iwae = -torch.stack([vae.vae_loss(models, x, "bce", 1.0, 5)[0] for _ in range(20)]).mean()
    assert iwae > elbo, (iwae, elbo)


def test_encode_with_a_flow_gives_the_decoders_code():
    models = vae.build_models(config(hidden=16, latent_dim=3, flow="iaf"))
    x = mnist_batch(4)
    mu, logvar = vae.encode(models, x)
    mu0, logvar0, h = models["encoder"](x)
    assert torch.allclose(mu, models["flow"](mu0, h)[0]) and not torch.allclose(mu, mu0)
    assert torch.allclose(logvar, logvar0)  # the base Gaussian's


# --- training runs -------------------------------------------------------------------------


def check_interface(ckpt, size):
    models = load_models(vae, ckpt, "cpu")
    x = torch.rand(5, ckpt["config"]["channels"], size, size)
    mu, logvar = vae.encode(models, x)
    assert mu.shape == logvar.shape == (5, ckpt["config"]["latent_dim"])
    images = vae.generate(models, vae.sample_latent(ckpt["config"], 4, "cpu"))
    assert images.shape == (4, 1, size, size) and 0 <= images.min() and images.max() <= 1
    assert vae.generate(models, mu).shape == x.shape
    log_w = vae.log_importance_weights(models, x, 7)
    assert log_w.shape == (7, 5) and torch.isfinite(log_w).all()


def test_copied_alone_next_to_its_data_writes_every_output(shared_data, tmp_path):
    alone = tmp_path / "alone"  # the script copied alone into an empty folder, run with the default paths
    alone.mkdir()
    shutil.copy(REPO / "vae.py", alone)
    shutil.copytree(shared_data, alone / "data")
    proc = run_script("vae.py", "--max_iters", "6", "--log_interval", "2", "--sample_interval", "3", "--ckpt_interval", "3",
                      "--lr", "1e-3", *TINY, cwd=alone)
    out = alone / "out" / "vae"
    for name in ("ckpt.pt", "ckpt_best.pt", "log.jsonl", "config.json", "samples/step_000003.png",
                 "samples/step_000006.png", "reconstructions/step_000003.png", "reconstructions/step_000006.png"):
        assert (out / name).exists(), name
    assert not (out / "latents.png").exists()  # interpolate.py --mode latents draws it
    rows = read_log(out)
    assert [r["step"] for r in rows] == [2, 3, 4, 6]
    assert {"loss", "recon", "kl", "ms_per_step", "images_per_s"} <= set(rows[0])
    assert [r["step"] for r in rows if "test_mse" in r] == [3, 6]
    assert rows[-1]["loss"] < rows[0]["loss"]
    final = float(proc.stdout.split("test MSE: ")[1].split()[0])
    assert abs(final - rows[-1]["test_mse"]) < 1e-6
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    best = torch.load(out / "ckpt_best.pt", weights_only=True)
    assert ckpt["script"] == "vae" and ckpt["step"] == 6 and ckpt["config"]["channels"] == 1
    best_mse = min(r["test_mse"] for r in rows if "test_mse" in r)
    assert best["step"] in (3, 6) and best["records"]["best"]["test_mse"] == best_mse
    assert [r["test_mse"] for r in rows if r["step"] == best["step"]] == [best_mse]
    assert ckpt["records"]["best"]["test_mse"] == best_mse and best["log_window"] == {}  # its row was written
    check_interface(ckpt, 28)
    from PIL import Image
    assert Image.open(out / "samples/step_000006.png").size == (6 * 30 + 2, 6 * 30 + 2)  # 6x6 grid, 2 px padding
    # 36 test images (6 x 6) beside their 36 reconstructions, a white column between: 13 cells wide
    grid = np.asarray(Image.open(out / "reconstructions/step_000006.png").convert("L"))
    assert grid.shape == (6 * 30 + 2, 13 * 30 + 2)
    assert (grid[2:30, 6 * 30 + 2:7 * 30] == 255).all()
    test_images, _ = vae.load_images(str(alone / "data"), "mnist5k", "test", 28)
    first = test_images[torch.linspace(0, len(test_images) - 1, 36).long()[0], 0].numpy()
    assert np.array_equal(grid[2:30, 2:30], first)  # the first original, top left


def test_conv_iwae_planar_variant_trains_and_loads(shared_data, tmp_path):
    out = tmp_path / "run"
    vae.main(["--data_dir", str(shared_data), "--out_dir", str(out), "--max_iters", "3", "--log_interval", "1",
              "--flow", "planar", "--iw_k", "3", "--upsample", "nearest", *TINY_CONV])
    rows = read_log(out)
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) and np.isfinite(r["kl"]) for r in rows)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert "flow" in ckpt["models"] and ckpt["config"]["iw_k"] == 3
    check_interface(ckpt, 32)


def test_sigkill_then_resume_gives_identical_losses(shared_data, tmp_path):
    # the killed run is a process of its own; the straight and the resumed runs train in this one, single-threaded
    # as that process is, while it starts
    common = ["--data_dir", str(shared_data), "--log_interval", "1", "--ckpt_interval", "10", "--sample_interval", "15",
              "--dtype", "float32", *TINY]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "vae.py", "--out_dir", killed, "--max_iters", "100000", *common],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    straight = tmp_path / "straight"
    vae.main(["--out_dir", str(straight), "--max_iters", "40", *common])
    expected = {r["step"]: r for r in read_log(straight)}

    deadline = time.time() + 120
    while time.time() < deadline:
        if (killed / "ckpt.pt").exists() and (killed / "log.jsonl").exists() and len(read_log(killed)) >= 25:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved_step = torch.load(killed / "ckpt.pt", weights_only=True)["step"]
    assert saved_step >= 20 and saved_step % 10 == 0

    vae.main(["--out_dir", str(killed), "--max_iters", "40", "--resume", *common])
    rows = read_log(killed)
    assert [r["step"] for r in rows] == list(range(1, 41))  # lines after the checkpoint were replaced, not duplicated
    for r in rows:
        for key in ("loss", "recon", "kl", "test_mse"):
            assert r.get(key) == expected[r["step"]].get(key), (r["step"], key)
    assert [r["step"] for r in rows if "test_mse" in r] == [15, 30, 40]


def test_torchrun_two_processes(shared_data, tmp_path, monkeypatch):
    # the real loop under DDP: both ranks end with the same encoder, decoder, flow and optimizer state, unlike one
    # process with the same global batch (the ranks draw different halves of it)
    out = tmp_path / "ddp"
    common = ["--data_dir", str(shared_data), "--max_iters", "3", "--log_interval", "1", "--flow", "iaf", "--recon",
              "mse", "--dtype", "float32", *TINY]
    (tmp_path / "probe.py").write_text(DDP_STATE_PROBE.format(repo=str(REPO), script='vae'))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29641",
                           str(tmp_path / "probe.py"), "--out_dir", str(out), *common],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3
    assert not any(k.startswith("module.") for m in ckpt["models"].values() for k in m)  # saved without the DDP wrapper
    assert ckpt["models"]["decoder"]["log_sigma"] != 0  # sigma's gradient went through the wrapped decoder
    rows = read_log(out)
    assert len(rows) == 3 and "sigma" in rows[0]  # only rank 0 writes
    check_interface(ckpt, 28)  # an MLP with an IAF posterior and a Gaussian decoder
    rank0, rank1 = (flat_state(torch.load(out / f"state_rank{r}.pt", weights_only=True)) for r in (0, 1))
    groups = {".".join(k.split(".")[:2]) for k in rank0}
    assert groups == {"models.encoder", "models.decoder", "models.flow", "optimizers.vae"}, groups
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    single = one_process_state(monkeypatch, vae, lambda: vae.main(["--out_dir", str(tmp_path / "alone"), *common]))
    for network in ("models.encoder", "models.decoder", "models.flow"):
        assert any(not torch.equal(single[k], rank0[k]) for k in rank0 if k.startswith(network)), network


def test_default_image_size_follows_the_architecture(shared_data, base_run, tmp_path):
    # the conv VAE on digits is 32 x 32 (CSI5340 assignment 4), the MLP keeps 28 x 28 (CIS 680 Table 1)
    tiny_conv = [flag for flag in TINY_CONV if flag not in ("--img_size", "32")]
    vae.main(["--data_dir", str(shared_data), "--out_dir", str(tmp_path / "conv"), "--max_iters", "1", "--dtype",
              "float32", *tiny_conv])
    assert "--img_size" not in BASE_FLAGS  # base_run is the MLP's run with the default size
    for arch, out, size in (("conv", tmp_path / "conv", 32), ("mlp", base_run, 28)):
        ckpt = torch.load(out / "ckpt.pt", weights_only=True)
        assert ckpt["config"]["arch"] == arch and ckpt["config"]["img_size"] == size
        assert json.loads((out / "config.json").read_text())["img_size"] == size
        check_interface(ckpt, size)


def test_csi5340_trains_resumes_and_reports_through_the_interface(shared_data, tmp_path):
    import evaluate

    flags = ["--data_dir", str(shared_data), "--arch", "csi5340", "--depth", "2", "--width", "4", "--h_dim", "256",
             "--latent_dim", "4", "--recon", "mse_mean", "--kl_weight", "1e-3", "--batch_size", "16", "--device", "cpu",
             "--dtype", "float32", "--log_interval", "1", "--sample_interval", "2", "--ckpt_interval", "2"]
    vae.main(["--out_dir", str(tmp_path / "straight"), "--max_iters", "4", *flags])
    vae.main(["--out_dir", str(tmp_path / "resumed"), "--max_iters", "2", *flags])
    vae.main(["--out_dir", str(tmp_path / "resumed"), "--max_iters", "4", "--resume", *flags])
    timing = ("ms_per_step", "images_per_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(read_log(tmp_path / "resumed")) == strip(read_log(tmp_path / "straight"))
    ckpt = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)
    assert {k: ckpt["config"][k] for k in ("arch", "h_dim", "recon", "kl_weight", "img_size")} == \
        {"arch": "csi5340", "h_dim": 256, "recon": "mse_mean", "kl_weight": 1e-3, "img_size": 32}
    check_interface(ckpt, 32)  # images in [0, 1] out of a tanh decoder
    models = load_models(vae, ckpt, "cpu")
    images, _ = vae.real_images(ckpt["config"], "test")
    mse = vae.mse_of_reconstructions(models, images)
    assert 0 < mse < 0.5 and abs(evaluate.posterior_mean_reconstruction_mse(vae, models, images, 16, "cpu") - mse) < 1e-3
    assert 0 < evaluate.bits_per_dim(vae, models, images[:4], 4, 4, "cpu") < 100


@pytest.mark.parametrize("mixture", [1, 3])
def test_dlogistic_trains_and_reports_through_the_interface(shared_data, tmp_path, mixture):
    out = tmp_path / "run"
    vae.main(["--data_dir", str(shared_data), "--out_dir", str(out), "--max_iters", "8", "--log_interval", "4",
              "--recon", "dlogistic", "--mixture", str(mixture), "--lr", "3e-3", *TINY])
    rows = read_log(out)
    assert [r["step"] for r in rows] == [4, 8] and rows[1]["loss"] < rows[0]["loss"]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    check_interface(ckpt, 28)
    models = load_models(vae, ckpt, "cpu")
    z = vae.sample_latent(ckpt["config"], 3, "cpu")
    with torch.no_grad():
        decoded = models["decoder"](z)
    assert decoded.shape == (3, 2 if mixture == 1 else 3 * mixture, 28, 28)
    assert torch.equal(vae.generate(models, z), vae.discretised_logistic_mean(decoded, mixture))  # the mean, in [0, 1]
    if mixture == 1:  # a checkpoint from before --mixture existed (its config lacks it) loads with the default
        old = {**ckpt, "config": {k: v for k, v in ckpt["config"].items() if k != "mixture"}}
        with torch.no_grad():
            assert torch.equal(load_models(vae, old, "cpu")["decoder"](z), decoded)


def test_bfloat16_trains_a_few_steps(dtype_runs):
    losses = {}
    for dtype, out in dtype_runs.items():
        rows = read_log(out)
        assert len(rows) == 3 and all(math.isfinite(r["loss"]) and math.isfinite(r["kl"]) for r in rows)
        losses[dtype] = [r["loss"] for r in rows]
        ckpt = torch.load(out / "ckpt.pt", weights_only=True)
        assert all(t.dtype == torch.float32 for m in ckpt["models"].values() for t in m.values() if t.is_floating_point())
    # the same draws, computed in bfloat16: close to the float32 losses, but not equal to them
    assert losses["bfloat16"] != losses["float32"]
    assert np.allclose(losses["bfloat16"], losses["float32"], rtol=0.02)


def test_log_after_resume_between_log_steps_equals_the_straight_run(shared_data, tmp_path, monkeypatch):
    common = ["--data_dir", str(shared_data), "--log_interval", "4", "--ckpt_interval", "3", "--sample_interval", "1000",
              "--dtype", "float32", *TINY]
    vae.main(["--out_dir", str(tmp_path / "straight"), "--max_iters", "10", *common])
    expected = read_log(tmp_path / "straight")
    assert [r["step"] for r in expected] == [4, 8, 10]

    class Killed(Exception):
        pass

    save = vae.save_checkpoint

    def save_then_die_at_step_6(config, step, *args):
        save(config, step, *args)
        if step == 6:
            raise Killed

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(vae, "save_checkpoint", save_then_die_at_step_6)
    with pytest.raises(Killed):
        vae.main(["--out_dir", str(interrupted), "--max_iters", "10", *common])
    monkeypatch.setattr(vae, "save_checkpoint", save)
    ckpt = torch.load(interrupted / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["log_window"]["steps"] == 2  # steps 5 and 6, not yet logged
    vae.main(["--out_dir", str(interrupted), "--max_iters", "10", "--resume", *common])
    rows = read_log(interrupted)
    assert [r["step"] for r in rows] == [4, 8, 10]
    for r, e in zip(rows, expected):
        for key in ("loss", "recon", "kl", "test_mse"):
            assert r.get(key) == e.get(key), (r["step"], key)


def test_empty_test_split_trains_without_test_metrics(tiny_mnist, tmp_path, capsys):
    # data/folder/prepare.py --test_size 0 writes a test split of no images
    folder = tiny_mnist / "mnist5k"
    np.save(folder / "test.npy", np.zeros((0, 28, 28, 1), dtype=np.uint8))
    np.save(folder / "test_labels.npy", np.zeros(0, dtype=np.int64))
    out = tmp_path / "run"
    vae.main(["--data_dir", str(tiny_mnist), "--out_dir", str(out), "--max_iters", "4", "--log_interval", "2",
              "--sample_interval", "2", "--dtype", "float32", *TINY])
    assert "test split of mnist5k is empty" in capsys.readouterr().out
    rows = read_log(out)
    assert [r["step"] for r in rows] == [2, 4] and not any("test_mse" in r for r in rows)
    for name in ("ckpt.pt", "reconstructions/step_000004.png", "samples/step_000004.png"):
        assert (out / name).exists(), name
    assert not (out / "ckpt_best.pt").exists()
    assert torch.load(out / "ckpt.pt", weights_only=True)["records"]["best"]["test_mse"] == float("inf")


def test_mse_of_reconstructions_is_the_mean_over_pixels_of_the_split():
    torch.manual_seed(0)
    models = vae.build_models(config(hidden=16, latent_dim=3))
    for m in models.values():
        m.eval()
    images, _ = vae.load_images(str(REPO / "data"), "mnist5k", "test", 28)
    images = images[:7]
    x = vae.to_unit_interval(images)
    expected = (vae.generate(models, vae.encode(models, x)[0]) - x).pow(2).mean().item()
    assert math.isclose(vae.mse_of_reconstructions(models, images, chunk=3), expected, rel_tol=1e-5)
    assert not hasattr(vae, "reconstruction_mse")


# --- checkpoints and bad input -------------------------------------------------------------


def test_non_finite_weights_stop_before_the_checkpoint(shared_data, base_run, tmp_path, capsys, monkeypatch):
    out = copy_of(base_run, tmp_path)  # --max_iters 2 --ckpt_interval 2 --log_interval 2
    common = ["--data_dir", str(shared_data), "--out_dir", str(out), "--ckpt_interval", "2", "--log_interval", "2",
              "--dtype", "float32", *TINY]
    good = (out / "ckpt.pt").read_bytes()
    adam_step, updates = torch.optim.Adam.step, []

    def poisoning_step(self, *args, **kwargs):
        result = adam_step(self, *args, **kwargs)
        updates.append(1)
        if len(updates) == 2:  # step 4's update, after its (finite) loss was summed into the log window
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", poisoning_step)
    assert "non-finite loss or weights by step 4" in error_line(capsys, ["--max_iters", "4", "--resume", *common,
                                                                         "--sample_interval", "1000"])
    assert (out / "ckpt.pt").read_bytes() == good
    assert [r["step"] for r in read_log(out)] == [2, 4]  # step 4's losses were finite; its weights are not saved


@pytest.mark.parametrize("name", ["ckpt.pt", "ckpt_best.pt"])
def test_checkpoint_save_is_atomic(tmp_path, monkeypatch, name):
    path = tmp_path / name
    config = {"out_dir": str(tmp_path), "lr": 1e-3}
    layer = nn.Linear(2, 2)
    state = {"models": {"m": layer}, "optimizers": {}, "ema": {}, "records": {"best": vae.Record(test_mse=0.5)}}
    args = (state, torch.Generator(), {}, True, name)
    vae.save_checkpoint(config, 1, *args)

    def torn_save(obj, f):
        f.write(b"PK\x03\x04 half a file")  # into the buffer that becomes the temporary file
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", torn_save)
    with torch.no_grad():
        layer.weight.zero_()
    with pytest.raises(KeyboardInterrupt):
        vae.save_checkpoint(config, 2, *args)
    saved = torch.load(path, weights_only=True)
    assert not os.path.exists(f"{path}.tmp") and sorted(os.listdir(tmp_path)) == [path.name]
    assert saved["step"] == 1 and saved["records"]["best"]["test_mse"] == 0.5 and saved["models"]["m"]["weight"].any()


def test_load_models_rejects_other_checkpoints():
    with pytest.raises(ValueError, match="not a format-2 vae checkpoint"):
        load_models(vae, {"script": "dcgan", "format": 2}, "cpu")


def error_line(capsys, argv):
    """Run main() in this process (faster than a subprocess): it must exit non-zero with one line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        vae.main(argv)
    assert exit_info.value.code != 0
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_missing_dataset_names_prepare_command(tmp_path, capsys):
    line = error_line(capsys, ["--data_dir", str(tmp_path), "--dataset", "celeba", "--out_dir", str(tmp_path / "o")])
    assert "python " in line and "celeba/prepare.py" in line


@pytest.mark.parametrize("flags,message", [
    (["--arch", "conv", "--img_size", "28"], "--img_size 28 is not supported by the conv VAE with --depth 4"),
    (["--arch", "conv", "--img_size", "28", "--depth", "3"], "multiple of 2^depth = 8"), (["--iw_k", "0"], "--iw_k: 0 is outside"),
    (["--kl_weight", "-1"], "--kl_weight: -1 is outside"), (["--batch_size", "0"], "--batch_size: 0 is outside"),
    (["--max_iters", "-5"], "--max_iters: -5 is outside"), (["--latent_dim", "0"], "--latent_dim: 0 is outside"),
    (["--hidden", "-1"], "--hidden: -1 is outside"), (["--img_size", "0"], "--img_size: 0 is outside"),
    (["--arch", "conv", "--width", "0"], "--width: 0 is outside"), (["--flow", "iaf", "--flow_length", "0"], "--flow_length: 0 is outside"),
    (["--flow_hidden", "-2"], "--flow_hidden: -2 is outside"), (["--arch", "csi5340", "--depth", "2", "--h_dim", "1000", "--max_iters", "1"], "use a multiple of 16 x 16 = 256"),
    (["--arch", "csi5340", "--max_iters", "1"], "--recon bce needs a decoder of logits; --arch csi5340 ends in tanh: use --recon mse or mse_mean"),
    (["--arch", "csi5340", "--recon", "dlogistic", "--max_iters", "1"], "--arch csi5340 ends in tanh"), (["--mixture", "3"], "needs --recon dlogistic"), (["--arch", "csi5340", "--h_dim", "0"], "--h_dim: 0 is outside"),
    (["--log_interval", "0"], "--log_interval: 0 is outside"), (["--sample_interval", "-1"], "--sample_interval: -1 is outside"),
    (["--ckpt_interval", "0"], "--ckpt_interval: 0 is outside"), (["--lr", "0"], "--lr: 0 is outside"),
    (["--map_attr", "Male"], "unrecognized arguments: --map_attr Male"), (["--latent_map", "pca"], "unrecognized arguments"),
    (["--batch_size", str(2 ** 16 + 1)], "--batch_size: 65537 is outside [1, 65536]"),
    (["--beta1", "1"], "--beta1: 1 is outside [0, 1)"), (["--kl_weight", "inf"], "--kl_weight: inf is outside"),
])
def test_bad_flags(shared_data, tmp_path, capsys, flags, message):
    # into the out_dir of an earlier run: nothing it saved may change
    out = tmp_path / "o"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"an earlier run's checkpoint")
    (out / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    assert message in error_line(capsys, ["--data_dir", str(shared_data), "--out_dir", str(out), *flags])
    assert (out / "ckpt.pt").read_bytes() == b"an earlier run's checkpoint"
    assert (out / "log.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    assert sorted(os.listdir(out)) == ["ckpt.pt", "log.jsonl"]


def test_unwritable_out_dir(shared_data, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    line = error_line(capsys, ["--data_dir", str(shared_data), "--out_dir", str(blocker / "run"), "--max_iters", "1", *TINY])
    assert line.startswith("vae.py: error: cannot write to --out_dir") and str(blocker / "run") in line
    assert blocker.read_text() == "not a folder"
    if os.geteuid() != 0:  # root writes through permission bits
        read_only = tmp_path / "read_only"
        read_only.mkdir()
        read_only.chmod(0o555)
        try:
            line = error_line(capsys, ["--data_dir", str(shared_data), "--out_dir", str(read_only), "--max_iters", "1", *TINY])
            assert "cannot write to --out_dir" in line and os.listdir(read_only) == []
        finally:
            read_only.chmod(0o755)


def test_checkpoint_of_another_script_to_resume(shared_data, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    torch.save({"script": "dcgan", "format": 1, "config": {"nz": 100}, "step": 5, "models": {}}, out / "ckpt.pt")
    saved = (out / "ckpt.pt").read_bytes()
    line = error_line(capsys, ["--data_dir", str(shared_data), "--out_dir", str(out), "--resume", *TINY])
    assert "is not a format-2 vae checkpoint (an older vae.py or another script wrote it)" in line
    assert (out / "ckpt.pt").read_bytes() == saved and os.listdir(out) == ["ckpt.pt"]
    torch.save([1, 2, 3], out / "ckpt.pt")  # a readable file that is no checkpoint at all
    line = error_line(capsys, ["--data_dir", str(shared_data), "--out_dir", str(out), "--resume", *TINY])
    assert "is not a format-2 vae checkpoint" in line and os.listdir(out) == ["ckpt.pt"]


def test_resume_honours_typed_flags_and_refuses_fixed_ones(shared_data, base_run, tmp_path, capsys):
    out = copy_of(base_run, tmp_path)  # --max_iters 2 --lr 1e-3
    common = ["--data_dir", str(shared_data), "--out_dir", str(out), "--dtype", "float32", *TINY]
    saved = (out / "ckpt.pt").read_bytes()
    line = error_line(capsys, ["--max_iters", "4", "--resume", *common, "--latent_dim", "8"])
    assert "--latent_dim cannot change in a resumed run" in line
    assert (out / "ckpt.pt").read_bytes() == saved
    vae.main(["--max_iters", "3", "--resume", *common])  # no --lr typed: the checkpoint's 1e-3
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["lr"] == 1e-3 and ckpt["optimizers"]["vae"]["param_groups"][0]["lr"] == 1e-3
    vae.main(["--max_iters", "4", "--resume", "--lr", "2e-4", *common])  # typed, though it is the default
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["config"]["lr"] == 2e-4 and ckpt["optimizers"]["vae"]["param_groups"][0]["lr"] == 2e-4


def test_corrupt_checkpoint_to_resume(shared_data, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"not a checkpoint at all")
    line = error_line(capsys, ["--data_dir", str(shared_data), "--out_dir", str(out), "--resume", *TINY])
    assert "cannot read checkpoint" in line
    assert (out / "ckpt.pt").read_bytes() == b"not a checkpoint at all"


def test_nan_loss_stops_and_keeps_last_good_checkpoint(shared_data, base_run, tmp_path, capsys):
    out = copy_of(base_run, tmp_path)  # --max_iters 2 --ckpt_interval 2 --log_interval 2
    common = ["--data_dir", str(shared_data), "--out_dir", str(out), "--ckpt_interval", "2", "--log_interval", "2", *TINY]
    good = (out / "ckpt.pt").read_bytes()
    assert "non-finite loss" in error_line(capsys, ["--max_iters", "20", "--resume", "--lr", "1e30", *common])
    assert (out / "ckpt.pt").read_bytes() == good
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2


# --- the run plumbing: old checkpoints, buffers, precision, fuzzed flags ----------------------


def test_old_format_checkpoint_is_refused(shared_data, base_run, tmp_path, capsys):
    out = copy_of(base_run, tmp_path)
    common = ["--data_dir", str(shared_data), "--out_dir", str(out), "--dtype", "float32", *TINY]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    load_models(vae, ckpt, "cpu")  # the format it writes loads
    ckpt["format"] = 1
    torch.save(ckpt, out / "ckpt.pt")
    saved = (out / "ckpt.pt").read_bytes()
    capsys.readouterr()
    line = error_line(capsys, ["--max_iters", "4", "--resume", *common])
    assert "is not a format-2 vae checkpoint" in line and (out / "ckpt.pt").read_bytes() == saved
    with pytest.raises(ValueError, match="not a format-2 vae checkpoint"):
        load_models(vae, ckpt, "cpu")


@pytest.mark.parametrize("arch,poisoned_step", [("conv", 2), ("conv", 3), ("csi5340", 3)])
def test_non_finite_batchnorm_buffer_alone_stops_the_run(shared_data, tmp_path, capsys, monkeypatch, arch, poisoned_step):
    # a running variance overflows while the weights and the losses (batch statistics in training) stay finite:
    # step 2 poisoned: ckpt.pt (step 2) is never written; step 3: ckpt.pt of step 2 stays, and ckpt_best.pt (the
    # evaluation at step 4, the first) is never written
    build, norms, adam_step, steps = vae.build_models, [], torch.optim.Adam.step, []

    def poisoned_build(config):
        models = build(config)
        norms.append(next(m for m in models["decoder"].modules() if isinstance(m, nn.BatchNorm2d)))
        return models

    def poisoning_step(self, *args, **kwargs):
        result = adam_step(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == poisoned_step:
            norms[0].running_var.fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", poisoning_step)
    monkeypatch.setattr(vae, "build_models", poisoned_build)
    out = tmp_path / "o"
    flags = TINY_CONV if arch == "conv" else ["--arch", "csi5340", "--depth", "2", "--width", "4", "--h_dim", "256",
                                              "--recon", "mse", "--latent_dim", "4", "--batch_size", "16", "--device", "cpu"]
    line = error_line(capsys, ["--data_dir", str(shared_data), "--out_dir", str(out), "--max_iters", "4", "--dtype",
                               "float32", "--log_interval", "1", "--ckpt_interval", "2", "--sample_interval", "4", *flags])
    assert f"non-finite loss or weights by step {2 if poisoned_step == 2 else 4}" in line, line
    assert all(math.isfinite(r["loss"]) for r in read_log(out))  # only the buffer was not finite
    assert not (out / "ckpt_best.pt").exists()
    if poisoned_step == 2:
        assert not (out / "ckpt.pt").exists()
    else:
        ckpt = torch.load(out / "ckpt.pt", weights_only=True)
        assert ckpt["step"] == 2 and all(t.isfinite().all() for m in ckpt["models"].values() for t in m.values()
                                         if t.is_floating_point())


def test_best_checkpoint_is_checked_before_it_is_written(shared_data, tmp_path, capsys, monkeypatch):
    # the evaluation at step 2 improves the test MSE while a batch-norm buffer is infinite: ckpt_best.pt of step 1 stays
    out = tmp_path / "o"
    common = ["--data_dir", str(shared_data), "--out_dir", str(out), "--dtype", "float32", "--sample_interval", "1",
              "--ckpt_interval", "1000", *TINY_CONV]
    vae.main(["--max_iters", "1", *common])
    capsys.readouterr()
    best = (out / "ckpt_best.pt").read_bytes()
    monkeypatch.setattr(vae, "draw_and_score", lambda models, *args: (
        next(m for m in models["encoder"].modules() if isinstance(m, nn.BatchNorm2d)).running_var.fill_(math.inf), 0.0)[1])
    line = error_line(capsys, ["--max_iters", "2", "--resume", *common])
    assert line == (f"vae.py: error: non-finite loss or weights by step 2; the last good checkpoint in {out} is kept; "
                    f"try a lower --lr")
    assert (out / "ckpt_best.pt").read_bytes() == best and not (out / "ckpt_best.pt.tmp").exists()


@pytest.mark.parametrize("faster", ["float32", "bfloat16"])
def test_dtype_auto_measures_through_main(shared_data, dtype_runs, tmp_path, monkeypatch, faster):
    common = ["--data_dir", str(shared_data), *DTYPE_FLAGS]
    trials = []

    def fake_time_trial(step, device, dtype):
        step()  # the trial step runs, on copies of the networks
        trials.append(dtype)
        return {"float32": 10.0, "bfloat16": 20.0}[dtype] if faster == "float32" else {"float32": 20.0, "bfloat16": 10.0}[dtype]

    monkeypatch.setattr(vae, "cpu_computes_bfloat16", lambda: True)
    monkeypatch.setattr(vae, "time_trial", fake_time_trial)
    out = tmp_path / "auto"
    vae.main(["--out_dir", str(out), "--dtype", "auto", *common])
    config = json.loads((out / "config.json").read_text())
    assert trials == ["float32", "bfloat16"] and config["precision"] == faster
    assert config["dtype_trial_ms"] == {"float32": 10.0 if faster == "float32" else 20.0,
                                        "bfloat16": 20.0 if faster == "float32" else 10.0}
    # the trial left the networks and the random streams as they were: the same losses as the run that named the dtype
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("ms_per_step", "images_per_s")} for r in rows]  # noqa: E731
    assert strip(read_log(out)) == strip(read_log(dtype_runs[faster]))


INT_FLAGS = {"img_size": [], "latent_dim": [], "hidden": [], "batch_size": [], "max_iters": [], "log_interval": [],
             "sample_interval": [], "ckpt_interval": [], "seed": [], "iw_k": [],
             "depth": ["--arch", "conv", "--img_size", "32", "--width", "4"], "width": ["--arch", "conv", "--depth", "2"],
             "h_dim": ["--arch", "csi5340", "--depth", "2", "--width", "4", "--recon", "mse"],
             "flow_length": ["--flow", "iaf"], "flow_hidden": ["--flow", "iaf"], "mixture": ["--recon", "dlogistic"]}
FLOAT_FLAGS = {"kl_weight": [], "lr": [], "beta1": [], "beta2": []}


def test_fuzzed_numeric_flags_end_cleanly(shared_data, tmp_path, capsys, monkeypatch):
    # each int and float flag at 0, -1 and 1e9: a run that ends, or one line on stderr and a non-zero exit, never a
    # traceback; the one case that means a very long run (--max_iters 1e9) is stopped after its first log row
    base = ["--data_dir", str(shared_data), "--dtype", "float32", "--max_iters", "2", "--hidden", "8", "--latent_dim",
            "2", "--batch_size", "4", "--device", "cpu"]
    outcomes = {}
    for flags, huge in ((INT_FLAGS, str(10 ** 9)), (FLOAT_FLAGS, "1e9")):
        for flag, extra in flags.items():
            for value in ("0", "-1", huge):
                if (flag, value) == ("max_iters", huge):
                    continue
                argv = [*base, "--out_dir", str(tmp_path / f"{flag}{value}"), *extra, f"--{flag}", value]
                try:
                    vae.main(argv)
                    outcomes[flag, value] = "ran"
                except SystemExit as e:
                    assert e.code != 0, (flag, value)
                    outcomes[flag, value] = "refused"
                err = capsys.readouterr().err.strip().splitlines()
                assert len(err) == (outcomes[flag, value] == "refused"), (flag, value, err)
                assert all(line.startswith("vae.py: error: ") for line in err), (flag, value, err)
    assert outcomes["lr", "0"] == outcomes["batch_size", str(10 ** 9)] == outcomes["img_size", str(10 ** 9)] == "refused"
    assert outcomes["seed", "-1"] == outcomes["kl_weight", "0"] == outcomes["beta2", "0"] == "ran"
    assert len(list(tmp_path.glob("*/log.jsonl"))) >= list(outcomes.values()).count("ran") > 10

    class Stopped(Exception):
        pass

    def log_then_stop(*args):
        write_log_row(*args)
        raise Stopped

    write_log_row = vae.write_log_row
    monkeypatch.setattr(vae, "write_log_row", log_then_stop)
    try:
        vae.main([*base, "--out_dir", str(tmp_path / "long"), "--max_iters", str(10 ** 9)])
    except SystemExit as e:  # ended: cleanly
        assert e.code != 0 and len(capsys.readouterr().err.strip().splitlines()) == 1
    except Stopped:  # it runs: its first row logged
        assert read_log(tmp_path / "long")[0]["step"] == 100 and not capsys.readouterr().err


def test_every_numeric_flag_is_fuzzed(monkeypatch):
    parsers, parse_run_flags = [], vae.parse_run_flags
    monkeypatch.setattr(vae, "parse_run_flags", lambda p, *args, **kw: parsers.append(p) or parse_run_flags(p, *args, **kw))
    vae.get_args([])
    numeric = {a.dest for a in parsers[0]._actions if a.type is int or "number" in getattr(a.type, "__qualname__", "")}
    assert numeric == set(INT_FLAGS) | set(FLOAT_FLAGS)
