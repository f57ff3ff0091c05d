"""VAE: variational autoencoders in one file, with importance weighting and flow posteriors.

Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014; Rezende, Mohamed,
Wierstra, "Stochastic Backpropagation and Approximate Inference in Deep Generative
Models", ICML 2014. Variants: the importance-weighted bound of Burda, Grosse,
Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016 (--iw_k); planar flows
of Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015 and
inverse autoregressive flows of Kingma et al., "Improved Variational Inference with
Inverse Autoregressive Flow", NeurIPS 2016 (--flow). The networks follow the course
handouts in the project's seeds: the fully connected 784-400-(20, 20)-400-784 VAE
(seed 000, Table 1), a convolutional VAE for 64x64 faces (seed 002: four strided
convolutions, 512-d latent, batch norm, LeakyReLU 0.01) with a depth of 1 to 5
(seed 004), IWAE with 5 importance samples and a flow posterior (seed 003 §4).

    python vae.py                                      # MLP VAE on the embedded MNIST sample, 28x28
    python vae.py --iw_k 5 --out_dir out/iwae          # IWAE, 5 importance samples
    python vae.py --flow iaf --flow_length 4           # inverse autoregressive flow posterior
    python vae.py --dataset celeba --img_size 64 --arch conv --depth 4 --latent_dim 512 --recon mse --kl_weight 0.24
    torchrun --nproc_per_node=2 vae.py                 # DistributedDataParallel

The per-image loss: the reconstruction term is summed over pixels (binary cross
entropy, or squared error in [0, 1] pixel units), the KL term is summed over latent
dimensions, and --kl_weight multiplies the KL term; the loss is their batch mean. With
--recon bce and --kl_weight 1 this is the negative ELBO of a Bernoulli decoder. Seed
002 took means instead (MSE over pixels + 1e-2 x KL averaged over latent dims); the
same balance here is --kl_weight 1e-2 * D / latent_dim (0.24 for 64x64x3 and 512).

Everything the run makes goes to --out_dir: ckpt.pt, ckpt_best.pt (lowest test MSE),
samples/step_*.png, reconstructions.png, latents.png, log.jsonl, curves.png and
config.json.
"""
import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.utils import save_image

SCRIPT = "vae"
CHECKPOINT_FORMAT = 1
LOG_2PI = math.log(2 * math.pi)
SIGMA_LR_SCALE = 50.0  # learning rate of the decoder's log-sigma (--recon mse) relative to --lr


# -----------------------------------------------------------------------------
# Data: data/<dataset>/{train,test}.npy, uint8 N x H x W x C, held on the device


def load_images(data_dir, dataset, split, img_size):
    """The prepared arrays of a dataset as uint8 N x C x H x W, resized once to img_size."""
    folder = os.path.join(data_dir, dataset)
    path = os.path.join(folder, f"{split}.npy")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {split} split of '{dataset}' at {path}; make it with: python {folder}/prepare.py")
    try:
        images = np.load(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} ({e}); remake it with: python {folder}/prepare.py") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{path} should hold uint8 N x H x W x C with C = 1 or 3, not {images.dtype} {images.shape}")
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    if images.shape[-1] != img_size or images.shape[-2] != img_size:
        images = resize_uint8(images, img_size)
    labels_path = os.path.join(folder, f"{split}_labels.npy")
    labels = torch.from_numpy(np.load(labels_path)).long() if os.path.exists(labels_path) else None
    return images, labels


def resize_uint8(images, size, chunk=1024):
    out = torch.empty(len(images), images.shape[1], size, size, dtype=torch.uint8)
    for i in range(0, len(images), chunk):
        x = F.interpolate(images[i:i + chunk].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i:i + chunk] = x.round().clamp(0, 255).to(torch.uint8)
    return out


def real_images(config, split):
    return load_images(config["data_dir"], config["dataset"], split, config["img_size"])


def to_unit_interval(images_uint8):
    """uint8 [0, 255] -> float [0, 1], the range of the decoder's sigmoid (the GAN scripts use [-1, 1])."""
    return images_uint8.float().div(255.0)


# -----------------------------------------------------------------------------
# Encoders q0(z|x) = N(mu(x), diag exp(logvar(x))) and decoders p(x|z).
# An encoder returns (mu, logvar, h): h is its last hidden layer, the context of the IAF.
# A decoder returns logits; the image is their sigmoid, in [0, 1] for both --recon kinds.


class MLPEncoder(nn.Module):
    """Seed 000 Table 1, FC 1 and FC 2a/2b: D -> 400 (ReLU) -> mean (20) and log-variance (20).

    The table lists a ReLU after 2a/2b too; a mean or log-variance clipped at 0 cannot
    express a posterior, so they stay linear, as in Kingma & Welling (appendix C).
    """

    def __init__(self, in_dim, hidden, latent_dim):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_dim, hidden), nn.ReLU(True))
        self.fc_mu = nn.Linear(hidden, latent_dim)
        self.fc_logvar = nn.Linear(hidden, latent_dim)
        self.feature_dim = hidden

    def forward(self, x):
        h = self.body(x)
        return self.fc_mu(h), self.fc_logvar(h), h


