"""VAE: variational autoencoders in one file, with importance weighting, flow posteriors and an 8-bit likelihood.

Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014; Rezende, Mohamed,
Wierstra, "Stochastic Backpropagation and Approximate Inference in Deep Generative
Models", ICML 2014. Variants: the importance-weighted bound of Burda, Grosse,
Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016 (--iw_k); planar flows
of Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015 and
inverse autoregressive flows of Kingma et al., "Improved Variational Inference with
Inverse Autoregressive Flow", NeurIPS 2016 (--flow); the discretised logistic
likelihood of 8-bit pixels of Salimans et al., "PixelCNN++", ICLR 2017 (--recon dlogistic).
The networks follow the course handouts: the fully connected 784-400-(20, 20)-400-784
VAE (CIS 680 (2019) assignment 4, Table 1), a convolutional VAE for 64x64 faces (DLCV
(2018) HW4: four strided convolutions, 512-d latent, batch norm, LeakyReLU 0.01) with
a depth of 1 to 5, CSI5340 assignment 4's own conv VAE (ReLU, an h_dim dense layer, a tanh output; --arch
csi5340), IWAE with 5 importance samples and a flow posterior (the 2018 image-generation assignment).

    python vae.py                                      # MLP VAE on the embedded MNIST sample, 28x28
    python vae.py --arch conv                          # conv VAE, 32x32 digits
    python vae.py --iw_k 5 --out_dir out/iwae          # IWAE, 5 importance samples
    python vae.py --flow iaf --flow_length 4           # inverse autoregressive flow posterior
    python vae.py --arch conv --img_size 28 --depth 2 --latent_dim 32 --recon dlogistic --lr 2e-3 --max_iters 2500 \
        --out_dir out/vae_dlogistic                    # a likelihood of 8-bit pixels: about 1.46 bits/dim on test
    python vae.py --dataset celeba --img_size 64 --arch conv --depth 4 --latent_dim 512 --recon mse --kl_weight 0.24
    python vae.py --arch csi5340 --depth 5 --latent_dim 100 --lr 3e-4 --recon mse_mean --kl_weight 1e-3   # KL_factor 1e-3
    torchrun --nproc_per_node=2 vae.py                 # DistributedDataParallel

The per-image loss: the reconstruction term is summed over pixels (binary cross
entropy, squared error in the decoder's units, or -log P of the 8-bit pixel levels),
the KL term is summed over latent dimensions, and --kl_weight multiplies the KL term;
the loss is their batch mean. With --recon bce or dlogistic and --kl_weight 1 this is
the negative ELBO of a Bernoulli or discretised-logistic decoder. --recon mse_mean
averages the squared error over pixels instead, as CSI5340 assignment 4 does
(mse(x, x') + KL_factor * KL): with it --kl_weight is that KL_factor, and with --recon mse
it is KL_factor * D. DLCV HW4 averaged both terms (MSE over pixels + 1e-2 x KL averaged
over latent dims); the same balance here is --kl_weight 1e-2 * D / latent_dim (0.24 for
64x64x3 and 512).

Everything the run makes goes to --out_dir: ckpt.pt, ckpt_best.pt (lowest test MSE),
samples/step_*.png, reconstructions/step_*.png, latents.png, log.jsonl, curves.png and
config.json.
"""
import argparse
import importlib.util
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
LOG_SCALE_MIN = -7.0  # floor of the discretised logistic's log-scale, as in PixelCNN++
GAUSSIAN_RECON = ("mse", "mse_mean")  # the squared-error losses, whose decoder carries a Gaussian's sigma


# -----------------------------------------------------------------------------
# Data: data/<dataset>/{train,test}.npy, uint8 N x H x W x C, held on the device


def load_images(data_dir, dataset, split, img_size):
    """The prepared arrays of a dataset as uint8 N x C x H x W, resized once to img_size."""
    folder = os.path.join(data_dir, dataset)
    path = os.path.join(folder, f"{split}.npy")
    prepare = os.path.join(data_dir, dataset.split("/")[0], "prepare.py")  # data/folder/<name> is made by data/folder/prepare.py
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {split} split of '{dataset}' at {path}; make it with: python {prepare}")
    try:
        images = np.load(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} ({e}); remake it with: python {prepare}") from None
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
    """uint8 [0, 255] -> float [0, 1], the range of the decoder's mean (the GAN scripts use [-1, 1])."""
    return images_uint8.float().div(255.0)


def pixel_levels(x):
    """x in [0, 1] -> its 8-bit level 0..255 (as float), floor(256 x): both a training image k / 255 and
    evaluate.py's dequantised (k + u) / 256, 0 <= u < 1, give back k."""
    return torch.floor(x * 256).clamp(0, 255)


# -----------------------------------------------------------------------------
# Encoders q0(z|x) = N(mu(x), diag exp(logvar(x))) and decoders p(x|z).
# An encoder returns (mu, logvar, h): h is its last hidden layer, the context of the IAF.
# A decoder returns the parameters of p(x|z) per pixel: logits for --recon bce and mse (the image is their
# sigmoid), or the mean and log-scale of a logistic for --recon dlogistic (2 x channels maps).


def likelihood_channels(channels, recon):
    return 2 * channels if recon == "dlogistic" else channels


def float32_output(layer, h):
    """The decoder's output layer in float32, also under bfloat16 autocast: bfloat16 keeps 8 bits of mantissa,
    as coarse as the 8-bit pixel levels a discretised logistic's mean must tell apart."""
    with torch.autocast(h.device.type, enabled=False):
        return layer(h.float())


