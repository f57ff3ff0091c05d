import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import REPO, run_script

sys.path.insert(0, str(REPO))
import vae  # noqa: E402

TINY = ["--hidden", "32", "--latent_dim", "4", "--batch_size", "16", "--device", "cpu"]
TINY_CONV = ["--arch", "conv", "--img_size", "32", "--depth", "2", "--width", "4", "--latent_dim", "4", "--batch_size", "16", "--device", "cpu"]


def config(**kw):
    base = dict(channels=1, img_size=28, arch="mlp", hidden=400, latent_dim=20, depth=4, width=32, upsample="convtranspose",
                recon="bce", flow="none", flow_length=2, flow_hidden=0)
    return {**base, **kw}


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def mnist_batch(n=32, size=28):
    images, _ = vae.load_images(str(REPO / "data"), "mnist5k", "test", size)
    return vae.to_unit_interval(images[:n])


# --- architecture --------------------------------------------------------------------------


def test_defaults_follow_the_handouts():
    _, args = vae.get_args([])
    assert (args.arch, args.dataset, args.img_size, args.hidden, args.latent_dim) == ("mlp", "mnist5k", 28, 400, 20)
    assert (args.recon, args.kl_weight, args.batch_size, args.lr, args.beta1, args.iw_k) == ("bce", 1.0, 64, 2e-4, 0.5, 1)


def test_mlp_is_table_1():
    # seed 000 Table 1: 784 - 400 - (20, 20) - 400 - 784, sigmoid output
    models = vae.build_models(config())
    shapes = lambda m: [(l.in_features, l.out_features) for l in m.modules() if isinstance(l, nn.Linear)]
    assert shapes(models["encoder"]) == [(784, 400), (400, 20), (400, 20)]
    assert shapes(models["decoder"]) == [(20, 400), (400, 784)]
    x = mnist_batch(5)
    mu, logvar = vae.encode(models, x)
    assert mu.shape == logvar.shape == (5, 20)
    out = vae.generate(models, vae.sample_latent(config(), 5, "cpu"))
    assert out.shape == (5, 1, 28, 28) and 0 <= out.min() and out.max() <= 1


@pytest.mark.parametrize("img_size,depth,upsample", [(64, 4, "convtranspose"), (32, 1, "nearest"), (32, 5, "bilinear")])
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


def test_seed_002_face_model():
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


