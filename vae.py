"""VAE: variational autoencoders in one file (Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014), with
the IWAE bound (Burda et al. 2016, --iw_k), planar and inverse autoregressive flow posteriors (Rezende & Mohamed 2015;
Kingma et al. 2016, --flow) and a discretised logistic likelihood of 8-bit pixels (Salimans et al. 2017, --recon
dlogistic). Notes: docs/vae.md.

    python vae.py                                      # MLP VAE on the embedded MNIST sample, 28x28
    python vae.py --arch conv --iw_k 5 --flow iaf      # conv VAE at 32x32, IWAE bound, IAF posterior
    torchrun --nproc_per_node=2 vae.py                 # DistributedDataParallel

A run writes to --out_dir: ckpt.pt, ckpt_best.pt (lowest test MSE), samples/, reconstructions/, log.jsonl, config.json.
"""
import argparse, copy, io, json, math, os, sys, time, timeit

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SCRIPT = "vae"
CHECKPOINT_FORMAT = 2
LOG_2PI = math.log(2 * math.pi)
SIGMA_LR_SCALE = 50.0  # learning rate of the decoder's log-sigma (--recon mse, mse_mean) relative to --lr
LOG_SCALE_MIN = -7.0  # floor of the discretised logistic's log-scale, as in PixelCNN++
GAUSSIAN_RECON = ("mse", "mse_mean")  # the squared-error losses, whose decoder carries a Gaussian's sigma
WIDEST = 2 ** 16  # the largest layer or latent size a flag may ask for

# -----------------------------------------------------------------------------
# Data: data/<dataset>/{train,test}.npy, uint8 N x H x W x C, held on the device
def load_images(data_dir, dataset, split, img_size):
    """data/<dataset>/<split>.npy as uint8 N x C x H x W at img_size, and <split>_labels.npy (None where absent)."""
    prepare = f"python {os.path.join(data_dir, dataset.split('/')[0], 'prepare.py')}"  # data/folder/<name>: folder's
    path, labels_path = (os.path.join(data_dir, dataset, f"{split}{suffix}.npy") for suffix in ("", "_labels"))
    if not os.path.isdir(data_dir) or not os.path.exists(path):
        raise FileNotFoundError(f"no {split} split of '{dataset}' at {path}; make it with: {prepare}")
    arrays = []
    for file in (path, labels_path)[:1 + os.path.exists(labels_path)]:
        try:
            arrays.append(np.load(file))
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"cannot read {file} ({e}); remake it with: {prepare}") from None
    images, labels = arrays[0], arrays[1] if len(arrays) > 1 else None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{path} should hold uint8 N x H x W x C, C = 1 or 3, not {images.dtype} {images.shape}; "
                         f"remake it with: {prepare}")
    if labels is not None and labels.shape[:1] != images.shape[:1]:
        raise ValueError(f"{labels_path} has {len(labels)} labels for {len(images)} images; remake it with: {prepare}")
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    if images.shape[-2:] != (img_size, img_size):
        images = resize_uint8(images, img_size)
    return images, None if labels is None else torch.from_numpy(labels).long()

def resize_uint8(images, size, chunk=1024):
    out = torch.empty(len(images), images.shape[1], size, size, dtype=torch.uint8)
    for i in range(0, len(images), chunk):
        x = F.interpolate(images[i:i + chunk].float(), size=(size, size), mode="bilinear", antialias=True)
        out[i:i + chunk] = x.round().clamp(0, 255).to(torch.uint8)
    return out

def real_images(config, split):
    return load_images(config["data_dir"], config["dataset"], split, config["img_size"])

def to_unit_interval(images_uint8):
    return images_uint8.float().div(255.0)  # [0, 1], the range of the decoder's mean

def pixel_levels(x):
    """x in [0, 1] -> its 8-bit level floor(256 x) in 0..255, for a training image k / 255 and a dequantised one."""
    return torch.floor(x * 256).clamp(0, 255)

# -----------------------------------------------------------------------------
# Models: the encoder's q0(z|x), the decoder's p(x|z), and normalizing flows
class Encoder(nn.Module):
    """body(x) = h (the IAF's context) -> linear heads of q0(z|x) = N(mu, diag exp(logvar)); signed: x in [-1, 1]."""

    def __init__(self, body, feature_dim, latent_dim, signed=False):
        super().__init__()
        self.body, self.feature_dim, self.signed = body, feature_dim, signed
        self.fc_mu, self.fc_logvar = nn.Linear(feature_dim, latent_dim), nn.Linear(feature_dim, latent_dim)

    def forward(self, x):
        h = self.body(2 * x - 1 if self.signed else x)
        return self.fc_mu(h), self.fc_logvar(h), h

class Decoder(nn.Module):
    """z -> fc, viewed as start -> net -> out: per pixel, logits (bce, mse), an image in [-1, 1] (tanh) or logistics'
    means and log-scales (dlogistic: logistic_mixture); float32 out under bf16 too. mse, mse_mean: it holds sigma."""

    def __init__(self, fc, start, net, out, shape, recon, tanh=False, mixture=1):
        super().__init__()
        self.fc, self.start, self.net, self.out, self.shape = fc, start, net, out, shape
        self.recon, self.tanh, self.mixture = recon, tanh, mixture
        if recon in GAUSSIAN_RECON:
            self.log_sigma = nn.Parameter(torch.zeros(()))

    def forward(self, z):
        h = self.net(self.fc(z).view(-1, *self.start))
        with torch.autocast(h.device.type, enabled=False):
            return self.out(h.float()).view(-1, *self.shape)