class MLPDecoder(nn.Module):
    """Seed 000 Table 1, FC 3 and FC 4: latent (20) -> 400 (ReLU) -> D (sigmoid, applied by the caller)."""

    def __init__(self, latent_dim, hidden, channels, img_size, recon):
        super().__init__()
        self.shape = (channels, img_size, img_size)
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(True), nn.Linear(hidden, channels * img_size * img_size))
        add_likelihood(self, recon)

    def forward(self, z):
        return self.net(z).view(-1, *self.shape)


def upsample_block(in_ch, out_ch, mode, bias=False):
    """Double the spatial size: a strided transposed conv, or resize then 3x3 conv (seed 003 §3)."""
    if mode == "convtranspose":
        return nn.ConvTranspose2d(in_ch, out_ch, 4, 2, 1, bias=bias)
    align = dict(align_corners=False) if mode == "bilinear" else {}
    return nn.Sequential(nn.Upsample(scale_factor=2, mode=mode, **align), nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=bias))


class ConvEncoder(nn.Module):
    """depth strided 4x4 convolutions (BN, LeakyReLU 0.01), then two dense heads (seed 002, seed 004).

    For img_size 64, depth 4, width 32 (seed 002):
    C x 64 x 64 -> 32 x 32 x 32 -> 64 x 16 x 16 -> 128 x 8 x 8 -> 256 x 4 x 4 -> (4096) -> mean, log-variance (512)
    """

    def __init__(self, channels, img_size, depth, width, latent_dim):
        super().__init__()
        layers, in_ch = [], channels
        for i in range(depth):
            layers += [nn.Conv2d(in_ch, width * 2 ** i, 4, 2, 1, bias=False), nn.BatchNorm2d(width * 2 ** i), nn.LeakyReLU(0.01, True)]
            in_ch = width * 2 ** i
        # (width * 2^(depth-1)) x (img_size / 2^depth) x (img_size / 2^depth)
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.feature_dim = in_ch * (img_size // 2 ** depth) ** 2
        self.fc_mu = nn.Linear(self.feature_dim, latent_dim)
        self.fc_logvar = nn.Linear(self.feature_dim, latent_dim)

    def forward(self, x):
        h = self.body(x)
        return self.fc_mu(h), self.fc_logvar(h), h


class ConvDecoder(nn.Module):
    """A dense layer, then depth layers that double the size (seed 002), the encoder mirrored.

    For img_size 64, depth 4, width 32:
    latent (512) -> 256 x 4 x 4 -> 128 x 8 x 8 -> 64 x 16 x 16 -> 32 x 32 x 32 -> C x 64 x 64 (logits)
    """

    def __init__(self, latent_dim, channels, img_size, depth, width, upsample, recon):
        super().__init__()
        self.start = (width * 2 ** (depth - 1), img_size // 2 ** depth, img_size // 2 ** depth)
        self.fc = nn.Linear(latent_dim, math.prod(self.start))
        layers = [nn.BatchNorm2d(self.start[0]), nn.LeakyReLU(0.01, True)]
        for i in reversed(range(1, depth)):
            layers += [upsample_block(width * 2 ** i, width * 2 ** (i - 1), upsample), nn.BatchNorm2d(width * 2 ** (i - 1)), nn.LeakyReLU(0.01, True)]
        # width x (img_size / 2) x (img_size / 2)
        layers += [upsample_block(width, channels, upsample, bias=True)]
        # channels x img_size x img_size
        self.net = nn.Sequential(*layers)
        add_likelihood(self, recon)

    def forward(self, z):
        return self.net(self.fc(z).view(-1, *self.start))


def add_likelihood(decoder, recon):
    """What p(x|z) the decoder stands for: Bernoulli logits (bce) or a Gaussian with one learned sigma (mse).

    sigma is trained only by a detached Gaussian NLL (decoder_sigma_loss), so the MSE training of the
    rest is unchanged and sigma^2 tracks the mean squared error; it is needed for a proper density.
    """
    decoder.recon = recon
    if recon == "mse":
        decoder.log_sigma = nn.Parameter(torch.zeros(()))


# -----------------------------------------------------------------------------
# Normalizing flows z_0 -> z_K: each returns (z_K, sum_k log |det dz_k / dz_(k-1)|),
# so that log q(z_K|x) = log q0(z_0|x) - that sum.


class PlanarFlow(nn.Module):
    """f(z) = z + u_hat tanh(w.z + b) (Rezende & Mohamed 2015), flow_length layers, global parameters.

    u_hat = u + (m(w.u) - w.u) w / |w|^2 with m(a) = -1 + softplus(a) keeps w.u_hat > -1, so each
    layer is invertible (their appendix); log |det| = log(1 + (1 - tanh^2(w.z + b)) w.u_hat).
    """

    def __init__(self, latent_dim, length):
        super().__init__()
        self.u = nn.Parameter(torch.randn(length, latent_dim) * 0.1)
        self.w = nn.Parameter(torch.randn(length, latent_dim) * 0.1)
        self.b = nn.Parameter(torch.zeros(length))

    def forward(self, z, h=None):
        logdet = z.new_zeros(z.shape[0])
        for u, w, b in zip(self.u, self.w, self.b):
            wu = w @ u
            u_hat = u + (F.softplus(wu) - 1 - wu) * w / (w @ w)
            t = torch.tanh(z @ w + b)
            z = z + t[:, None] * u_hat
            logdet = logdet + torch.log1p((1 - t ** 2) * (w @ u_hat))
        return z, logdet


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (MADE, Germain et al. 2015)."""

    def __init__(self, in_features, out_features, mask):
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.float())

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


class IAFStep(nn.Module):
    """One step of Kingma et al. 2016, Algorithm 1: [m, s] = AutoregressiveNN(z, h); sigma = sigmoid(s);
    z = sigma * z + (1 - sigma) * m; log |det| = sum log sigma.

    The autoregressive network is a two-hidden-layer MADE: output i sees inputs 1..i-1 only, so the
    Jacobian is triangular. The context h (the encoder's last hidden layer) enters the first layer.
    """

    def __init__(self, latent_dim, hidden, context_dim):
        super().__init__()
        d_in = torch.arange(1, latent_dim + 1)
        d_hid = torch.arange(hidden) % max(latent_dim - 1, 1) + 1  # hidden unit degrees in 1..L-1
        self.inp = MaskedLinear(latent_dim, hidden, d_hid[:, None] >= d_in[None, :])
        self.context = nn.Linear(context_dim, hidden)
        self.mid = MaskedLinear(hidden, hidden, d_hid[:, None] >= d_hid[None, :])
        self.m = MaskedLinear(hidden, latent_dim, d_in[:, None] > d_hid[None, :])
        self.s = MaskedLinear(hidden, latent_dim, d_in[:, None] > d_hid[None, :])
        nn.init.constant_(self.s.bias, 2.0)  # sigma near 1 at the start: close to the identity (their §4)

    def forward(self, z, h):
        a = F.elu(self.inp(z) + self.context(h))
        a = F.elu(self.mid(a))
        s = self.s(a)
        sigma = torch.sigmoid(s)
        return sigma * z + (1 - sigma) * self.m(a), F.logsigmoid(s).sum(-1)


class InverseAutoregressiveFlow(nn.Module):
    """flow_length IAF steps; the order of the latent dimensions is reversed between steps."""

    def __init__(self, latent_dim, length, hidden, context_dim):
        super().__init__()
        self.steps = nn.ModuleList(IAFStep(latent_dim, hidden, context_dim) for _ in range(length))

    def forward(self, z, h):
        logdet = z.new_zeros(z.shape[0])
        for i, step in enumerate(self.steps):
            if i > 0:
                z = z.flip(-1)  # a permutation: |det| = 1
            z, step_logdet = step(z, h)
            logdet = logdet + step_logdet
        return z, logdet


def build_models(config):
    c, s, L = config["channels"], config["img_size"], config["latent_dim"]
    if config["arch"] == "mlp":
        encoder = MLPEncoder(c * s * s, config["hidden"], L)
        decoder = MLPDecoder(L, config["hidden"], c, s, config["recon"])
    else:
        encoder = ConvEncoder(c, s, config["depth"], config["width"], L)
        decoder = ConvDecoder(L, c, s, config["depth"], config["width"], config["upsample"], config["recon"])
    models = {"encoder": encoder, "decoder": decoder}
    if config["flow"] == "planar":
        models["flow"] = PlanarFlow(L, config["flow_length"])
    elif config["flow"] == "iaf":
        models["flow"] = InverseAutoregressiveFlow(L, config["flow_length"], config["flow_hidden"] or 2 * L, encoder.feature_dim)
    return models


# -----------------------------------------------------------------------------
# Losses and densities, per image (summed over the pixels / latent dimensions).


def bernoulli_log_likelihood(x, logits):
    """sum_i x_i log p_i + (1 - x_i) log(1 - p_i), p = sigmoid(logits): minus the summed BCE."""
    return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum((-3, -2, -1))


def continuous_bernoulli_log_norm(logits):
    """log C(p) with C(p) = 2 artanh(1 - 2p) / (1 - 2p) (Loaiza-Ganem & Cunningham 2019), summed over pixels.

    Adding it to the Bernoulli log-likelihood gives a density that integrates to 1 over [0, 1].
    With p = sigmoid(l), C = l / tanh(l / 2): log C = log |l| - log tanh(|l| / 2), and near l = 0
    (where both vanish) the series l / tanh(l / 2) = 2 + l^2 / 6 + O(l^4).
    """
    a = logits.abs()
    small = a < 1e-2
    a_safe = torch.where(small, torch.ones_like(a), a)
    large = torch.log(a_safe) - torch.log1p(-torch.exp(-a_safe)) + F.softplus(-a_safe)  # log|tanh(a/2)| = log(1-e^-a) - log(1+e^-a)
    series = torch.log(2 + a ** 2 / 6)
    return torch.where(small, series, large).sum((-3, -2, -1))


def gaussian_nll(x, x_hat, log_sigma):
    """-log N(x; x_hat, sigma^2 I), summed over pixels."""
    return (0.5 * ((x - x_hat) * torch.exp(-log_sigma)) ** 2 + log_sigma + 0.5 * LOG_2PI).sum((-3, -2, -1))


def reconstruction_loss(kind, x, logits):
    """The training reconstruction term per image: summed BCE, or summed squared error of sigmoid(logits)."""
    if kind == "bce":
        return -bernoulli_log_likelihood(x, logits)
    return (torch.sigmoid(logits) - x).pow(2).sum((-3, -2, -1))


def gaussian_kl(mu, logvar):
    """KL(N(mu, diag exp(logvar)) || N(0, I)) in closed form (Kingma & Welling, appendix B)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1)


def log_standard_normal(z):
    return -0.5 * (z.pow(2) + LOG_2PI).sum(-1)


def posterior_samples(mu, logvar, h, flow, k):
    """k reparametrised draws z ~ q(z|x) per image, (k, N, L), and log q(z|x), (k, N).

    z_0 = mu + sigma * eps; with a flow z = z_K = f(z_0) and log q(z_K|x) = log q0(z_0|x) - log |det df/dz_0|.
    """
    eps = torch.randn(k, *mu.shape, device=mu.device)
    z = mu + torch.exp(0.5 * logvar) * eps
    log_q = -0.5 * (eps.pow(2) + logvar + LOG_2PI).sum(-1)
    if flow is not None:
        with torch.autocast(mu.device.type, enabled=False):  # log-determinants in float32, also under bf16 autocast
            z, logdet = flow(z.flatten(0, 1), h.repeat(k, 1))
        z, log_q = z.view(k, *mu.shape), log_q - logdet.view(k, -1)
    return z, log_q


def vae_loss(encoder, decoder, flow, x, recon_kind, kl_weight, k):
    """Minus the training bound, averaged over the batch, and the mean reconstruction and KL terms.

    k = 1 without a flow: the VAE of the handouts, reconstruction + kl_weight * KL with KL in closed form.
    Otherwise the importance-weighted bound of Burda et al., log (1/k) sum_j w_j with
    log w_j = -reconstruction(z_j) - kl_weight * (log q(z_j|x) - log p(z_j)), z_j ~ q(z|x); for k = 1 this is
    the ELBO with a one-sample Monte Carlo KL (the only KL a flow has). Only kl_weight = 1 makes it a bound
    on log p(x); other weights temper the prior-to-posterior ratio inside the average.
    Returns (loss, reconstruction (N,), KL (N,), decoder output (k*N or N images, logits)).
    """
    mu, logvar, h = (t.float() for t in encoder(x))
    if k == 1 and flow is None:
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        logits = decoder(z).float()
        recon, kl = reconstruction_loss(recon_kind, x, logits), gaussian_kl(mu, logvar)
        return (recon + kl_weight * kl).mean(), recon, kl, logits
    z, log_q = posterior_samples(mu, logvar, h, flow, k)
    logits = decoder(z.flatten(0, 1)).float()
    recon = reconstruction_loss(recon_kind, x, logits.view(k, *x.shape))  # (k, N)
    kl = log_q - log_standard_normal(z)  # (k, N), one-sample Monte Carlo estimates
    bound = torch.logsumexp(-recon - kl_weight * kl, 0) - math.log(k)
    return -bound.mean(), recon.mean(0), kl.mean(0), logits


def decoder_sigma_loss(x, logits, log_sigma):
    """The Gaussian NLL that fits the decoder's sigma alone (--recon mse): the decoder output is detached,
    so the MSE training of everything else is unchanged, and the optimum is sigma^2 = the mean squared error."""
    return gaussian_nll(x, torch.sigmoid(logits.detach()).view(-1, *x.shape), log_sigma).mean()


# -----------------------------------------------------------------------------
# The interface evaluate.py and interpolate.py use (README: "The model interface")


def load_models(ckpt, device):
    if ckpt.get("script") != SCRIPT or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"not a {SCRIPT} checkpoint (script={ckpt.get('script')!r}, format={ckpt.get('format')!r})")
    models = build_models(ckpt["config"])
    for name, model in models.items():
        model.load_state_dict(ckpt["models"][name])
        model.to(device).eval()
    return models


def sample_latent(config, n, device, generator=None):
    return torch.randn(n, config["latent_dim"], device=device, generator=generator)


@torch.no_grad()
def generate(models, z, labels=None):
    """The decoder's mean in [0, 1] (for --recon bce the Bernoulli mean sigmoid(logits))."""
    return torch.sigmoid(models["decoder"](z).float())


@torch.no_grad()
def encode(models, x):
    """(mu, logvar) of q(z|x) for x in [0, 1]. With a flow q(z_K|x) is not Gaussian and its mean has no closed
    form: mu is then f(mu_0), the flow's image of the base Gaussian's mean, which is a code the decoder reads
    (an IAF can move it far from mu_0), and logvar stays that of the base Gaussian q0(z_0|x)."""
    mu, logvar, h = models["encoder"](x)
    mu, logvar = mu.float(), logvar.float()
    if "flow" in models:
        mu, _ = models["flow"](mu, h.float())
    return mu, logvar


def log_likelihood(decoder, x, logits):
    """log p(x|z) as a proper density on [0, 1]^D: continuous Bernoulli (bce) or Gaussian with the learned sigma (mse).

    The Gaussian is a density on R^D; its mass outside [0, 1]^D is lost, so likelihoods from it are lower bounds.
    """
    if decoder.recon == "bce":
        return bernoulli_log_likelihood(x, logits) + continuous_bernoulli_log_norm(logits)
    return -gaussian_nll(x, torch.sigmoid(logits), decoder.log_sigma)


@torch.no_grad()
def log_importance_weights(models, x, k, max_elements=1 << 22):
    """log p(x, z_j) - log q(z_j|x) for z_j ~ q(z|x), j = 1..k: a (k, N) tensor. The flow's log-det is in
    log q. The k draws are decoded in chunks of at most max_elements output pixels."""
    encoder, decoder, flow = models["encoder"], models["decoder"], models.get("flow")
    mu, logvar, h = (t.float() for t in encoder(x))
    chunk = max(1, max_elements // x.numel())
    out = []
    for start in range(0, k, chunk):
        j = min(chunk, k - start)
        z, log_q = posterior_samples(mu, logvar, h, flow, j)
        logits = decoder(z.flatten(0, 1)).float().view(j, *x.shape)
        out.append(log_likelihood(decoder, x, logits) + log_standard_normal(z) - log_q)
    return torch.cat(out)


# -----------------------------------------------------------------------------
# Analyses: test-set MSE, the 2-D map of the latents (seed 002 §3, §5)


@torch.no_grad()
def reconstruction_mse(models, images_uint8, chunk=500):
    """Mean squared error of the reconstructions decoder(mu) over a whole split, in [0, 1] pixel units."""
    total = 0.0
    for i in range(0, len(images_uint8), chunk):
        x = to_unit_interval(images_uint8[i:i + chunk])
        total += (generate(models, encode(models, x)[0]) - x).pow(2).sum().item()
    return total / images_uint8.numel()


def latent_map(points):
    """2-D embedding of (N, L) points: t-SNE through scikit-learn when it is installed, else PCA."""
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        centred = points - points.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        return centred @ v[:2].T, "PCA"
    perplexity = min(30.0, (len(points) - 1) / 3)
    return torch.from_numpy(TSNE(2, perplexity=perplexity, init="pca", random_state=0).fit_transform(points.numpy())), "t-SNE"


def save_latent_map(xy, labels, method, label_name, png_path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 5.5))
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=4)
    else:
        cmap = "tab10" if labels.max() < 10 else "viridis"
        points = ax.scatter(xy[:, 0], xy[:, 1], c=labels, s=4, cmap=cmap)
        fig.colorbar(points, ax=ax, label=label_name)
    ax.set_title(f"test-set latent means, {method}" + (f", coloured by {label_name}" if labels is not None else ""))
    fig.tight_layout()
    fig.savefig(png_path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(png_path + ".tmp.png", png_path)


def map_labels(labels, config):
    """One integer per image for the latent map, and its name: the class, or one attribute column (CelebA)."""
    if labels is None or labels.dim() == 1:
        return labels, "label"
    names_path = os.path.join(config["data_dir"], config["dataset"], "attr_names.json")
    names = []
    if os.path.exists(names_path):
        with open(names_path) as f:
            names = json.load(f)
    col = names.index(config["map_attr"]) if config["map_attr"] in names else 0
    return labels[:, col], names[col] if names else f"attribute {col}"


# -----------------------------------------------------------------------------
# Run outputs


def save_checkpoint(ckpt, path):
    """Write to a temporary file, then rename: a kill mid-save never leaves a torn ckpt.pt."""
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {path}") from None
    except Exception as e:  # torch raises several types for a torn or foreign file
        raise ValueError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None


def plot_curves(log_path, png_path, keys):
    """One panel per tuple of keys; a key is drawn at the steps whose rows have it (test_mse: evaluations only)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    with open(log_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        return
    groups = [k for k in keys if isinstance(k, tuple)]
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for key in group:
            have = [r for r in rows if key in r]
            ax.plot([r["step"] for r in have], [r[key] for r in have], label=key, marker="o" if len(have) < 30 else None)
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(png_path + ".tmp.png", png_path)


def truncate_log(log_path, last_step):
    """On resume, drop log lines written after the checkpoint we continue from."""
    if not os.path.exists(log_path):
        return
    with open(log_path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    with open(log_path, "w") as f:
        f.writelines(rows)


# -----------------------------------------------------------------------------
# Training


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Train a VAE.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="mnist5k", help="folder under --data_dir holding train.npy / test.npy")
    p.add_argument("--data_dir", default="data", help="where the prepared datasets live")
    p.add_argument("--out_dir", default="out/vae", help="checkpoints, samples, logs and plots go here")
    p.add_argument("--img_size", type=int, default=28, help="any size for --arch mlp (28: 784 inputs, seed 000); 32 or 64 for --arch conv")
    p.add_argument("--arch", default="mlp", choices=["mlp", "conv"], help="fully connected (seed 000 Table 1) or convolutional (seed 002, seed 004)")
    p.add_argument("--latent_dim", type=int, default=20, help="latent size (seed 000: 20; seed 002 faces: 512)")
    p.add_argument("--hidden", type=int, default=400, help="--arch mlp: hidden layer width (seed 000: 400)")
    p.add_argument("--depth", type=int, default=4, choices=range(1, 6), help="--arch conv: strided layers in encoder and decoder (seed 002: 4)")
    p.add_argument("--width", type=int, default=32, help="--arch conv: channels of the first conv layer, doubled per layer")
    p.add_argument("--upsample", default="convtranspose", choices=["convtranspose", "nearest", "bilinear"],
                   help="--arch conv: how the decoder doubles resolution: transposed conv, or resize then 3x3 conv (seed 003 §3)")
    p.add_argument("--recon", default="bce", choices=["bce", "mse"], help="reconstruction term per image, summed over pixels")
    p.add_argument("--kl_weight", type=float, default=1.0,
                   help="weight of the summed KL against the summed reconstruction term (1: the ELBO; seed 002's 1e-2 on means is 1e-2 * D / latent_dim here)")
    p.add_argument("--iw_k", type=int, default=1, help="importance samples of the IWAE bound (seed 003: 5); 1: the plain ELBO")
    p.add_argument("--flow", default="none", choices=["none", "planar", "iaf"], help="normalizing-flow posterior (seed 003 §4a)")
    p.add_argument("--flow_length", type=int, default=4, help="flow layers / IAF steps")
    p.add_argument("--flow_hidden", type=int, default=0, help="IAF: width of its MADE layers; 0: twice --latent_dim")
    p.add_argument("--map_attr", default="Male", help="for multi-attribute labels (CelebA): the attribute colouring latents.png")
    p.add_argument("--batch_size", type=int, default=64, help="images per step, over all processes (seed 002: 64)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (seed 002)")
    p.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (seed 002)")
    p.add_argument("--beta2", type=float, default=0.999, help="Adam beta2")
    p.add_argument("--max_iters", type=int, default=20000, help="training steps")
    p.add_argument("--log_interval", type=int, default=100, help="steps between log.jsonl lines")
    p.add_argument("--sample_interval", type=int, default=2000,
                   help="steps between evaluations: test MSE, ckpt_best.pt, sample grid, reconstructions.png, curves.png")
    p.add_argument("--ckpt_interval", type=int, default=2000, help="steps between checkpoints (one is always written at the end)")
    p.add_argument("--seed", type=int, default=1337, help="random seed")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="autocast dtype; auto: bfloat16 on CUDA, else float32")
    p.add_argument("--compile", action="store_true", help="torch.compile encoder and decoder")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue from CKPT (default: --out_dir/ckpt.pt) exactly where it stopped")
    return p, p.parse_args(argv)


# Flags a resumed run may change; everything else comes from the checkpoint.
RESUMABLE_OVERRIDES = ("max_iters", "lr", "log_interval", "sample_interval", "ckpt_interval", "device", "dtype", "compile", "out_dir")


def resolve_device(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def fail(message):
    print(f"{SCRIPT}.py: error: {message}", file=sys.stderr)
    sys.exit(1)


def check_config(config):
    if config["arch"] == "conv" and config["img_size"] not in (32, 64):
        fail(f"--img_size {config['img_size']} is not supported by the conv VAE: use 32 or 64 (or --arch mlp)")
    for flag, least in (("latent_dim", 1), ("hidden", 1), ("width", 1), ("iw_k", 1), ("flow_length", 1), ("flow_hidden", 0), ("img_size", 1)):
        if config[flag] < least:
            fail(f"--{flag} {config[flag]} must be at least {least}")
    if not config["kl_weight"] >= 0:
        fail(f"--kl_weight {config['kl_weight']} must be at least 0")


def main(argv=None):
    parser, args = get_args(argv)
    config = vars(args)

    # distributed: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK
    ddp = int(os.environ.get("WORLD_SIZE", 1)) > 1
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(args.device)
    if ddp:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0

    ckpt = None
    if args.resume:
        ckpt_path = os.path.join(args.out_dir, "ckpt.pt") if args.resume == "auto" else args.resume
        try:
            ckpt = load_checkpoint(ckpt_path)
        except (FileNotFoundError, ValueError) as e:
            fail(f"--resume: {e}")
        if ckpt.get("script") != SCRIPT:
            fail(f"--resume: {ckpt_path} is a {ckpt.get('script')!r} checkpoint, not {SCRIPT}")
        given = {k for k in RESUMABLE_OVERRIDES if config[k] != parser.get_default(k)}
        config = {**ckpt["config"], **{k: config[k] for k in given}}

    check_config(config)
    dtype = config["dtype"]
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    try:
        train_images, _ = load_images(config["data_dir"], config["dataset"], "train", config["img_size"])
        test_images, test_labels = load_images(config["data_dir"], config["dataset"], "test", config["img_size"])
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    config["channels"] = train_images.shape[1]
    if config["batch_size"] % world:
        fail(f"--batch_size {config['batch_size']} is not divisible by the {world} processes")
    local_batch = config["batch_size"] // world
    data = train_images.to(device)  # uint8 on the device; batches are drawn by index
    test_data = test_images.to(device)

    torch.manual_seed(config["seed"] + rank)
    models = build_models(config)
    for model in models.values():
        model.to(device)
    encoder, decoder, flow = models["encoder"], models["decoder"], models.get("flow")
    # the decoder's sigma (--recon mse) gets a larger step: at --lr it would need ~10^4 steps to reach sigma^2 = MSE
    sigma = [decoder.log_sigma] if config["recon"] == "mse" else []
    groups = [{"params": [p for m in models.values() for p in m.parameters() if all(p is not s for s in sigma)], "lr_scale": 1.0}]
    groups += [{"params": sigma, "lr_scale": SIGMA_LR_SCALE}] if sigma else []
    opt = torch.optim.Adam(groups, lr=config["lr"], betas=(config["beta1"], config["beta2"]))
    for group in opt.param_groups:
        group["lr"] = config["lr"] * group["lr_scale"]
    data_gen = torch.Generator().manual_seed(config["seed"] + 1000 + rank)
    fixed_noise = torch.randn(36, config["latent_dim"], generator=torch.Generator().manual_seed(config["seed"])).to(device)
    step, best_mse = 0, float("inf")
    if ckpt is not None:
        for name, model in models.items():
            model.load_state_dict(ckpt["models"][name])
        opt.load_state_dict(ckpt["optimizers"]["vae"])
        for group in opt.param_groups:
            group["lr"] = config["lr"] * group["lr_scale"]
        step, best_mse = ckpt["step"], ckpt["best_test_mse"]
        fixed_noise = ckpt["fixed_noise"].to(device)
        if world == 1:  # the saved streams are rank 0's; other ranks keep their own seeds
            torch.set_rng_state(ckpt["rng"]["torch"])
            data_gen.set_state(ckpt["rng"]["data"])
            if device.type == "cuda" and "cuda" in ckpt["rng"]:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)

    encoder_train, decoder_train, flow_train = encoder, decoder, flow
    if config["compile"]:
        encoder_train, decoder_train = torch.compile(encoder), torch.compile(decoder)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        encoder_train, decoder_train = DDP(encoder_train), DDP(decoder_train)
        flow_train = DDP(flow) if flow is not None else None

    out_dir = config["out_dir"]
    log_path = os.path.join(out_dir, "log.jsonl")
    if master:
        os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        if ckpt is not None:
            truncate_log(log_path, step)
        elif os.path.exists(log_path):
            os.remove(log_path)

    def draw_batch():
        idx = torch.randint(0, len(data), (local_batch,), generator=data_gen).to(device)
        return to_unit_interval(data[idx])

    def checkpoint():
        return {
            "script": SCRIPT, "format": CHECKPOINT_FORMAT, "config": config, "step": step,
            "models": {name: model.state_dict() for name, model in models.items()},
            "optimizers": {"vae": opt.state_dict()},
            "rng": {"torch": torch.get_rng_state(), "data": data_gen.get_state(),
                    **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})},
            "fixed_noise": fixed_noise.cpu(), "best_test_mse": best_mse,
        }

    show_idx = torch.linspace(0, len(test_data) - 1, 10).long().to(device)  # spread over the split (mnist5k's is sorted by class)

    def evaluate():
        """Test MSE, the sample grid from the fixed noise, and 10 test images above their reconstructions."""
        for model in models.values():
            model.eval()
        mse = reconstruction_mse(models, test_data)
        save_image(generate(models, fixed_noise), os.path.join(out_dir, "samples", f"step_{step:06d}.png"), nrow=6, padding=2)
        x = to_unit_interval(test_data[show_idx])
        save_image(torch.cat([x, generate(models, encode(models, x)[0])]), os.path.join(out_dir, "reconstructions.png"), nrow=10, padding=2)
        for model in models.values():
            model.train()
        return mse

    recon_kind, kl_weight, k = config["recon"], config["kl_weight"], config["iw_k"]
    stats = torch.zeros(3, device=device)  # running sums over the log interval: loss, reconstruction, KL
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    t0, iters_since_log = time.perf_counter(), 0
    curve_keys = [("loss", "recon"), ("kl",), ("test_mse",)]
    start_step = step
    while step < config["max_iters"]:
        x = draw_batch()
        with autocast:
            loss, recon, kl, logits = vae_loss(encoder_train, decoder_train, flow_train, x, recon_kind, kl_weight, k)
        total = loss + decoder_sigma_loss(x, logits, decoder.log_sigma) if recon_kind == "mse" else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        step += 1
        iters_since_log += 1
        with torch.no_grad():
            stats += torch.stack([loss.detach(), recon.detach().mean(), kl.detach().mean()])
            nonfinite |= ~torch.isfinite(total.detach())

        is_last = step == config["max_iters"]
        log_now = step % config["log_interval"] == 0 or is_last
        eval_now = step % config["sample_interval"] == 0 or is_last
        if log_now or eval_now or step % config["ckpt_interval"] == 0:
            if nonfinite.item():  # stop before a NaN can reach a checkpoint; the last good one stays
                fail(f"non-finite loss by step {step} (loss={loss.item():.4g}, recon={recon.mean().item():.4g}, "
                     f"kl={kl.mean().item():.4g}); the last good checkpoint in {out_dir} is kept; try a lower --lr")
        row = {}
        if master and eval_now:
            mse = evaluate()
            if not math.isfinite(mse):
                fail(f"non-finite test MSE at step {step}; the last good checkpoint in {out_dir} is kept")
            row["test_mse"] = mse
            if mse < best_mse:
                best_mse = mse
                save_checkpoint(checkpoint(), os.path.join(out_dir, "ckpt_best.pt"))
        if master and (log_now or eval_now):
            means = (stats / max(iters_since_log, 1)).tolist()
            dt = time.perf_counter() - t0
            row = {"step": step, "loss": means[0], "recon": means[1], "kl": means[2], **row,
                   "ms_per_step": 1000 * dt / max(iters_since_log, 1), "images_per_s": iters_since_log * config["batch_size"] / dt}
            if recon_kind == "mse":
                row["sigma"] = decoder.log_sigma.exp().item()
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"step {step:6d} | loss {means[0]:.4f} recon {means[1]:.4f} kl {means[2]:.4f}"
                  + (f" | test MSE {row['test_mse']:.5f}" if "test_mse" in row else "")
                  + f" | {row['ms_per_step']:.1f} ms/step {row['images_per_s']:.0f} img/s")
        if log_now or eval_now:
            stats.zero_()
            t0, iters_since_log = time.perf_counter(), 0
        if master and eval_now:
            plot_curves(log_path, os.path.join(out_dir, "curves.png"), curve_keys)
        if master and (step % config["ckpt_interval"] == 0 or is_last):
            save_checkpoint(checkpoint(), os.path.join(out_dir, "ckpt.pt"))

    if master:
        for model in models.values():
            model.eval()
        idx = torch.linspace(0, len(test_data) - 1, min(2000, len(test_data))).long()
        mu = torch.cat([encode(models, to_unit_interval(test_data[i.to(device)]))[0] for i in idx.split(500)]).cpu()
        labels, label_name = map_labels(test_labels[idx] if test_labels is not None else None, config)
        xy, method = latent_map(mu)
        save_latent_map(xy.numpy(), labels.numpy() if labels is not None else None, method, label_name, os.path.join(out_dir, "latents.png"))
        final_mse = reconstruction_mse(models, test_data) if step == start_step else mse  # a resume with nothing left to do
        print(f"test MSE: {final_mse:.6f} (best {best_mse:.6f}, kept in ckpt_best.pt)")
    if ddp:
        del encoder_train, decoder_train, flow_train  # DDP reducers must go before their process group, or exit can abort
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