def test_vae_loss_is_reconstruction_plus_weighted_kl():
    models = vae.build_models(config(hidden=16, latent_dim=3))
    e, d = models["encoder"], models["decoder"]
    x = mnist_batch(8)
    torch.manual_seed(5)
    loss, recon, kl, _ = vae.vae_loss(e, d, None, x, "bce", 0.3, 1)
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
    log_w = vae.log_importance_weights(models, x, 1000, max_elements=40000)  # decoded 3 draws at a time
    assert log_w.shape == (1000, 16) and torch.isfinite(log_w).all()
    bound = {k: (torch.logsumexp(log_w.view(1000 // k, k, 16), 1) - math.log(k)).mean().item() for k in (1, 5, 50)}
    assert bound[1] < bound[5] < bound[50], bound
    # the training objective on the same model and batch: IWAE with K=5 is at least the ELBO (K=1)
    e, d, f = models["encoder"], models["decoder"], models.get("flow")
    with torch.no_grad():
        elbo = -torch.stack([vae.vae_loss(e, d, f, x, "bce", 1.0, 1)[0] for _ in range(20)]).mean()
        iwae = -torch.stack([vae.vae_loss(e, d, f, x, "bce", 1.0, 5)[0] for _ in range(20)]).mean()
    assert iwae > elbo, (iwae, elbo)


def test_encode_with_a_flow_gives_the_decoders_code():
    models = vae.build_models(config(hidden=16, latent_dim=3, flow="iaf"))
    x = mnist_batch(4)
    mu, logvar = vae.encode(models, x)
    mu0, logvar0, h = models["encoder"](x)
    assert torch.allclose(mu, models["flow"](mu0, h)[0]) and not torch.allclose(mu, mu0)
    assert torch.allclose(logvar, logvar0)  # the base Gaussian's


def test_latent_map_pca_and_tsne_paths(monkeypatch):
    torch.manual_seed(0)
    points = torch.randn(200, 6) * torch.tensor([5.0, 1, 1, 1, 3, 1])
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import fails: PCA
    xy, method = vae.latent_map(points)
    assert method == "PCA" and xy.shape == (200, 2)
    assert abs(xy[:, 0].var().item() - 25) < 5 and abs(xy[:, 1].var().item() - 9) < 2.5  # the two widest directions
    fake = types.ModuleType("sklearn.manifold")
    fake.TSNE = lambda n, **kw: types.SimpleNamespace(fit_transform=lambda a: a[:, :n].copy())
    monkeypatch.setitem(sys.modules, "sklearn", types.ModuleType("sklearn"))
    monkeypatch.setitem(sys.modules, "sklearn.manifold", fake)
    xy, method = vae.latent_map(points)
    assert method == "t-SNE" and torch.equal(xy, points[:, :2])


# --- training runs -------------------------------------------------------------------------


def check_interface(ckpt, size):
    models = vae.load_models(ckpt, "cpu")
    x = torch.rand(5, ckpt["config"]["channels"], size, size)
    mu, logvar = vae.encode(models, x)
    assert mu.shape == logvar.shape == (5, ckpt["config"]["latent_dim"])
    images = vae.generate(models, vae.sample_latent(ckpt["config"], 4, "cpu"))
    assert images.shape == (4, 1, size, size) and 0 <= images.min() and images.max() <= 1
    assert vae.generate(models, mu).shape == x.shape
    log_w = vae.log_importance_weights(models, x, 7)
    assert log_w.shape == (7, 5) and torch.isfinite(log_w).all()


def test_copied_alone_next_to_its_data_writes_every_output(tiny_mnist, tmp_path):
    alone = tmp_path / "alone"  # the script copied alone into an empty folder, run with the default paths
    alone.mkdir()
    shutil.copy(REPO / "vae.py", alone)
    shutil.copytree(tiny_mnist, alone / "data")
    proc = run_script("vae.py", "--max_iters", "6", "--log_interval", "2", "--sample_interval", "3", "--ckpt_interval", "3",
                      "--lr", "1e-3", *TINY, cwd=alone)
    out = alone / "out" / "vae"
    for name in ("ckpt.pt", "ckpt_best.pt", "log.jsonl", "curves.png", "config.json", "samples/step_000003.png",
                 "samples/step_000006.png", "reconstructions.png", "latents.png"):
        assert (out / name).exists(), name
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
    assert best["step"] in (3, 6) and best["best_test_mse"] == min(r["test_mse"] for r in rows if "test_mse" in r)
    check_interface(ckpt, 28)
    from PIL import Image
    assert Image.open(out / "samples/step_000006.png").size == (6 * 30 + 2, 6 * 30 + 2)  # 6x6 grid, 2 px padding
    assert Image.open(out / "reconstructions.png").size == (10 * 30 + 2, 2 * 30 + 2)  # 10 test images above their reconstructions


def test_conv_iwae_planar_variant_trains_and_loads(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    run_script("vae.py", "--data_dir", tiny_mnist, "--out_dir", out, "--max_iters", "3", "--log_interval", "1",
               "--flow", "planar", "--iw_k", "3", "--upsample", "nearest", *TINY_CONV)
    rows = read_log(out)
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) and np.isfinite(r["kl"]) for r in rows)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert "flow" in ckpt["models"] and ckpt["config"]["iw_k"] == 3
    check_interface(ckpt, 32)


def test_sigkill_then_resume_gives_identical_losses(tiny_mnist, tmp_path):
    common = ["--data_dir", tiny_mnist, "--log_interval", "1", "--ckpt_interval", "10", "--sample_interval", "15", *TINY]
    straight = tmp_path / "straight"
    run_script("vae.py", "--out_dir", straight, "--max_iters", "40", *common)
    expected = {r["step"]: r for r in read_log(straight)}

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "vae.py", "--out_dir", killed, "--max_iters", "100000", *map(str, common)],
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

    run_script("vae.py", "--out_dir", killed, "--max_iters", "40", "--resume", *common)
    rows = read_log(killed)
    assert [r["step"] for r in rows] == list(range(1, 41))  # lines after the checkpoint were replaced, not duplicated
    for r in rows:
        for key in ("loss", "recon", "kl", "test_mse"):
            assert r.get(key) == expected[r["step"]].get(key), (r["step"], key)
    assert [r["step"] for r in rows if "test_mse" in r] == [15, 30, 40]


def test_torchrun_two_processes(tiny_mnist, tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29641",
                           "vae.py", "--data_dir", str(tiny_mnist), "--out_dir", str(out), "--max_iters", "3",
                           "--log_interval", "1", "--flow", "iaf", "--recon", "mse", *TINY],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3
    assert not any(k.startswith("module.") for m in ckpt["models"].values() for k in m)  # saved without the DDP wrapper
    assert ckpt["models"]["decoder"]["log_sigma"] != 0  # sigma's gradient went through the wrapped decoder
    rows = read_log(out)
    assert len(rows) == 3 and "sigma" in rows[0]  # only rank 0 writes
    check_interface(ckpt, 28)  # an MLP with an IAF posterior and a Gaussian decoder


# --- checkpoints and bad input -------------------------------------------------------------


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    vae.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def torn_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        vae.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1


def test_load_models_rejects_other_checkpoints():
    with pytest.raises(ValueError, match="not a vae checkpoint"):
        vae.load_models({"script": "dcgan", "format": 1}, "cpu")


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


@pytest.mark.parametrize("flags,message", [(["--arch", "conv", "--img_size", "28"], "--img_size 28"),
                                           (["--iw_k", "0"], "--iw_k 0"), (["--kl_weight", "-1"], "--kl_weight -1")])
def test_bad_flags(tiny_mnist, tmp_path, capsys, flags, message):
    assert message in error_line(capsys, ["--data_dir", str(tiny_mnist), "--out_dir", str(tmp_path / "o"), *flags])


def test_corrupt_checkpoint_to_resume(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"not a checkpoint at all")
    line = error_line(capsys, ["--data_dir", str(tiny_mnist), "--out_dir", str(out), "--resume", *TINY])
    assert "cannot read checkpoint" in line
    assert (out / "ckpt.pt").read_bytes() == b"not a checkpoint at all"


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "o"
    common = ["--data_dir", str(tiny_mnist), "--out_dir", str(out), "--ckpt_interval", "2", "--log_interval", "2", *TINY]
    vae.main(["--max_iters", "2", *common])
    capsys.readouterr()
    good = (out / "ckpt.pt").read_bytes()
    assert "non-finite loss" in error_line(capsys, ["--max_iters", "20", "--resume", "--lr", "1e30", *common])
    assert (out / "ckpt.pt").read_bytes() == good
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2