def upsample_block(in_ch, out_ch, mode, bias=False):
    """Double the size: a strided transposed conv, or resize then 3x3 conv (Odena et al. 2016)."""
    if mode == "convtranspose":
        return nn.ConvTranspose2d(in_ch, out_ch, 4, 2, 1, bias=bias)
    return nn.Sequential(nn.Upsample(scale_factor=2, mode=mode), nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=bias))

def conv_stack(in_ch, widths, block, activation):
    layers = []
    for width in widths:
        layers += [block(in_ch, width), nn.BatchNorm2d(width), activation()]
        in_ch = width
    return layers

# Normalizing flows z_0 -> z_K, returning (z_K, sum_k log |det dz_k / dz_(k-1)|): log q(z_K|x) = log q0(z_0|x) - that
class PlanarFlow(nn.Module):
    """length layers f(z) = z + u_hat tanh(w.z + b) (Rezende & Mohamed 2015); u_hat = u + (m(w.u) - w.u) w / |w|^2,
    m(a) = -1 + softplus(a), keeps w.u_hat > -1, so each is invertible; log |det| = log(1 + tanh'(w.z + b) w.u_hat)."""

    def __init__(self, latent_dim, length):
        super().__init__()
        self.u = nn.Parameter(torch.randn(length, latent_dim) * 0.1)
        self.w = nn.Parameter(torch.randn(length, latent_dim) * 0.1)
        self.b = nn.Parameter(torch.zeros(length))

    def forward(self, z, h=None):
        logdet = z.new_zeros(z.shape[0])
        for u, w, b in zip(self.u, self.w, self.b):
            u_hat = u + (F.softplus(w @ u) - 1 - w @ u) * w / (w @ w)
            t = torch.tanh(z @ w + b)
            z, logdet = z + t[:, None] * u_hat, logdet + torch.log1p((1 - t ** 2) * (w @ u_hat))
        return z, logdet

class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (MADE, Germain et al. 2015)."""

    def __init__(self, in_features, out_features, mask):
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.float())

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)

class IAFStep(nn.Module):
    """Kingma et al. 2016, Algorithm 1: [m, s] = MADE(z, h), sigma = sigmoid(s), z <- sigma z + (1 - sigma) m,
    log |det| = sum log sigma. Output i of the two-layer MADE sees inputs 1..i-1 only; h enters its first layer."""

    def __init__(self, latent_dim, hidden, context_dim):
        super().__init__()
        d_in, d_hid = torch.arange(1, latent_dim + 1), torch.arange(hidden) % max(latent_dim - 1, 1) + 1  # degrees
        self.inp = MaskedLinear(latent_dim, hidden, d_hid[:, None] >= d_in[None, :])
        self.context = nn.Linear(context_dim, hidden)
        self.mid = MaskedLinear(hidden, hidden, d_hid[:, None] >= d_hid[None, :])
        self.m = MaskedLinear(hidden, latent_dim, d_in[:, None] > d_hid[None, :])
        self.s = MaskedLinear(hidden, latent_dim, d_in[:, None] > d_hid[None, :])
        nn.init.constant_(self.s.bias, 2.0)  # sigma near 1 at the start: close to the identity (their section 4)

    def forward(self, z, h):
        a = F.elu(self.mid(F.elu(self.inp(z) + self.context(h))))
        s = self.s(a)
        sigma = torch.sigmoid(s)
        return sigma * z + (1 - sigma) * self.m(a), F.logsigmoid(s).sum(-1)

class InverseAutoregressiveFlow(nn.ModuleList):
    """length IAF steps; the latents' order is reversed between steps (a permutation: |det| = 1)."""

    def __init__(self, latent_dim, length, hidden, context_dim):
        super().__init__(IAFStep(latent_dim, hidden, context_dim) for _ in range(length))

    def forward(self, z, h):
        logdet = z.new_zeros(z.shape[0])
        for i, step in enumerate(self):
            z, step_logdet = step(z.flip(-1) if i else z, h)
            logdet = logdet + step_logdet
        return z, logdet