class MLPEncoder(nn.Module):
    """CIS 680 Table 1, FC 1 and FC 2a/2b: D -> 400 (ReLU) -> mean (20) and log-variance (20).

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
    """CIS 680 Table 1, FC 3 and FC 4: latent (20) -> 400 (ReLU) -> D (sigmoid, applied by the caller);
    2D outputs for --recon dlogistic."""

    tanh = False  # outputs logits; the image is their sigmoid

    def __init__(self, latent_dim, hidden, channels, img_size, recon):
        super().__init__()
        self.shape = (likelihood_channels(channels, recon), img_size, img_size)
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(True), nn.Linear(hidden, math.prod(self.shape)))
        add_likelihood(self, recon)

    def forward(self, z):
        return float32_output(self.net[-1], self.net[:-1](z)).view(-1, *self.shape)


def upsample_block(in_ch, out_ch, mode, bias=False):
    """Double the spatial size: a strided transposed conv, or resize then 3x3 conv (Odena et al. 2016,
    "Deconvolution and Checkerboard Artifacts", as in the 2018 image-generation assignment)."""
    if mode == "convtranspose":
        return nn.ConvTranspose2d(in_ch, out_ch, 4, 2, 1, bias=bias)
    align = dict(align_corners=False) if mode == "bilinear" else {}
    return nn.Sequential(nn.Upsample(scale_factor=2, mode=mode, **align), nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=bias))


class ConvEncoder(nn.Module):
    """depth strided 4x4 convolutions (BN, LeakyReLU 0.01), then two dense heads (DLCV HW4, CSI5340 assignment 4).

    For img_size 64, depth 4, width 32 (DLCV HW4):
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
    """A dense layer, then depth layers that double the size (DLCV HW4), the encoder mirrored.

    For img_size 64, depth 4, width 32:
    latent (512) -> 256 x 4 x 4 -> 128 x 8 x 8 -> 64 x 16 x 16 -> 32 x 32 x 32 -> C x 64 x 64 (logits; 2C for dlogistic)
    """

    tanh = False

    def __init__(self, latent_dim, channels, img_size, depth, width, upsample, recon):
        super().__init__()
        self.start = (width * 2 ** (depth - 1), img_size // 2 ** depth, img_size // 2 ** depth)
        self.fc = nn.Linear(latent_dim, math.prod(self.start))
        layers = [nn.BatchNorm2d(self.start[0]), nn.LeakyReLU(0.01, True)]
        for i in reversed(range(1, depth)):
            layers += [upsample_block(width * 2 ** i, width * 2 ** (i - 1), upsample), nn.BatchNorm2d(width * 2 ** (i - 1)), nn.LeakyReLU(0.01, True)]
        # width x (img_size / 2) x (img_size / 2)
        layers += [upsample_block(width, likelihood_channels(channels, recon), upsample, bias=True)]
        # channels (2 x channels for dlogistic) x img_size x img_size
        self.net = nn.Sequential(*layers)
        add_likelihood(self, recon)

    def forward(self, z):
        return float32_output(self.net[-1], self.net[:-1](self.fc(z).view(-1, *self.start)))


class CSI5340Encoder(nn.Module):
    """CSI5340 assignment 4, Module 1 (a): depth strided 4x4 convolutions (BN, ReLU), a dense layer to h_dim, and
    the mean and log-variance heads branched from it. Images enter in [-1, 1], the range of its tanh decoder.

    For img_size 32, depth 3, width 32, h_dim 1024:
    C x 32 x 32 -> 32 x 16 x 16 -> 64 x 8 x 8 -> 128 x 4 x 4 -> (2048) -> 1024 -> mean, log-variance (latent_dim)
    """

    def __init__(self, channels, img_size, depth, width, h_dim, latent_dim):
        super().__init__()
        layers, in_ch = [], channels
        for i in range(depth):
            layers += [nn.Conv2d(in_ch, width * 2 ** i, 4, 2, 1, bias=False), nn.BatchNorm2d(width * 2 ** i), nn.ReLU(True)]
            in_ch = width * 2 ** i
        # the report's pseudocode has no activation after linear(h_dim), and neither has this
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(in_ch * (img_size // 2 ** depth) ** 2, h_dim))
        self.feature_dim = h_dim
        self.fc_mu = nn.Linear(h_dim, latent_dim)
        self.fc_logvar = nn.Linear(h_dim, latent_dim)

    def forward(self, x):
        h = self.body(2 * x - 1)
        return self.fc_mu(h), self.fc_logvar(h), h


def csi5340_first_map(img_size, depth):
    """Side of the CSI5340 decoder's first feature map: its depth - 1 transposed convs double it up to img_size."""
    return img_size // 2 ** (depth - 1)


class CSI5340Decoder(nn.Module):
    """CSI5340 assignment 4, Module 1 (b): a dense layer from the latent to h_dim, read as the first feature map
    (h_dim / s^2 channels of s x s), depth - 1 transposed convs (BN, ReLU) that double the size, then a 3x3 conv,
    BN and tanh. It returns the image in [-1, 1].

    For img_size 32, depth 3, width 32, h_dim 1024:
    latent -> 1024 = 16 x 8 x 8 -> 64 x 16 x 16 -> 32 x 32 x 32 -> C x 32 x 32 (tanh)
    """

    tanh = True

    def __init__(self, latent_dim, channels, img_size, depth, width, h_dim, upsample, recon):
        super().__init__()
        side = csi5340_first_map(img_size, depth)
        self.start = (h_dim // side ** 2, side, side)
        self.fc = nn.Linear(latent_dim, h_dim)
        layers, in_ch = [], self.start[0]
        for i in reversed(range(depth - 1)):
            layers += [upsample_block(in_ch, width * 2 ** i, upsample), nn.BatchNorm2d(width * 2 ** i), nn.ReLU(True)]
            in_ch = width * 2 ** i
        self.net = nn.Sequential(*layers)
        self.out = nn.Sequential(nn.Conv2d(in_ch, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels), nn.Tanh())
        add_likelihood(self, recon)

    def forward(self, z):
        return float32_output(self.out, self.net(self.fc(z).view(-1, *self.start)))


def add_likelihood(decoder, recon):
    """What p(x|z) the decoder stands for: Bernoulli logits (bce), a Gaussian with one learned sigma (mse), or a
    discretised logistic per pixel whose mean and scale the decoder outputs (dlogistic).

    The mse decoder's sigma is trained only by a detached Gaussian NLL (decoder_sigma_loss), so the MSE training
    of the rest is unchanged and sigma^2 tracks the mean squared error; it is needed for a proper density.
    """
    decoder.recon = recon
    if recon in GAUSSIAN_RECON:
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
        nn.init.constant_(self.s.bias, 2.0)  # sigma near 1 at the start: close to the identity (their section 4)

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
    elif config["arch"] == "csi5340":
        encoder = CSI5340Encoder(c, s, config["depth"], config["width"], config["h_dim"], L)
        decoder = CSI5340Decoder(L, c, s, config["depth"], config["width"], config["h_dim"], config["upsample"], config["recon"])
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


def discretised_logistic_log_likelihood(x, decoded):
    """log P(x) of the 8-bit levels of x under one logistic per pixel (Salimans et al. 2017, PixelCNN++, with a
    single logistic instead of their mixture), summed over pixels.

    decoded holds the means (first half of the channels, in [-1, 1] pixel units) and the log-scales (second
    half). Level k owns the bin [c - 1/255, c + 1/255] around c = 2k / 255 - 1, and the edge levels 0 and 255
    take the tails, so the 256 probabilities sum to 1. An interior bin's P = sigmoid(a) - sigmoid(b) is
    computed as sigmoid(a) sigmoid(-b) (1 - e^-(a - b)): stable in float32 however narrow the bin is against
    the scale and however far it lies from the mean.
    """
    mean, log_scale = decoded.chunk(2, dim=-3)
    level = pixel_levels(x)
    inv_scale = torch.exp(-log_scale.clamp(min=LOG_SCALE_MIN))
    centre = level / 127.5 - 1
    upper = (centre + 1 / 255 - mean) * inv_scale
    lower = (centre - 1 / 255 - mean) * inv_scale
    interior = F.logsigmoid(upper) + F.logsigmoid(-lower) + torch.log(-torch.expm1(-2 / 255 * inv_scale))
    log_p = torch.where(level == 0, F.logsigmoid(upper), torch.where(level == 255, F.logsigmoid(-lower), interior))
    return log_p.sum((-3, -2, -1))


def discretised_logistic_mean(decoded):
    """The mean level / 255, in [0, 1]: E[level] = sum over the 255 bin edges t of P(level > t), and
    P(level > t) = sigmoid((mean - t) / scale)."""
    mean, log_scale = decoded.chunk(2, dim=-3)
    inv_scale = torch.exp(-log_scale.clamp(min=LOG_SCALE_MIN))
    total = torch.zeros_like(mean)
    for k in range(1, 256):  # the edge between levels k - 1 and k is at (2k - 1) / 255 - 1
        total += torch.sigmoid((mean - (2 * k - 1) / 255 + 1) * inv_scale)
    return total / 255


def decoder_mean(decoder, decoded):
    """The mean image of p(x|z) in [0, 1]: sigmoid(logits), a tanh output mapped from [-1, 1], or the discretised
    logistic's mean."""
    if decoder.recon == "dlogistic":
        return discretised_logistic_mean(decoded)
    return (decoded + 1) / 2 if decoder.tanh else torch.sigmoid(decoded)


def squared_error(x, decoded, tanh):
    """(x' - x)^2 per pixel, in the decoder's units: [0, 1] for sigmoid(logits); [-1, 1] for a tanh output
    (CSI5340), where x is rescaled to [-1, 1] too, so the error is 4 times that in [0, 1] units."""
    if tanh:
        return (decoded - (2 * x - 1)).pow(2)
    return (torch.sigmoid(decoded) - x).pow(2)


def reconstruction_loss(kind, x, decoded, tanh=False):
    """The training reconstruction term per image: summed BCE, the squared error summed (mse) or averaged
    (mse_mean, CSI5340's mse(x, x')) over pixels, or -log P of the 8-bit pixels (dlogistic)."""
    if kind == "bce":
        return -bernoulli_log_likelihood(x, decoded)
    if kind == "dlogistic":
        return -discretised_logistic_log_likelihood(x, decoded)
    error = squared_error(x, decoded, tanh)
    return error.mean((-3, -2, -1)) if kind == "mse_mean" else error.sum((-3, -2, -1))


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


def vae_loss(encoder, decoder, flow, x, recon_kind, kl_weight, k, tanh=False):
    """Minus the training bound, averaged over the batch, and the mean reconstruction and KL terms.

    k = 1 without a flow: the VAE of the handouts, reconstruction + kl_weight * KL with KL in closed form.
    Otherwise the importance-weighted bound of Burda et al., log (1/k) sum_j w_j with
    log w_j = -reconstruction(z_j) - kl_weight * (log q(z_j|x) - log p(z_j)), z_j ~ q(z|x); for k = 1 this is
    the ELBO with a one-sample Monte Carlo KL (the only KL a flow has). Only kl_weight = 1 makes it a bound
    on log p(x); other weights temper the prior-to-posterior ratio inside the average.
    tanh: the decoder outputs images in [-1, 1] (CSI5340), not logits.
    Returns (loss, reconstruction (N,), KL (N,), decoder output (k*N or N images)).
    """
    mu, logvar, h = (t.float() for t in encoder(x))
    if k == 1 and flow is None:
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        decoded = decoder(z).float()
        recon, kl = reconstruction_loss(recon_kind, x, decoded, tanh), gaussian_kl(mu, logvar)
        return (recon + kl_weight * kl).mean(), recon, kl, decoded
    z, log_q = posterior_samples(mu, logvar, h, flow, k)
    decoded = decoder(z.flatten(0, 1)).float()
    recon = reconstruction_loss(recon_kind, x, decoded.view(k, -1, *decoded.shape[1:]), tanh)  # (k, N)
    kl = log_q - log_standard_normal(z)  # (k, N), one-sample Monte Carlo estimates
    bound = torch.logsumexp(-recon - kl_weight * kl, 0) - math.log(k)
    return -bound.mean(), recon.mean(0), kl.mean(0), decoded


def decoder_sigma_loss(x, decoded, log_sigma, tanh=False):
    """The Gaussian NLL that fits the decoder's sigma alone (--recon mse, mse_mean): the decoder output is detached,
    so the MSE training of everything else is unchanged, and the optimum is sigma^2 = the mean squared error
    in [0, 1] units (a tanh output is mapped there)."""
    decoded = decoded.detach()
    mean = (decoded + 1) / 2 if tanh else torch.sigmoid(decoded)
    return gaussian_nll(x, mean.view(-1, *x.shape), log_sigma).mean()


# -----------------------------------------------------------------------------
# The interface evaluate.py and interpolate.py use (README: "The model interface")


def load_models(ckpt, device):
    """The networks of a checkpoint, in eval mode: encoder, decoder, and flow when the posterior has one."""
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
    """The decoder's mean in [0, 1] (for --recon bce the Bernoulli mean sigmoid(logits); a tanh output mapped from [-1, 1])."""
    decoder = models["decoder"]
    return decoder_mean(decoder, decoder(z).float())


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


def log_likelihood(decoder, x, decoded):
    """log p(x|z) as a proper density on [0, 1]^D: continuous Bernoulli (bce), Gaussian with the learned sigma
    (mse, mse_mean), or for dlogistic the discrete P(levels of x) spread evenly over each level's cell [k/256, (k+1)/256),
    i.e. log P + D log 256.

    The Gaussian is a density on R^D; its mass outside [0, 1]^D is lost, so likelihoods from it are lower bounds.
    The dlogistic density is constant on each cell, so on uniformly dequantised images (evaluate.py) its
    bits/dim are those of the discrete P exactly: the dequantisation noise changes nothing.
    """
    if decoder.recon == "bce":
        return bernoulli_log_likelihood(x, decoded) + continuous_bernoulli_log_norm(decoded)
    if decoder.recon == "dlogistic":
        return discretised_logistic_log_likelihood(x, decoded) + x[0].numel() * math.log(256)
    return -gaussian_nll(x, decoder_mean(decoder, decoded), decoder.log_sigma)


@torch.no_grad()
def log_importance_weights(models, x, k, max_elements=1 << 22):
    """log p(x, z_j) - log q(z_j|x) for z_j ~ q(z|x), j = 1..k: a (k, N) tensor. The flow's log-det is in
    log q. The k draws are decoded in chunks of at most max_elements output pixels. A discretised decoder
    sees x at its 8-bit levels (the encoder too, as in training), so dequantisation noise leaves no trace."""
    encoder, decoder, flow = models["encoder"], models["decoder"], models.get("flow")
    if decoder.recon == "dlogistic":
        x = pixel_levels(x) / 255
    mu, logvar, h = (t.float() for t in encoder(x))
    chunk = max(1, max_elements // x.numel())
    out = []
    for start in range(0, k, chunk):
        j = min(chunk, k - start)
        z, log_q = posterior_samples(mu, logvar, h, flow, j)
        decoded = decoder(z.flatten(0, 1)).float()
        out.append(log_likelihood(decoder, x, decoded.view(j, -1, *decoded.shape[1:])) + log_standard_normal(z) - log_q)
    return torch.cat(out)


# -----------------------------------------------------------------------------
# Analyses: test-set MSE of the reconstructions, the 2-D map of the latents (DLCV HW4)


@torch.no_grad()
def mse_of_reconstructions(models, images_uint8, chunk=500):
    """Mean squared error between images and their reconstructions, the decoder's mean at the posterior mean
    mu, over a whole split, in [0, 1] pixel units."""
    total = 0.0
    for i in range(0, len(images_uint8), chunk):
        x = to_unit_interval(images_uint8[i:i + chunk])
        total += (generate(models, encode(models, x)[0]) - x).pow(2).sum().item()
    return total / images_uint8.numel()


def have_sklearn():
    return importlib.util.find_spec("sklearn") is not None


def latent_map(points, method="tsne"):
    """2-D embedding of (N, L) points and its name: t-SNE through scikit-learn (DLCV HW4), or PCA. scikit-learn is
    imported here, not at the top, so that the script copied alone still trains; without it t-SNE falls back to PCA."""
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError:
            method = "pca"
    if method == "pca":
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
    ax.set_title(f"latent means of {len(xy)} images, {method}" + (f", coloured by {label_name}" if labels is not None else ""))
    fig.tight_layout()
    fig.savefig(png_path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(png_path + ".tmp.png", png_path)


def reconstruction_grid(x, x_rec, cols=6):
    """Originals beside their reconstructions (CIS 680: "generated images and corresponding original images"), to be
    drawn 2 * cols + 1 cells wide: each row is cols originals, a white cell, and the same cols reconstructed."""
    rows = []
    for i in range(0, len(x), cols):
        blank = torch.ones_like(x[:1])
        rows += [x[i:i + cols], blank, x_rec[i:i + cols]]
    return torch.cat(rows)


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
# Run outputs and setup, the same in every model script


def save_checkpoint(ckpt, path):
    """Write to a temporary file, then rename: a kill or a full disk mid-save never leaves a torn ckpt.pt."""
    tmp = path + ".tmp"
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(f"cannot save {path} ({e.strerror or e}); the previous checkpoint is kept") from None


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {path}") from None
    except Exception as e:  # torch raises several types for a torn or foreign file
        raise ValueError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None


def plot_curves(log_path, png_path, keys):
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
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
    for ax, group in zip(axes[0], keys):
        for key in group:  # some keys (a test metric) are only in some rows
            ax.plot([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r], label=key)
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(png_path + ".tmp.png", png_path)


def truncate_log(log_path, last_step):
    """Drop log lines written after `last_step`: on resume those after the checkpoint, on a new run all."""
    if not os.path.exists(log_path):
        return
    with open(log_path) as f:
        rows = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= last_step]
    with open(log_path, "w") as f:
        f.writelines(rows)


def fail(message):
    print(f"{SCRIPT}.py: error: {message}", file=sys.stderr)
    sys.exit(1)


def resolve_device(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_computes_bfloat16():
    """True on CPUs with native bfloat16 arithmetic (AVX512-BF16 or AMX), where oneDNN runs it faster than float32."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return torch.backends.mkldnn.is_available() and any(check is not None and check() for check in checks)


def resolve_dtype(name, device):
    """--dtype auto: bfloat16 autocast where the device computes it natively, float32 elsewhere."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if device.type == "cpu":
        return "bfloat16" if cpu_computes_bfloat16() else "float32"
    return "float32"


def setup_distributed(device_name):
    """(device, rank, world size); under torchrun (WORLD_SIZE > 1) also joins the process group."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(device_name)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, rank, world


def typed_flags(argv):
    """The flags the user typed (the parser takes no abbreviations), to tell `--lr 2e-4` from the default 2e-4."""
    argv = sys.argv[1:] if argv is None else argv
    return {arg[2:].split("=")[0] for arg in argv if arg.startswith("--")}


def resume_config(config, argv):
    """The checkpoint to resume and its config, with the flags typed now that a resumed run may change."""
    path = os.path.join(config["out_dir"], "ckpt.pt") if config["resume"] == "auto" else config["resume"]
    try:
        ckpt = load_checkpoint(path)
    except (FileNotFoundError, ValueError) as e:
        fail(f"--resume: {e}")
    if not isinstance(ckpt, dict) or ckpt.get("script") != SCRIPT:
        kind = ckpt.get("script") if isinstance(ckpt, dict) else None
        fail(f"--resume: {path} is not a {SCRIPT} checkpoint" + (f" but a {kind} one" if kind else ""))
    typed = typed_flags(argv)
    fixed = sorted(k for k in typed - set(RESUMABLE_OVERRIDES) if k in ckpt["config"] and config[k] != ckpt["config"][k])
    if fixed:
        fail(f"--resume: --{fixed[0]} cannot change in a resumed run (the checkpoint has {ckpt['config'][fixed[0]]!r}); "
             f"start a new run in another --out_dir instead")
    # flags newer than the checkpoint keep their defaults
    return ckpt, {**config, **ckpt["config"], **{k: config[k] for k in typed & set(RESUMABLE_OVERRIDES)}}


def prepare_out_dir(config, step):
    """samples/, config.json, and log.jsonl holding the rows up to `step` (none for a new run)."""
    out_dir = config["out_dir"]
    try:
        os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        truncate_log(os.path.join(out_dir, "log.jsonl"), step)
    except OSError as e:
        fail(f"cannot write to --out_dir {out_dir}: {e.strerror or e}")
    return os.path.join(out_dir, "log.jsonl")


def check_positive(config, names):
    for name in names:
        if not config[name] > 0:
            fail(f"--{name} {config[name]} must be positive")


def all_finite(tensors, ddp):
    """True when every tensor is finite on every process: the ranks must agree, or one exits while the others wait."""
    finite = torch.stack([t.detach().isfinite().all() for t in tensors]).all().float()
    if ddp:
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite.item())


def format_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def write_log_row(log_path, row, max_iters):
    """Append one row to log.jsonl and print it, with the time left at the current speed."""
    with open(log_path, "a") as f:
        f.write(json.dumps(row) + "\n")
    values = " ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("step", "ms_per_step", "images_per_s"))
    left = format_time(row["ms_per_step"] * (max_iters - row["step"]) / 1000)
    print(f"step {row['step']}/{max_iters} | {values} | {row['ms_per_step']:.1f} ms/step, "
          f"{row['images_per_s']:.0f} img/s, {left} left", flush=True)


# -----------------------------------------------------------------------------
# Training


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Train a VAE.", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--dataset", default="mnist5k", help="folder under --data_dir holding train.npy / test.npy")
    p.add_argument("--data_dir", default="data", help="where the prepared datasets live")
    p.add_argument("--out_dir", default="out/vae", help="checkpoints, samples, logs and plots go here")
    p.add_argument("--img_size", type=int, default=None,
                   help="image side; default 28 for --arch mlp (784 inputs, CIS 680 Table 1), 32 for --arch conv (a multiple of 2^depth)")
    p.add_argument("--arch", default="mlp", choices=["mlp", "conv", "csi5340"],
                   help="fully connected (CIS 680 Table 1), convolutional (DLCV HW4), or CSI5340 assignment 4's conv VAE "
                        "(BN + ReLU, an --h_dim dense layer, a tanh output in [-1, 1])")
    p.add_argument("--latent_dim", type=int, default=20, help="latent size (CIS 680: 20; DLCV HW4 faces: 512)")
    p.add_argument("--hidden", type=int, default=400, help="--arch mlp: hidden layer width (CIS 680: 400)")
    p.add_argument("--depth", type=int, default=4, choices=range(1, 6),
                   help="--arch conv, csi5340: strided layers in encoder and decoder (DLCV HW4: 4; CSI5340: 1 to 5)")
    p.add_argument("--width", type=int, default=32, help="--arch conv, csi5340: channels of the first conv layer, doubled per layer")
    p.add_argument("--h_dim", type=int, default=1024,
                   help="--arch csi5340: the dense layer between the convs and the latent, read by the decoder as its first "
                        "feature map (a multiple of (img_size / 2^(depth-1))^2; the report gives no value, 1024 fits every depth at 32x32)")
    p.add_argument("--upsample", default="convtranspose", choices=["convtranspose", "nearest", "bilinear"],
                   help="--arch conv, csi5340: how the decoder doubles resolution: transposed conv, or resize then 3x3 conv (Odena et al. 2016)")
    p.add_argument("--recon", default="bce", choices=["bce", "mse", "mse_mean", "dlogistic"],
                   help="p(x|z): Bernoulli (BCE, the handouts), squared error summed over pixels (mse) or averaged (mse_mean, "
                        "CSI5340's mse(x, x')), or a discretised logistic of the 8-bit pixels (Salimans et al. 2017), whose "
                        "bits/dim are exact; --arch csi5340 (a tanh output) takes mse or mse_mean")
    p.add_argument("--kl_weight", type=float, default=1.0,
                   help="weight of the summed KL against the reconstruction term (1: the ELBO; CSI5340's KL_factor is --kl_weight "
                        "with --recon mse_mean; DLCV HW4's 1e-2 on means is 1e-2 * D / latent_dim with --recon mse)")
    p.add_argument("--iw_k", type=int, default=1, help="importance samples of the IWAE bound (the 2018 image-generation assignment: 5); 1: the plain ELBO")
    p.add_argument("--flow", default="none", choices=["none", "planar", "iaf"],
                   help="normalizing-flow posterior (Rezende & Mohamed 2015; Kingma et al. 2016)")
    p.add_argument("--flow_length", type=int, default=4, help="flow layers / IAF steps")
    p.add_argument("--flow_hidden", type=int, default=0, help="IAF: width of its MADE layers; 0: twice --latent_dim")
    p.add_argument("--map_attr", default="Male", help="for multi-attribute labels (CelebA): the attribute colouring latents.png")
    p.add_argument("--latent_map", default="tsne", choices=["tsne", "pca"],
                   help="latents.png, drawn once at the end from every test image: t-SNE (scikit-learn; DLCV HW4) or PCA")
    p.add_argument("--batch_size", type=int, default=64, help="images per step, over all processes (DLCV HW4: 64)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (DLCV HW4)")
    p.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (DLCV HW4)")
    p.add_argument("--beta2", type=float, default=0.999, help="Adam beta2")
    p.add_argument("--max_iters", type=int, default=20000, help="training steps")
    p.add_argument("--log_interval", type=int, default=100, help="steps between log.jsonl lines")
    p.add_argument("--sample_interval", type=int, default=2000,
                   help="steps between evaluations: test MSE, ckpt_best.pt, sample grid, reconstruction grid, curves.png")
    p.add_argument("--ckpt_interval", type=int, default=2000, help="steps between checkpoints (one is always written at the end)")
    p.add_argument("--seed", type=int, default=1337, help="random seed")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="autocast dtype; auto: bfloat16 where the device computes it natively (CUDA, CPUs with AVX512-BF16 or AMX), else float32")
    p.add_argument("--compile", action="store_true", help="torch.compile encoder and decoder")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue from CKPT (default: --out_dir/ckpt.pt) exactly where it stopped")
    return p.parse_args(argv)


# Flags a resumed run may change; everything else comes from the checkpoint.
RESUMABLE_OVERRIDES = ("max_iters", "lr", "log_interval", "sample_interval", "ckpt_interval", "device", "dtype", "compile",
                       "out_dir", "resume", "latent_map")


def main(argv=None):
    config = vars(get_args(argv))
    device, rank, world = setup_distributed(config["device"])
    ddp, master = world > 1, rank == 0
    ckpt = None
    if config["resume"]:
        ckpt, config = resume_config(config, argv)
    if config["img_size"] is None:  # the handouts' sizes: 28 x 28 digits for the MLP, 32 x 32 for the conv VAEs
        config["img_size"] = 28 if config["arch"] == "mlp" else 32
    check_positive(config, ["batch_size", "max_iters", "log_interval", "sample_interval", "ckpt_interval", "img_size",
                            "latent_dim", "hidden", "width", "h_dim", "iw_k", "flow_length", "lr"])
    if config["arch"] != "mlp" and config["img_size"] % 2 ** config["depth"]:
        fail(f"--img_size {config['img_size']} is not supported by the conv VAE with --depth {config['depth']}: "
             f"use a multiple of 2^depth = {2 ** config['depth']}, e.g. 32 or 64 (or a lower --depth, or --arch mlp)")
    if config["arch"] == "csi5340":
        side = csi5340_first_map(config["img_size"], config["depth"])
        if config["h_dim"] % side ** 2:
            fail(f"--h_dim {config['h_dim']} cannot be read as the decoder's first feature map, {side} x {side} pixels "
                 f"(img_size / 2^(depth-1)): use a multiple of {side} x {side} = {side ** 2}")
        if config["recon"] not in GAUSSIAN_RECON:
            fail(f"--recon {config['recon']} needs a decoder of logits; --arch csi5340 ends in tanh: use --recon mse or mse_mean")
    if config["flow_hidden"] < 0:
        fail(f"--flow_hidden {config['flow_hidden']} must be positive, or 0 for twice --latent_dim")
    if not config["kl_weight"] >= 0:
        fail(f"--kl_weight {config['kl_weight']} must be at least 0")
    try:
        train_images, train_labels = load_images(config["data_dir"], config["dataset"], "train", config["img_size"])
        test_images, test_labels = load_images(config["data_dir"], config["dataset"], "test", config["img_size"])
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    if config["batch_size"] % world:
        fail(f"--batch_size {config['batch_size']} is not divisible by the {world} processes")
    config["channels"] = train_images.shape[1]
    dtype = resolve_dtype(config["dtype"], device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    # conv layers run faster on N x H x W x C tensors (oneDNN on CPU, tensor cores on CUDA)
    memory_format = torch.contiguous_format if config["arch"] == "mlp" else torch.channels_last
    data = train_images.to(device)  # uint8 on the device; batches are drawn by index
    test_data = test_images.to(device)
    local_batch = config["batch_size"] // world
    # an empty test split (data/folder/prepare.py --test_size 0): no test MSE; the pictures show training images
    shown_data, shown_labels = (test_data, test_labels) if len(test_data) else (data, train_labels)
    if master and not len(test_data):
        print(f"the test split of {config['dataset']} is empty: no test MSE or ckpt_best.pt; "
              f"the reconstruction grids and latents.png show training images", flush=True)
    if master and config["latent_map"] == "tsne" and not have_sklearn():
        print("scikit-learn is not installed: latents.png will be a PCA map (pip install scikit-learn for t-SNE)", flush=True)

    torch.manual_seed(config["seed"] + rank)
    models = build_models(config)
    for model in models.values():
        model.to(device, memory_format=memory_format)
    encoder, decoder, flow = models["encoder"], models["decoder"], models.get("flow")
    parameters = [p for model in models.values() for p in model.parameters()]
    # the decoder's sigma (--recon mse) gets a larger step: at --lr it would need ~10^4 steps to reach sigma^2 = MSE
    sigma = [decoder.log_sigma] if config["recon"] in GAUSSIAN_RECON else []
    groups = [{"params": [p for p in parameters if all(p is not s for s in sigma)], "lr_scale": 1.0}]
    groups += [{"params": sigma, "lr_scale": SIGMA_LR_SCALE}] if sigma else []
    opt = torch.optim.Adam(groups, lr=config["lr"], betas=(config["beta1"], config["beta2"]))
    for group in opt.param_groups:
        group["lr"] = config["lr"] * group["lr_scale"]
    data_gen = torch.Generator().manual_seed(config["seed"] + 1000 + rank)
    fixed_noise = torch.randn(36, config["latent_dim"], generator=torch.Generator().manual_seed(config["seed"])).to(device)
    # running sums over the current log window: checkpointed, so a resumed log equals an uninterrupted one
    window = {k: torch.zeros((), device=device) for k in ("loss", "recon", "kl")}
    window_steps, step, best_mse = 0, 0, float("inf")
    if ckpt is not None:
        for name, model in models.items():
            model.load_state_dict(ckpt["models"][name])
        opt.load_state_dict(ckpt["optimizers"]["vae"])
        for group in opt.param_groups:
            group["lr"] = config["lr"] * group["lr_scale"]
        step, best_mse, fixed_noise = ckpt["step"], ckpt["best_test_mse"], ckpt["fixed_noise"].to(device)
        if "log_window" in ckpt:  # (checkpoints of earlier versions start an empty window)
            window = {k: v.to(device) for k, v in ckpt["log_window"]["sums"].items()}
            window_steps = ckpt["log_window"]["steps"]
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
    log_path = prepare_out_dir(config, step) if master else None
    if master:
        try:
            os.makedirs(os.path.join(out_dir, "reconstructions"), exist_ok=True)
        except OSError as e:
            fail(f"cannot write to --out_dir {out_dir}: {e.strerror or e}")

    def draw_batch():
        idx = torch.randint(0, len(data), (local_batch,), generator=data_gen).to(device)
        return to_unit_interval(data[idx]).contiguous(memory_format=memory_format)

    def checkpoint():
        return {
            "script": SCRIPT, "format": CHECKPOINT_FORMAT, "config": config, "step": step,
            "models": {name: model.state_dict() for name, model in models.items()},
            "optimizers": {"vae": opt.state_dict()},
            "rng": {"torch": torch.get_rng_state(), "data": data_gen.get_state(),
                    **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})},
            "fixed_noise": fixed_noise.cpu(), "best_test_mse": best_mse,
            "log_window": {"sums": {k: v.cpu() for k, v in window.items()}, "steps": window_steps},
        }

    show_idx = torch.linspace(0, len(shown_data) - 1, 36).long().to(device)  # spread over the split (mnist5k's is sorted by class)

    def evaluate():
        """The sample grid from the fixed noise, 36 test images beside their reconstructions, and the test MSE
        (None for an empty test split)."""
        for model in models.values():
            model.eval()
        save_image(generate(models, fixed_noise), os.path.join(out_dir, "samples", f"step_{step:06d}.png"), nrow=6, padding=2)
        x = to_unit_interval(shown_data[show_idx])
        save_image(reconstruction_grid(x, generate(models, encode(models, x)[0])),
                   os.path.join(out_dir, "reconstructions", f"step_{step:06d}.png"), nrow=13, padding=2)
        mse = mse_of_reconstructions(models, test_data) if len(test_data) else None
        for model in models.values():
            model.train()
        return mse

    recon_kind, kl_weight, iw_k = config["recon"], config["kl_weight"], config["iw_k"]
    t0, timed_steps = time.perf_counter(), 0  # the timer restarts with the process, the window may not
    while step < config["max_iters"]:
        # One step on minus the bound: the ELBO, or the importance-weighted bound for --iw_k > 1
        x = draw_batch()
        with autocast:
            loss, recon, kl, decoded = vae_loss(encoder_train, decoder_train, flow_train, x, recon_kind, kl_weight, iw_k, decoder.tanh)
        # --recon mse: the decoder's sigma is fitted on the side, by a Gaussian NLL that reaches nothing else
        loss_sigma = decoder_sigma_loss(x, decoded, decoder.log_sigma, decoder.tanh) if recon_kind in GAUSSIAN_RECON else 0
        opt.zero_grad(set_to_none=True)
        (loss + loss_sigma).backward()
        opt.step()
        step += 1

        with torch.no_grad():
            window["loss"] += loss.detach()
            window["recon"] += recon.detach().mean()
            window["kl"] += kl.detach().mean()
        window_steps += 1
        timed_steps += 1

        is_last = step == config["max_iters"]
        is_sample = step % config["sample_interval"] == 0 or is_last  # also the evaluation, with its own log row
        is_log = step % config["log_interval"] == 0 or is_sample
        is_ckpt = step % config["ckpt_interval"] == 0 or is_last
        if (is_log or is_ckpt) and not all_finite([*window.values(), *parameters], ddp):
            fail(f"non-finite loss or weights by step {step}; the last good checkpoint in {out_dir} is kept; try a lower --lr")
        if is_log:
            seconds = time.perf_counter() - t0  # the window's training time, without the evaluation
        test_mse = evaluate() if master and is_sample else None
        if is_log:
            if master:
                row = {"step": step, **{k: v.item() / window_steps for k, v in window.items()},
                       **({"test_mse": test_mse} if test_mse is not None else {}),
                       **({"sigma": decoder.log_sigma.exp().item()} if recon_kind in GAUSSIAN_RECON else {}),
                       "ms_per_step": 1000 * seconds / timed_steps,
                       "images_per_s": timed_steps * config["batch_size"] / seconds}
                if device.type == "cuda":
                    row["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                write_log_row(log_path, row, config["max_iters"])
            for v in window.values():
                v.zero_()
            window_steps, timed_steps = 0, 0
        if master and (is_sample or is_ckpt):
            try:
                if is_sample:
                    plot_curves(log_path, os.path.join(out_dir, "curves.png"), [("loss", "recon"), ("kl",)])
                    if test_mse is not None and test_mse < best_mse:
                        best_mse = test_mse
                        save_checkpoint(checkpoint(), os.path.join(out_dir, "ckpt_best.pt"))
                if is_ckpt:
                    save_checkpoint(checkpoint(), os.path.join(out_dir, "ckpt.pt"))
            except OSError as e:
                fail(e)
        if is_log:
            t0 = time.perf_counter()  # the next window starts after the evaluation and the saving

    if master:
        for model in models.values():
            model.eval()
        # every test image, once at the end: t-SNE takes ~6 s on the 1,000 test digits but ~1 min on 10,000 points,
        # too slow for every evaluation; without a test split, at most 10,000 training images
        n_map = len(shown_data) if len(test_data) else min(len(shown_data), 10000)
        idx = torch.linspace(0, len(shown_data) - 1, n_map).long()
        mu = torch.cat([encode(models, to_unit_interval(shown_data[i.to(device)]))[0] for i in idx.split(500)]).cpu()
        labels, label_name = map_labels(shown_labels[idx] if shown_labels is not None else None, config)
        xy, method = latent_map(mu, config["latent_map"])
        save_latent_map(xy.numpy(), labels.numpy() if labels is not None else None, method, label_name, os.path.join(out_dir, "latents.png"))
        if len(test_data):
            print(f"test MSE: {mse_of_reconstructions(models, test_data):.6f} (best {best_mse:.6f}, kept in ckpt_best.pt)")
    if ddp:
        del encoder_train, decoder_train, flow_train  # DDP reducers must go before their process group, or exit can abort
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