def build_models(config):
    """{"encoder", "decoder"} (and "flow"), shapes in docs/vae.md. mlp: D -> hidden (ReLU) -> mean, log-variance, and
    back. conv: strided 4x4 convs, batch norm, LeakyReLU 0.01, mirrored. csi5340: ReLU, a dense layer to h_dim that the
    decoder reads as its first map, and a 3x3 conv, batch norm, tanh at the end. Layer order fixes the seeded init."""
    c, size, latent, depth = config["channels"], config["img_size"], config["latent_dim"], config["depth"]
    mixture = config["mixture"]  # dlogistic: per pixel K means and log-scales, after K mixture logits where K > 1
    shape = ((2 + (mixture > 1)) * mixture * c if config["recon"] == "dlogistic" else c, size, size)
    widths = [config["width"] * 2 ** i for i in range(depth)]
    side = size // 2 ** depth  # the encoder's convs end in widths[-1] x side x side
    down = lambda a, b: nn.Conv2d(a, b, 4, 2, 1, bias=False)  # noqa: E731
    up = lambda a, b: upsample_block(a, b, config["upsample"])  # noqa: E731
    if config["arch"] == "mlp":
        hidden = config["hidden"]
        body = nn.Sequential(nn.Flatten(), nn.Linear(c * size * size, hidden), nn.ReLU(True))
        encoder = Encoder(body, hidden, latent)
        fc, start, net, out = nn.Linear(latent, hidden), (hidden,), nn.ReLU(True), nn.Linear(hidden, math.prod(shape))
    elif config["arch"] == "conv":
        leaky = lambda: nn.LeakyReLU(0.01, True)  # noqa: E731
        body = nn.Sequential(*conv_stack(c, widths, down, leaky), nn.Flatten())
        encoder = Encoder(body, widths[-1] * side ** 2, latent)
        net = nn.Sequential(nn.BatchNorm2d(widths[-1]), leaky(), *conv_stack(widths[-1], widths[-2::-1], up, leaky))
        fc, start = nn.Linear(latent, widths[-1] * side ** 2), (widths[-1], side, side)
        out = upsample_block(widths[0], shape[0], config["upsample"], bias=True)
    else:
        h_dim, first = config["h_dim"], size // 2 ** (depth - 1)  # first: the side of the decoder's first map
        relu = lambda: nn.ReLU(True)  # noqa: E731
        body = nn.Sequential(*conv_stack(c, widths, down, relu), nn.Flatten(), nn.Linear(widths[-1] * side ** 2, h_dim))
        encoder, start = Encoder(body, h_dim, latent, signed=True), (h_dim // first ** 2, first, first)
        last_conv = nn.Conv2d(widths[0] if depth > 1 else start[0], c, 3, 1, 1, bias=False)
        out = nn.Sequential(last_conv, nn.BatchNorm2d(c), nn.Tanh())
        fc, net = nn.Linear(latent, h_dim), nn.Sequential(*conv_stack(start[0], widths[-2::-1], up, relu))
    decoder = Decoder(fc, start, net, out, shape, config["recon"], config["arch"] == "csi5340", mixture)
    models = {"encoder": encoder, "decoder": decoder}
    if config["flow"] == "planar":
        models["flow"] = PlanarFlow(latent, config["flow_length"])
    elif config["flow"] == "iaf":
        flow_hidden = config["flow_hidden"] or 2 * latent
        models["flow"] = InverseAutoregressiveFlow(latent, config["flow_length"], flow_hidden, encoder.feature_dim)
    return models

def sample_latent(config, n, device, generator=None):
    return torch.randn(n, config["latent_dim"], device=device, generator=generator)

@torch.no_grad()
def generate(models, z, labels=None):
    """The mean of p(x|z) in [0, 1]."""
    return decoder_mean(models["decoder"], models["decoder"](z).float())

@torch.no_grad()
def encode(models, x):
    """(mu, logvar) of q(z|x), x in [0, 1]; with a flow, mu is f(mu_0), a code the decoder reads (q(z_K|x) has no
    closed-form mean), and logvar the base Gaussian's."""
    mu, logvar, h = (t.float() for t in models["encoder"](x))
    return (models["flow"](mu, h)[0] if "flow" in models else mu), logvar

# -----------------------------------------------------------------------------
# Losses and densities, per image (summed over the pixels / latent dimensions)
def bernoulli_log_likelihood(x, logits):
    return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum((-3, -2, -1))

def continuous_bernoulli_log_norm(logits):
    """log C(sigmoid(l)) = log(l / tanh(l / 2)) (Loaiza-Ganem & Cunningham 2019), summed over pixels: added to the
    Bernoulli log-likelihood, a density on [0, 1]. Near l = 0 the series l / tanh(l / 2) = 2 + l^2 / 6 + O(l^4)."""
    a = logits.abs()
    a_safe = torch.where(a < 1e-2, torch.ones_like(a), a)
    large = torch.log(a_safe) - torch.log1p(-torch.exp(-a_safe)) + F.softplus(-a_safe)  # - log tanh(a / 2)
    return torch.where(a < 1e-2, torch.log(2 + a ** 2 / 6), large).sum((-3, -2, -1))

def gaussian_nll(x, x_hat, log_sigma):
    return (0.5 * ((x - x_hat) * torch.exp(-log_sigma)) ** 2 + log_sigma + 0.5 * LOG_2PI).sum((-3, -2, -1))

def logistic_mixture(decoded, mixture):
    """decoded -> (log mixture weights, means in [-1, 1], log-scales), each ... x K x C x H x W: the means and
    log-scales of K logistics per pixel, after K mixture logits where K > 1."""
    parts = decoded.unflatten(-3, (2 + (mixture > 1), mixture, -1)).unbind(-5)
    log_weights = F.log_softmax(parts[0], -4) if mixture > 1 else torch.zeros_like(parts[0])
    return log_weights, parts[-2], parts[-1].clamp(min=LOG_SCALE_MIN)

def discretised_logistic_log_likelihood(x, decoded, mixture=1):
    """log P of the 8-bit levels of x under a mixture of K logistics per pixel (Salimans et al. 2017, PixelCNN++, with
    independent channels). Level k owns [c - 1/255, c + 1/255], c = 2k / 255 - 1, the edge levels the tails;
    sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - e^-(a - b)) keeps it stable in float32."""
    log_weights, mean, log_scale = logistic_mixture(decoded, mixture)
    level, inv_scale = pixel_levels(x).unsqueeze(-4), torch.exp(-log_scale)
    upper = (level / 127.5 - 1 + 1 / 255 - mean) * inv_scale
    lower = (level / 127.5 - 1 - 1 / 255 - mean) * inv_scale
    interior = F.logsigmoid(upper) + F.logsigmoid(-lower) + torch.log(-torch.expm1(-2 / 255 * inv_scale))
    log_p = torch.where(level == 0, F.logsigmoid(upper), torch.where(level == 255, F.logsigmoid(-lower), interior))
    return torch.logsumexp(log_weights + log_p, -4).sum((-3, -2, -1))

def discretised_logistic_mean(decoded, mixture=1):
    """E[level] / 255 = the sum over the 255 bin edges t of P(level > t) = sigmoid((mean - t) / scale), over 255."""
    log_weights, mean, log_scale = logistic_mixture(decoded, mixture)
    inv_scale, total = torch.exp(-log_scale), torch.zeros_like(mean)
    for k in range(1, 256):  # the edge between levels k - 1 and k is at (2k - 1) / 255 - 1
        total += torch.sigmoid((mean - (2 * k - 1) / 255 + 1) * inv_scale)
    return (log_weights.exp() * total).sum(-4) / 255

def decoder_mean(decoder, decoded):
    if decoder.recon == "dlogistic":
        return discretised_logistic_mean(decoded, decoder.mixture)
    return (decoded + 1) / 2 if decoder.tanh else torch.sigmoid(decoded)

def reconstruction_loss(kind, x, decoded, tanh=False, mixture=1):
    """Summed BCE, -log P (dlogistic), or the squared error summed (mse) or averaged (mse_mean) over pixels, in the
    decoder's units: [0, 1] for sigmoid(logits), [-1, 1] for a tanh output (4 times the error in [0, 1] units)."""
    if kind == "dlogistic":
        return -discretised_logistic_log_likelihood(x, decoded, mixture)
    if kind == "bce":
        return -bernoulli_log_likelihood(x, decoded)
    error = (decoded - (2 * x - 1)).pow(2) if tanh else (torch.sigmoid(decoded) - x).pow(2)
    return error.mean((-3, -2, -1)) if kind == "mse_mean" else error.sum((-3, -2, -1))

def gaussian_kl(mu, logvar):
    """KL(N(mu, diag exp(logvar)) || N(0, I)) in closed form (Kingma & Welling, appendix B)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1)

def log_standard_normal(z):
    return -0.5 * (z.pow(2) + LOG_2PI).sum(-1)

def posterior_samples(mu, logvar, h, flow, k):
    """k draws z = f(mu + sigma eps) ~ q(z|x) per image, (k, N, L), and log q(z|x) = log q0(z_0|x) - log |det df|."""
    eps = torch.randn(k, *mu.shape, device=mu.device)
    z, log_q = mu + torch.exp(0.5 * logvar) * eps, -0.5 * (eps.pow(2) + logvar + LOG_2PI).sum(-1)
    if flow is not None:
        with torch.autocast(mu.device.type, enabled=False):  # log-determinants in float32, also under bf16 autocast
            z, logdet = flow(z.flatten(0, 1), h.repeat(k, 1))
        z, log_q = z.view(k, *mu.shape), log_q - logdet.view(k, -1)
    return z, log_q

def vae_loss(models, x, recon_kind, kl_weight, k, tanh=False, mixture=1):
    """Minus the bound, averaged over the batch -> (loss, reconstruction (N,), KL (N,), decoder output). k = 1 without a
    flow: reconstruction + kl_weight * KL in closed form. Else the IWAE bound (Burda et al.), log mean_j w_j with log
    w_j = -reconstruction(z_j) - kl_weight (log q(z_j|x) - log p(z_j)), a bound on log p(x) where kl_weight = 1."""
    flow = models.get("flow")
    mu, logvar, h = (t.float() for t in models["encoder"](x))
    z, log_q = posterior_samples(mu, logvar, h, flow, k)
    decoded = models["decoder"](z.flatten(0, 1)).float()
    recon = reconstruction_loss(recon_kind, x, decoded.view(k, -1, *decoded.shape[1:]), tanh, mixture)  # (k, N)
    if k == 1 and flow is None:
        kl = gaussian_kl(mu, logvar)
        return (recon[0] + kl_weight * kl).mean(), recon[0], kl, decoded
    kl = log_q - log_standard_normal(z)  # (k, N), one-sample Monte Carlo estimates
    return -(torch.logsumexp(-recon - kl_weight * kl, 0) - math.log(k)).mean(), recon.mean(0), kl.mean(0), decoded

def decoder_sigma_loss(x, decoded, log_sigma, tanh=False):
    """The Gaussian NLL of the detached decoder output: it fits sigma alone (--recon mse, mse_mean), to the MSE."""
    mean = (decoded.detach() + 1) / 2 if tanh else torch.sigmoid(decoded.detach())
    return gaussian_nll(x, mean.view(-1, *x.shape), log_sigma).mean()

def log_likelihood(decoder, x, decoded):
    """log p(x|z), a density on [0, 1]^D: continuous Bernoulli, Gaussian with the learned sigma (a lower bound: its mass
    outside [0, 1]^D is lost), or P(levels) spread evenly over each level's cell [k/256, (k+1)/256)."""
    if decoder.recon == "bce":
        return bernoulli_log_likelihood(x, decoded) + continuous_bernoulli_log_norm(decoded)
    if decoder.recon == "dlogistic":
        return discretised_logistic_log_likelihood(x, decoded, decoder.mixture) + x[0].numel() * math.log(256)
    return -gaussian_nll(x, decoder_mean(decoder, decoded), decoder.log_sigma)

@torch.no_grad()
def log_importance_weights(models, x, k, max_elements=1 << 22):
    """log p(x, z_j) - log q(z_j|x), z_j ~ q(z|x), j = 1..k, as (k, N), decoded max_elements pixels at a time. A
    discretised decoder (and its encoder, as in training) sees x at its 8-bit levels: dequantisation leaves no trace."""
    encoder, decoder, flow = models["encoder"], models["decoder"], models.get("flow")
    x = pixel_levels(x) / 255 if decoder.recon == "dlogistic" else x
    mu, logvar, h = (t.float() for t in encoder(x))
    chunk, out = max(1, max_elements // x.numel()), []
    for j in (min(chunk, k - start) for start in range(0, k, chunk)):
        z, log_q = posterior_samples(mu, logvar, h, flow, j)
        decoded = decoder(z.flatten(0, 1)).float()
        out.append(log_likelihood(decoder, x, decoded.view(j, -1, *decoded.shape[1:])) + log_standard_normal(z) - log_q)
    return torch.cat(out)

@torch.no_grad()
def mse_of_reconstructions(models, images_uint8, chunk=500):
    """The mean over a split of (decoder's mean at mu - image)^2, in [0, 1] pixel units."""
    total = 0.0
    for i in range(0, len(images_uint8), chunk):
        x = to_unit_interval(images_uint8[i:i + chunk])
        total += (generate(models, encode(models, x)[0]) - x).pow(2).sum().item()
    return total / images_uint8.numel()

# -----------------------------------------------------------------------------
# Evaluation during training: grids, the test MSE, and the checkpoint at its lowest
class Record(dict):
    """Numbers a checkpoint keeps beside the state dicts (restore and save_checkpoint call these two)."""
    state_dict, load_state_dict = dict.copy, dict.update

def reconstruction_grid(x, x_rec, cols=6):
    """Each row: cols originals, a white cell, and their reconstructions; drawn 2 * cols + 1 cells wide."""
    originals, reconstructions = x.unflatten(0, (-1, cols)), x_rec.unflatten(0, (-1, cols))
    return torch.cat([originals, torch.ones_like(originals[:, :1]), reconstructions], 1).flatten(0, 1)

def draw_and_score(models, step, out_dir, fixed_noise, shown, test_data, master):
    """The sample grid, 36 images beside their reconstructions, and the test MSE (None for an empty test split): all
    by rank 0, whose MSE every rank gets, so that all agree on saving ckpt_best.pt."""
    for model in models.values():
        model.eval()
    if master:
        save_grid(generate(models, fixed_noise), f"{out_dir}/samples/step_{step:06d}.png", nrow=6)
        save_grid(reconstruction_grid(shown, generate(models, encode(models, shown)[0])),
                   f"{out_dir}/reconstructions/step_{step:06d}.png", nrow=13)
    mse = [mse_of_reconstructions(models, test_data) if master and len(test_data) else None]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(mse, src=0)
    for model in models.values():
        model.train()
    return mse[0]

# -----------------------------------------------------------------------------
# Training
def get_args(argv=None, defaults=None):
    p = argparse.ArgumentParser(description="Train a VAE.", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--img_size", type=number(int, 1, 1024), help="image side; unset: 28 for --arch mlp, else 32")
    p.add_argument("--arch", default="mlp", choices=["mlp", "conv", "csi5340"], help="csi5340: ReLU, --h_dim, tanh")
    p.add_argument("--latent_dim", type=number(int, 1, WIDEST), default=20, help="latent size")
    p.add_argument("--hidden", type=number(int, 1, WIDEST), default=400, help="--arch mlp: hidden layer width")
    p.add_argument("--depth", type=int, default=4, choices=range(1, 6), metavar="{1,...,5}", help="conv layers")
    p.add_argument("--width", type=number(int, 1, WIDEST), default=32, help="first conv's channels, doubled per layer")
    p.add_argument("--h_dim", type=number(int, 1, WIDEST), default=1024, help="--arch csi5340: the dense layer after "
                   "the convs, also the decoder's first map: a multiple of (img_size / 2^(depth-1))^2")
    p.add_argument("--upsample", default="convtranspose", choices=["convtranspose", "nearest", "bilinear"],
                   help="how the conv decoders double the size: transposed conv, or resize then 3x3 conv")
    p.add_argument("--recon", default="bce", choices=["bce", "mse", "mse_mean", "dlogistic"],
                   help="p(x|z): Bernoulli, squared error summed or averaged over pixels, or discretised logistic")
    p.add_argument("--mixture", type=number(int, 1, 256), default=1, help="--recon dlogistic: logistics per pixel")
    p.add_argument("--kl_weight", type=number(float, 0), default=1.0, help="weight of the KL term; 1: the ELBO")
    p.add_argument("--iw_k", type=number(int, 1, 1024), default=1, help="importance samples of the IWAE bound; 1: ELBO")
    p.add_argument("--flow", default="none", choices=["none", "planar", "iaf"], help="normalizing-flow posterior")
    p.add_argument("--flow_length", type=number(int, 1, 1024), default=4, help="flow layers / IAF steps")
    p.add_argument("--flow_hidden", type=number(int, 0, WIDEST), default=0, help="IAF width; 0: twice --latent_dim")
    p.add_argument("--lr", type=number(float, 0, low_open=True), default=2e-4, help="Adam learning rate")
    p.add_argument("--beta1", type=FRACTION, default=0.5, help="Adam beta1")
    p.add_argument("--beta2", type=FRACTION, default=0.999, help="Adam beta2")
    args = parse_run_flags(p, argv, {"sample_interval": 2000, "ckpt_interval": 2000, **(defaults or {})},
                           batch_size=64, max_iters=20000)
    args.img_size = args.img_size or (28 if args.arch == "mlp" else 32)
    side = args.img_size // 2 ** (args.depth - 1)
    if args.arch != "mlp" and args.img_size % 2 ** args.depth:
        fail(f"--img_size {args.img_size} is not supported by the conv VAE with --depth {args.depth}: use a multiple "
             f"of 2^depth = {2 ** args.depth} (or a lower --depth, or --arch mlp)")
    if args.arch == "csi5340" and args.h_dim % side ** 2:
        fail(f"--h_dim {args.h_dim} cannot be read as the decoder's first map, {side} x {side} pixels: use a multiple "
             f"of {side} x {side} = {side ** 2}")
    if args.mixture > 1 and args.recon != "dlogistic":
        fail(f"--mixture {args.mixture} is a mixture of logistics: it needs --recon dlogistic")
    if args.arch == "csi5340" and args.recon not in GAUSSIAN_RECON:
        fail(f"--recon {args.recon} needs a decoder of logits; --arch csi5340 ends in tanh: use --recon mse or "
             f"mse_mean")
    return args

def main(argv=None):
    config, ckpt = parse_config(get_args, argv)
    device, rank, world = setup_distributed(config)
    ddp, master, out_dir = world > 1, rank == 0, config["out_dir"]
    data, _ = train_data(config, device)
    try:
        test_data = real_images(config, "test")[0].to(device)
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    local_batch = config["batch_size"] // world
    recon, kl_weight, iw_k = config["recon"], config["kl_weight"], config["iw_k"]
    memory_format = torch.contiguous_format if config["arch"] == "mlp" else torch.channels_last  # faster convs

    torch.manual_seed(config["seed"])  # the same initial weights on every rank, so the EMA starts from DDP's
    models = {name: m.to(device, memory_format=memory_format) for name, m in build_models(config).items()}
    if rank:  # from here each rank draws its own noise; rank 0 goes on as a single process does
        torch.manual_seed(config["seed"] + rank)
    decoder, best = models["decoder"], Record(test_mse=math.inf)
    # the decoder's sigma (--recon mse, mse_mean) takes larger steps: at --lr it would need ~10^4 to fit the MSE
    sigma = [decoder.log_sigma] if recon in GAUSSIAN_RECON else []
    groups = [{"params": [p for m in models.values() for p in m.parameters() if all(p is not s for s in sigma)]}]
    groups += [{"params": sigma, "lr": SIGMA_LR_SCALE * config["lr"], "lr_scale": SIGMA_LR_SCALE}] if sigma else []
    optimizers = {"vae": torch.optim.Adam(groups, config["lr"], (config["beta1"], config["beta2"]))}
    data_gen = torch.Generator().manual_seed(config["seed"] + 1000 + rank)
    state = {"models": models, "optimizers": optimizers, "ema": {}, "records": {"best": best}}  # what ckpt.pt holds
    step, window = restore(ckpt, config, state, data_gen, device)
    trial_nets = copy.deepcopy(models)
    trial_x = to_unit_interval(data[:local_batch]).contiguous(memory_format=memory_format)

    def trial_step():  # copies of the networks on a fixed batch, leaving the random streams as they were
        with torch.random.fork_rng(devices=[]):
            vae_loss(trial_nets, trial_x, recon, kl_weight, iw_k, decoder.tanh, decoder.mixture)[0].backward()
    autocast = choose_precision(config, device, trial_step)
    fixed_noise = fixed_randn(config["seed"], 36, config["latent_dim"]).to(device)  # the sample grids' latents
    shown = test_data if len(test_data) else data  # 36 images spread over the split (mnist5k's is sorted by class)
    shown = to_unit_interval(shown[torch.linspace(0, len(shown) - 1, 36).long().to(device)])
    if master and not len(test_data):
        print(f"the test split of {config['dataset']} is empty: no test MSE or ckpt_best.pt; the grids show training "
              f"images", flush=True)

    nets = {n: torch.compile(m) if config["compile"] and n != "flow" else m for n, m in models.items()}
    if ddp:
        nets = {n: torch.nn.parallel.DistributedDataParallel(m) for n, m in nets.items()}
    log_path = prepare_out_dir(config, step) if master else None
    if master:
        os.makedirs(f"{out_dir}/reconstructions", exist_ok=True)  # where prepare_out_dir could write
    t0, timed = time.perf_counter(), 0
    while step < config["max_iters"]:
        # One update of encoder, decoder and flow on minus the bound: the ELBO, or the IWAE bound for --iw_k > 1
        idx = torch.randint(0, len(data), (local_batch,), generator=data_gen).to(device)
        x = to_unit_interval(data[idx]).contiguous(memory_format=memory_format)
        with autocast:
            loss, rec, kl, decoded = vae_loss(nets, x, recon, kl_weight, iw_k, decoder.tanh, decoder.mixture)
        # --recon mse, mse_mean: the decoder's sigma is fitted on the side, by a Gaussian NLL that reaches nothing else
        loss_sigma = decoder_sigma_loss(x, decoded, decoder.log_sigma, decoder.tanh) if sigma else 0
        optimizers["vae"].zero_grad(set_to_none=True)
        (loss + loss_sigma).backward()
        optimizers["vae"].step()
        step, timed = step + 1, timed + 1
        accumulate(window, loss=loss, recon=rec, kl=kl, **({"sigma": decoder.log_sigma.exp()} if sigma else {}))

        is_log, is_sample, is_ckpt = (step % config[k] == 0 or step == config["max_iters"] for k in INTERVALS)
        if is_log or is_sample:  # an evaluation writes a log row too, with the test MSE
            check_finite(window, step, config)
            seconds = time.perf_counter() - t0  # the window's training time, without the evaluation
            test_mse = (draw_and_score(models, step, out_dir, fixed_noise, shown, test_data, master)
                        if is_sample else None)
            if test_mse is not None:
                window["test_mse"] = test_mse * window["steps"]  # write_log_row divides each sum by the steps
            if master:
                write_log_row(log_path, step, window, seconds, timed, config)
            window, timed = {}, 0
            if test_mse is not None and test_mse < best["test_mse"]:
                best["test_mse"] = test_mse
                save_checkpoint(config, step, state, data_gen, window, master, "ckpt_best.pt")
            if test_mse is not None and step == config["max_iters"]:
                print(f"test MSE: {test_mse:.6f} (best {best['test_mse']:.6f}, kept in ckpt_best.pt)")
            t0 = time.perf_counter()  # the next window starts after the evaluation
        if is_ckpt:
            save_checkpoint(config, step, state, data_gen, window, master)
    if ddp:
        del nets  # DDP reducers must go before their process group, or exit can abort
        torch.distributed.destroy_process_group()

# -----------------------------------------------------------------------------
# Run plumbing, the same in every model script (tests/test_shared_helpers.py keeps it so)
INTERVALS = ("log_interval", "sample_interval", "ckpt_interval")
RESUMABLE = {"max_iters", "lr", "log_interval", "sample_interval", "ckpt_interval", "device", "dtype", "compile",
             "out_dir", "resume", "eval_images"}  # what a resumed run may change; the rest is the checkpoint's

def number(cast, low, high=math.inf, low_open=False, high_open=False):
    """An argparse type: a finite cast(text) from low to high, each end included unless open."""
    def parse(text):
        value = cast(text)
        above, below = (value > low if low_open else value >= low), (value < high if high_open else value <= high)
        if not (math.isfinite(value) and above and below):
            raise argparse.ArgumentTypeError(f"{text} is outside {'[('[low_open]}{low}, {high}{'])'[high_open]}")
        return value
    return parse

FRACTION = number(float, 0, 1, high_open=True)  # [0, 1)

def parse_run_flags(p, argv, defaults, batch_size, max_iters):
    """Add the flags every script has and parse; a resumed run passes its checkpoint's config as the defaults."""
    p.error = fail  # one line, not the usage
    p.add_argument("--dataset", default="mnist5k", help="folder under --data_dir holding train.npy / test.npy")
    p.add_argument("--data_dir", default="data", help="where the prepared datasets live")
    p.add_argument("--out_dir", default=f"out/{SCRIPT}", help="checkpoint, samples, logs and curves go here")
    p.add_argument("--batch_size", type=number(int, 1, 65536), default=batch_size, help="images per step")
    p.add_argument("--max_iters", type=number(int, 1), default=max_iters, help="training iterations")
    p.add_argument("--log_interval", type=number(int, 1), default=100, help="iterations between log.jsonl rows")
    p.add_argument("--sample_interval", type=number(int, 1), default=1000, help="iterations between grids")
    p.add_argument("--ckpt_interval", type=number(int, 1), default=1000, help="iterations between checkpoints")
    p.add_argument("--seed", type=int, default=1337, help="random seed")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="autocast dtype; auto: bfloat16 on CUDA, and on a CPU where a timed trial finds it faster")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
    p.add_argument("--resume", nargs="?", const="auto", metavar="CKPT", help="continue from CKPT or --out_dir/ckpt.pt")
    p.set_defaults(**(defaults or {}))
    return p.parse_args(argv)

def parse_config(get_args, argv):
    """The flags as a dict, and the checkpoint to resume (None for a new run): its config becomes the parser's
    defaults and the flags are parsed again, so typed flags win."""
    args = get_args(argv)
    if not args.resume:
        return vars(args), None
    path = os.path.join(args.out_dir, "ckpt.pt") if args.resume == "auto" else args.resume
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        check_format(ckpt)
    except Exception as e:  # torch raises several types for a missing, torn or foreign file
        fail(f"--resume: cannot read checkpoint {path}: {str(e).splitlines()[0]}")
    config = vars(get_args(argv, ckpt["config"]))
    fixed = sorted(k for k, v in ckpt["config"].items() if k not in RESUMABLE and config[k] != v)
    if fixed:
        fail(f"--resume: --{fixed[0]} cannot change in a resumed run (the checkpoint has {ckpt['config'][fixed[0]]!r})")
    return config, ckpt

def check_format(ckpt):
    if not isinstance(ckpt, dict) or ckpt.get("script") != SCRIPT or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"this is not a format-{CHECKPOINT_FORMAT} {SCRIPT} checkpoint (an older {SCRIPT}.py or "
                         f"another script wrote it): start a new run, or use the version that wrote it")

def setup_distributed(config):
    """(device, rank, world size); under torchrun (WORLD_SIZE > 1) also joins the process group."""
    rank, world, name = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), config["device"]
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(name, int(os.environ["LOCAL_RANK"])) if world > 1 and name == "cuda" else torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.benchmark = True
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if config["batch_size"] % world:
        fail(f"--batch_size {config['batch_size']} is not divisible by the {world} processes")
    return device, rank, world

def train_data(config, device):
    """The training images (and labels) on the device, to draw batches by index; sets config["channels"]."""
    try:
        images, labels = load_images(config["data_dir"], config["dataset"], "train", config["img_size"])
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    if not len(images):
        fail(f"the train split of '{config['dataset']}' in {config['data_dir']} holds no images")
    config["channels"] = images.shape[1]
    return images.to(device), None if labels is None else labels.to(device)

def cpu_computes_bfloat16():
    """True on CPUs with native bfloat16 arithmetic (AVX512-BF16 or AMX): only there is bfloat16 worth a trial."""
    return torch.backends.mkldnn.is_available() and (torch.cpu._is_avx512_bf16_supported()
                                                     or torch.cpu._is_amx_tile_supported())

def time_trial(step, device, dtype):
    """Milliseconds of step() under autocast in dtype: the fastest of three calls after a warm-up call."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        step()
        return round(1000 * min(timeit.repeat(step, number=1, repeat=3)), 2)

def choose_precision(config, device, trial_step):
    """The autocast context of config["precision"]. --dtype auto: bfloat16 on CUDA where supported; on a CPU only
    where trial_step (a forward and backward of copies of the networks) runs >10% faster in it than in float32, as a
    CPU reporting avx512_bf16 can run it slower. A resumed run keeps its choice unless --dtype names one."""
    if config["dtype"] != "auto" or "precision" not in config:
        config["precision"], config["dtype_trial_ms"] = config["dtype"], {}
        if config["dtype"] == "auto" and device.type == "cpu" and cpu_computes_bfloat16():
            ms = config["dtype_trial_ms"] = {d: time_trial(trial_step, device, d) for d in ("float32", "bfloat16")}
            config["precision"] = "bfloat16" if ms["bfloat16"] * 1.1 < ms["float32"] else "float32"
        elif config["dtype"] == "auto":
            config["precision"] = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
        if torch.distributed.is_initialized():  # every rank takes rank 0's choice
            choice = [config["precision"]]
            torch.distributed.broadcast_object_list(choice, src=0)
            config["precision"] = choice[0]
    print(f"--dtype {config['dtype']}: {config['precision']}" + (f" (trial step, ms: {config['dtype_trial_ms']})"
                                                                    if config["dtype_trial_ms"] else ""))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config["precision"] == "bfloat16")

def fixed_randn(seed, *shape):
    """Noise from a generator of its own, leaving the training stream untouched (grids, statistics, trials)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))

def restore(ckpt, config, state, data_gen, device):
    """Load a checkpoint into the run's {group: {name: object}} -> (step, log window); a new run: (0, {})."""
    if ckpt is None:
        return 0, {}
    for group, objects in state.items():
        for name, obj in objects.items():
            obj.load_state_dict(ckpt[group][name])
    for group in (g for optimizer in state["optimizers"].values() for g in optimizer.param_groups):
        group["lr"] = config["lr"] * group.get("lr_scale", 1)  # --lr may change on resume
    if not torch.distributed.is_initialized():  # the saved streams are rank 0's; other ranks keep their own seeds
        torch.set_rng_state(ckpt["rng"]["torch"])
        data_gen.set_state(ckpt["rng"]["data"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    return ckpt["step"], dict(ckpt["log_window"])

def tensors_in(obj):
    if torch.is_tensor(obj):
        yield obj
    for item in obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []:
        yield from tensors_in(item)

def check_finite(state, step, config):
    """Stop when a float anywhere in `state` is not finite on any process (the ranks agree, so none waits forever)."""
    finite = torch.tensor(float(all(t.isfinite().all() for t in tensors_in(state) if t.is_floating_point())),
                          device="cuda" if torch.cuda.is_initialized() else "cpu")  # NCCL reduces CUDA tensors only
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    if not finite.item():
        fail(f"non-finite loss or weights by step {step}; the last good checkpoint in {config['out_dir']} is kept; "
             f"try a lower --lr")

def save_checkpoint(config, step, state, data_gen, window, master, filename="ckpt.pt"):
    """Check everything about to be saved, on every process, then write a temporary file and rename it: a kill or a
    full disk mid-save never leaves a torn checkpoint."""
    ckpt = {"script": SCRIPT, "format": CHECKPOINT_FORMAT, "config": config, "step": step, "log_window": window,
            **{group: {name: obj.state_dict() for name, obj in objects.items()} for group, objects in state.items()},
            "rng": {"torch": torch.get_rng_state(), "data": data_gen.get_state(),
                    **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_initialized() else {})}}
    check_finite(ckpt, step, config)
    path = os.path.join(config["out_dir"], filename)
    try:
        if master:
            buffer = io.BytesIO()  # serialised first: torch.save reports a full disk as a RuntimeError, open() clearly
            torch.save(ckpt, buffer)
            with open(path + ".tmp", "wb") as f:
                f.write(buffer.getbuffer())
            os.replace(path + ".tmp", path)
    except OSError as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        fail(f"cannot save {path} ({e.strerror or e}); the previous checkpoint is kept")

def prepare_out_dir(config, step):
    """samples/, config.json, and log.jsonl holding the rows up to `step` (none for a new run)."""
    out_dir, log_path = config["out_dir"], os.path.join(config["out_dir"], "log.jsonl")
    try:
        os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        rows = open(log_path).readlines() if os.path.exists(log_path) else []
        with open(log_path, "w") as f:
            f.writelines(row for row in rows if row.endswith("\n") and json.loads(row)["step"] <= step)
    except OSError as e:
        fail(f"cannot write to --out_dir {out_dir}: {e.strerror or e}")
    return log_path

@torch.no_grad()
def accumulate(window, **values):
    """Add each value's mean to the log window's running sums, and count the step."""
    for name, value in values.items():
        window[name] = window.get(name, 0) + value.detach().float().mean()
    window["steps"] = window.get("steps", 0) + 1

def write_log_row(log_path, step, window, seconds, timed_steps, config):
    """Append the window's means to log.jsonl and print them, with the speed and the time left."""
    row = {"step": step, **{k: float(v) / window["steps"] for k, v in window.items() if k != "steps"},
           "ms_per_step": 1000 * seconds / timed_steps, "images_per_s": timed_steps * config["batch_size"] / seconds}
    if torch.cuda.is_initialized():
        row["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    with open(log_path, "a") as f:
        f.write(json.dumps(row) + "\n")
    left = int(row["ms_per_step"] * (config["max_iters"] - step) / 1000)
    print(f"step {step}/{config['max_iters']} | " + " ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "step")
          + f" | {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d} left", flush=True)

def save_grid(images, path, nrow=6, padding=2):
    """images in [0, 1] (N x C x H x W) -> one RGB PNG, nrow to a row with black padding: the picture torchvision's
    save_image writes, without importing torchvision (about 2 s of every run's start)."""
    from PIL import Image
    n, c, h, w = images.shape
    cols = min(nrow, n)
    grid = images.new_zeros(3 if c == 1 else c, -(-n // cols) * (h + padding) + padding, cols * (w + padding) + padding)
    for k, image in enumerate(images):
        top, left = padding + k // cols * (h + padding), padding + k % cols * (w + padding)
        grid[:, top:top + h, left:left + w] = image
    Image.fromarray(grid.mul(255).add(0.5).clamp(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()).save(path)

def fail(message):
    print(f"{SCRIPT}.py: error: {message}", file=sys.stderr)
    sys.exit(1)

if __name__ == "__main__":
    main()
