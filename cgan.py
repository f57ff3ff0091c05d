"""Conditional GANs in one file: ACGAN (a class given to G, an auxiliary classifier
on D) and InfoGAN (latent codes given to G, a Q head on D that recovers them).

Odena, Olah, Shlens, "Conditional Image Synthesis with Auxiliary Classifier
GANs", ICML 2017. Chen, Duan, Houthooft, Schulman, Sutskever, Abbeel,
"InfoGAN: Interpretable Representation Learning by Information Maximizing
Generative Adversarial Nets", NeurIPS 2016. The networks are the DCGAN ones of
dcgan.py (the MNIST DCGAN + FID homework at 32x32, CIS 680 (2019) assignment 4
at 64x64) with the extra input and the extra head of DLCV (2018) HW4
(Problem 3 ACGAN, Bonus InfoGAN).

    python cgan.py                                    # ACGAN on the embedded MNIST sample: one class per digit
    python cgan.py --model infogan                    # InfoGAN: 62 noise + one 10-way code + 2 continuous codes
    python cgan.py --ema_decay 0 --augment none       # the handout's plain training: no weight averaging, no augmentation
    python cgan.py --dataset celeba --img_size 64 --ngf 64 --ndf 64 --attr Smiling --batch_size 64
    python cgan.py --model infogan --dataset celeba --img_size 64 --ngf 64 --ndf 64 --nz 64 --cat_codes 5 --cont_codes 0
    python cgan.py --model infogan --three_optimizers --leaky_slope 0.1   # DLCV HW4's training: G, D and Q optimizers
    torchrun --nproc_per_node=2 cgan.py               # DistributedDataParallel

Everything the run makes goes to --out_dir: ckpt.pt, samples/step_*.png,
log.jsonl, curves.png and config.json.
"""
import argparse
import copy
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

SCRIPT = "cgan"
CHECKPOINT_FORMAT = 1


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


def class_labels(data_dir, dataset, labels, attr):
    """The class id of every image and the class names.

    Digit-style labels (N,) are their own classes; -1 marks an unlabelled image (STL-10's
    unlabeled split), which trains D's source head but not its class head. Attribute labels
    (N x 40 in {0, 1}, named in data/<dataset>/attr_names.json as data/celeba/prepare.py writes
    them) give the two classes "not <attr>" / "<attr>" of the column --attr picks.
    """
    if labels is None:
        raise ValueError(f"'{dataset}' has no labels ({dataset}/train_labels.npy); ACGAN needs them "
                         "(InfoGAN does not: --model infogan)")
    if labels.ndim == 1:
        if attr:
            raise ValueError(f"--attr {attr}: '{dataset}' has one class label per image, not attributes")
        if len(labels) and labels.min() < -1:
            raise ValueError(f"'{dataset}' has label {int(labels.min())}: a label is a class id 0, 1, ... or -1 (unlabelled)")
        if not (labels >= 0).any():
            raise ValueError(f"'{dataset}' has no labelled image (every label is -1); ACGAN needs some "
                             "(InfoGAN does not: --model infogan)")
        return labels, [str(c) for c in range(int(labels.max()) + 1)]
    names_path = os.path.join(data_dir, dataset, "attr_names.json")
    if not attr:
        raise ValueError(f"'{dataset}' has {labels.shape[1]} attributes per image: pick one with --attr (e.g. --attr Smiling)")
    try:
        with open(names_path) as f:
            names = json.load(f)
    except (OSError, ValueError):
        prepare = os.path.join(data_dir, dataset, "prepare.py")
        raise FileNotFoundError(f"--attr needs the attribute names in {names_path}; remake them with: python {prepare}") from None
    if attr not in names:
        raise ValueError(f"--attr {attr} is not an attribute of '{dataset}'; choose from: {', '.join(names)}")
    return labels[:, names.index(attr)], [f"not {attr}", attr]


def real_images(config, split):
    """The checkpoint's data; labels are the class ids the model was conditioned on (None for InfoGAN on unlabelled data)."""
    images, labels = load_images(config["data_dir"], config["dataset"], split, config["img_size"])
    if config["n_classes"] > 0:
        labels, _ = class_labels(config["data_dir"], config["dataset"], labels, config["attr"])
    return images, labels


def to_unit_range(images_uint8):
    """uint8 [0, 255] -> float [-1, 1], the range of the generator's tanh."""
    return images_uint8.float().div(127.5).sub(1.0)


# -----------------------------------------------------------------------------
# The latent input. ACGAN: z = noise (nz), the class is a separate input of G.
# InfoGAN: z = noise (nz) ++ cat_codes one-hot blocks of cat_dim ++ cont_codes values in U(-1, 1).


def code_size(config):
    return config["cat_codes"] * config["cat_dim"] + config["cont_codes"] if config["model"] == "infogan" else 0


def latent_layout(config):
    """The slices of z: [{"name", "kind": "noise" | "categorical" | "continuous", "start", "size"}]."""
    layout = [{"name": "noise", "kind": "noise", "start": 0, "size": config["nz"]}]
    if config["model"] == "infogan":
        start = config["nz"]
        for k in range(config["cat_codes"]):
            layout.append({"name": f"cat{k}", "kind": "categorical", "start": start, "size": config["cat_dim"]})
            start += config["cat_dim"]
        for k in range(config["cont_codes"]):
            layout.append({"name": f"cont{k}", "kind": "continuous", "start": start, "size": 1})
            start += 1
    return layout


def split_codes(z, config):
    """z -> (noise, categorical ids (N, cat_codes) int64, continuous codes (N, cont_codes))."""
    nz, k, d = config["nz"], config["cat_codes"], config["cat_dim"]
    cat = z[:, nz:nz + k * d].reshape(len(z), k, d).argmax(-1)
    return z[:, :nz], cat, z[:, nz + k * d:]


# -----------------------------------------------------------------------------
# Models: the DCGAN networks, G with the class or codes as extra input, D with an extra head


class Generator(nn.Module):
    """(noise ++ codes ++ one-hot class) x 1 x 1 -> image (channels x img_size x img_size) in [-1, 1].

    For img_size 32 (MNIST homework):   in -> (ngf*4) x 4 x 4 -> (ngf*2) x 8 x 8 -> ngf x 16 x 16 -> C x 32 x 32
    For img_size 64 (CIS 680):          in -> (ngf*8) x 4 x 4 -> ... -> ngf x 32 x 32 -> C x 64 x 64
    ACGAN (DLCV HW4 Problem 3): the class enters as a one-hot vector appended to the noise.
    """

    def __init__(self, latent_dim, n_classes, ngf, channels, img_size):
        super().__init__()
        self.n_classes = n_classes
        n_up = int(math.log2(img_size)) - 2  # stride-2 layers after the first 4 x 4 one
        width = ngf * 2 ** (n_up - 1)
        layers = [nn.ConvTranspose2d(latent_dim + n_classes, width, 4, 1, 0, bias=False), nn.BatchNorm2d(width), nn.ReLU(True)]
        # (ngf * 2^(n_up-1)) x 4 x 4
        for _ in range(n_up - 1):
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width // 2), nn.ReLU(True)]
            width //= 2
        # ngf x (img_size/2) x (img_size/2)
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh()]
        # channels x img_size x img_size
        self.net = nn.Sequential(*layers)

    def forward(self, z, labels=None):
        if self.n_classes:
            z = torch.cat([z, F.one_hot(labels, self.n_classes).to(z.dtype)], 1)
        return self.net(z.view(z.shape[0], -1, 1, 1))


class Discriminator(nn.Module):
    """image -> (real/fake logit, auxiliary output), both heads on one shared body.

    Body, for img_size 32: C x 32 x 32 -> ndf x 16 x 16 -> (ndf*2) x 8 x 8 -> (ndf*4) x 4 x 4
    Source head: a 4 x 4 conv to 1 logit, as in dcgan.py.
    ACGAN: the auxiliary head is a 4 x 4 conv to n_classes logits (a linear layer on the body features).
    InfoGAN: the auxiliary head is Q: 4 x 4 conv to 128, BN, LeakyReLU, 1 x 1 conv to the
    categorical logits (cat_codes x cat_dim) ++ the means of the continuous codes (cont_codes).
    slope: of every LeakyReLU, 0.2 in DCGAN (DLCV HW4: 0.1).
    """

    def __init__(self, ndf, channels, img_size, aux_dim, q_hidden=0, slope=0.2):
        super().__init__()
        n_down = int(math.log2(img_size)) - 2
        layers = [nn.Conv2d(channels, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(slope, True)]
        width = ndf
        for _ in range(n_down - 1):
            layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width * 2), nn.LeakyReLU(slope, True)]
            width *= 2
        self.body = nn.Sequential(*layers)
        # width x 4 x 4
        self.source = nn.Conv2d(width, 1, 4, 1, 0, bias=False)
        if q_hidden:
            self.aux = nn.Sequential(nn.Conv2d(width, q_hidden, 4, 1, 0, bias=False), nn.BatchNorm2d(q_hidden),
                                     nn.LeakyReLU(slope, True), nn.Conv2d(q_hidden, aux_dim, 1))
        else:
            self.aux = nn.Conv2d(width, aux_dim, 4, 1, 0)

    def forward(self, x):
        h = self.body(x)
        return self.source(h).view(-1), self.aux(h).flatten(1)


def init_weights(module):
    """N(0, 0.02) for conv and linear weights, N(1, 0.02) for batch-norm scales (Radford et al. 2016)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_models(config):
    c, s = config["channels"], config["img_size"]
    latent_dim = config["nz"] + code_size(config)
    slope = config.get("leaky_slope", 0.2)  # configs older than the flag: the default
    G = Generator(latent_dim, config["n_classes"], config["ngf"], c, s)
    if config["model"] == "acgan":
        D = Discriminator(config["ndf"], c, s, aux_dim=config["n_classes"], slope=slope)
    else:
        D = Discriminator(config["ndf"], c, s, aux_dim=code_size(config), q_hidden=128, slope=slope)
    G.apply(init_weights)
    D.apply(init_weights)
    return {"G": G, "D": D}


def build_optimizers(G, D, config):
    """Adam for G and for D. With --three_optimizers (InfoGAN as DLCV HW4 trains it) D's holds only its
    body and source head, and a third, Q, holds G and the Q head: the information term is minimised by
    that optimizer alone, so it never trains D's body (in the paper's form it does)."""
    def adam(params):
        return torch.optim.Adam(params, lr=config["lr"], betas=(config["beta1"], config["beta2"]))

    if not config.get("three_optimizers"):
        return {"G": adam(G.parameters()), "D": adam(D.parameters())}
    return {"G": adam(G.parameters()), "D": adam([*D.body.parameters(), *D.source.parameters()]),
            "Q": adam([*G.parameters(), *D.aux.parameters()])}


# -----------------------------------------------------------------------------
# Losses. D's source head outputs logits: D(x) = sigmoid(logit).


def gan_discriminator_loss(real_logits, fake_logits):
    """-E[log D(x)] - E[log(1 - D(G(z)))]"""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def gan_generator_loss(fake_logits):
    """The non-saturating -E[log D(G(z))] (the log-D trick)."""
    return F.softplus(-fake_logits).mean()


def labelled_cross_entropy(class_logits, labels):
    """Cross-entropy averaged over the labelled images; label -1 (unlabelled) adds nothing, and a batch without
    labelled images gives 0 rather than the 0 / 0 of F.cross_entropy's mean."""
    labelled = (labels >= 0).sum()
    return F.cross_entropy(class_logits, labels, ignore_index=-1, reduction="sum") / labelled.clamp(min=1)


def acgan_discriminator_loss(real_logits, fake_logits, real_class_logits, fake_class_logits, real_labels, fake_labels):
    """D maximises L_S + L_C (Odena et al. eq. 2-3): the right source, and the right class of real and fake images.

    Unlabelled real images (label -1) count in L_S only; every generated image has the class G was given.
    For a binary attribute the two-way softmax equals DLCV HW4's sigmoid cross-entropy on one logit.
    """
    class_loss = labelled_cross_entropy(real_class_logits, real_labels) + F.cross_entropy(fake_class_logits, fake_labels)
    return gan_discriminator_loss(real_logits, fake_logits) + class_loss


def acgan_generator_loss(fake_logits, fake_class_logits, fake_labels):
    """G maximises L_C - L_S: its fakes classified as the class it was asked for, and taken for real (non-saturating)."""
    return gan_generator_loss(fake_logits) + F.cross_entropy(fake_class_logits, fake_labels)


def info_loss(q_out, z, config):
    """-L_I + H(c): the negative variational lower bound on I(c; G(z, c)) without the constant entropy of c.

    Categorical codes: cross-entropy of Q's logits with the code G was given (weight lambda_cat).
    Continuous codes: Gaussian negative log-likelihood with fixed unit variance, 0.5 (c - mu)^2, up to
    a constant (weight lambda_cont). Summed over codes, averaged over the batch.
    """
    _, cat, cont = split_codes(z, config)
    k, d = config["cat_codes"], config["cat_dim"]
    loss = q_out.new_zeros(())
    if k:
        logits = q_out[:, :k * d].reshape(-1, d)
        loss = loss + config["lambda_cat"] * k * F.cross_entropy(logits, cat.reshape(-1))
    if config["cont_codes"]:
        loss = loss + config["lambda_cont"] * 0.5 * (cont - q_out[:, k * d:]).pow(2).sum(1).mean()
    return loss


def unused(*outputs):
    """0, as a function of network outputs that a loss leaves out. DistributedDataParallel waits for a gradient
    of every parameter of the forward pass, so each head gets one (zero) in every backward pass."""
    return sum(output.sum() * 0 for output in outputs)


def class_accuracy(class_logits, labels):
    """How often the class head names the right class, over the labelled images (0 when a batch has none)."""
    labelled = labels >= 0
    return ((class_logits.argmax(1) == labels) & labelled).sum() / labelled.sum().clamp(min=1)


def code_accuracy(q_out, z, config):
    """How often Q's most likely category is the one G was given (over all categorical codes)."""
    if not config["cat_codes"]:
        return q_out.new_zeros(())
    _, cat, _ = split_codes(z, config)
    k, d = config["cat_codes"], config["cat_dim"]
    return (q_out[:, :k * d].reshape(len(z), k, d).argmax(-1) == cat).float().mean()


# -----------------------------------------------------------------------------
# Training aids that leave the model as defined: augmenting what D sees, and averaging G's weights


def augment_color(x):
    """Random brightness, saturation and contrast, per image (Zhao et al. 2020, DiffAugment)."""
    n = x.shape[0]
    x = x + (torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype) + 0.5) + mean


def augment_translation(x, ratio=0.125):
    """Shift each image by up to ratio * size pixels; the edge pixels fill the gap (the background on digits)."""
    n, c, h, w = x.shape
    shift = int(h * ratio + 0.5)
    dy = torch.randint(-shift, shift + 1, (n, 1, 1), device=x.device)
    dx = torch.randint(-shift, shift + 1, (n, 1, 1), device=x.device)
    rows = (torch.arange(h, device=x.device).view(1, h, 1) - dy).clamp(0, h - 1)
    cols = (torch.arange(w, device=x.device).view(1, 1, w) - dx).clamp(0, w - 1)
    source = (rows * w + cols).view(n, 1, h * w).expand(n, c, h * w)
    return x.reshape(n, c, h * w).gather(2, source).view(n, c, h, w)


def augment_cutout(x, ratio=0.5):
    """Zero a square of ratio * size pixels at a random place in each image; it may hang over the edge."""
    n, _, h, w = x.shape
    size = int(h * ratio + 0.5)
    top = torch.randint(-(size // 2), h - size // 2, (n, 1, 1), device=x.device)
    left = torch.randint(-(size // 2), w - size // 2, (n, 1, 1), device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return x * (~inside).unsqueeze(1).to(x.dtype)


AUGMENTATIONS = {"color": augment_color, "translation": augment_translation, "cutout": augment_cutout}


def diff_augment(x, policy):
    """The same random, differentiable transforms on real and generated images before D sees them
    (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training"): D cannot
    memorise a small training set, and G's gradient passes through the transforms. G never learns
    to produce them: it is judged on augmented fakes against augmented reals."""
    for kind in policy:
        x = AUGMENTATIONS[kind](x)
    return x


def augment_policy(text):
    """'translation,cutout' -> ["translation", "cutout"]; 'none' -> []."""
    policy = [] if text == "none" else text.split(",")
    unknown = [kind for kind in policy if kind not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"--augment {text}: unknown {', '.join(unknown)}; use none or a comma list of {', '.join(AUGMENTATIONS)}")
    return policy


@torch.no_grad()
def update_ema(ema_model, model, decay):
    """ema <- decay * ema + (1 - decay) * weights, for every parameter."""
    for averaged, current in zip(ema_model.parameters(), model.parameters()):
        averaged.lerp_(current, 1 - decay)


@torch.no_grad()
def recompute_batchnorm_stats(model, batches):
    """Averaged weights need batch-norm statistics of their own (those of the trained G do not fit
    them): the plain average over `batches` (each a tuple of the model's inputs), in train mode."""
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
    model.train()
    for inputs in batches:
        model(*inputs)
    model.eval()
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


# -----------------------------------------------------------------------------
# The interface evaluate.py and interpolate.py use (see README "Model interface")


def load_models(ckpt, device):
    """The networks of a checkpoint, in eval mode; G holds the averaged (EMA) weights when the run kept them."""
    if ckpt.get("script") != SCRIPT or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"not a {SCRIPT} checkpoint (script={ckpt.get('script')!r}, format={ckpt.get('format')!r})")
    models = build_models(ckpt["config"])
    for name, model in models.items():
        model.load_state_dict(ckpt.get("ema", {}).get(name, ckpt["models"][name]))
        model.to(device).eval()
    return models


def sample_latent(config, n, device, generator=None):
    """ACGAN: standard normal noise. InfoGAN: noise ++ uniformly drawn one-hot codes ++ U(-1, 1) codes."""
    z = torch.randn(n, config["nz"], device=device, generator=generator)
    if config["model"] != "infogan":
        return z
    cat = torch.randint(0, config["cat_dim"], (n, config["cat_codes"]), device=device, generator=generator)
    onehot = F.one_hot(cat, config["cat_dim"]).float().flatten(1)
    cont = torch.rand(n, config["cont_codes"], device=device, generator=generator) * 2 - 1
    return torch.cat([z, onehot, cont], 1)


def sample_labels(config, n, device, generator=None):
    """ACGAN: the classes G is asked for, uniform as in training. InfoGAN has none: None."""
    if not config["n_classes"]:
        return None
    return torch.randint(0, config["n_classes"], (n,), device=device, generator=generator)


@torch.no_grad()
def generate(models, z, labels=None):
    """Images in [0, 1]. ACGAN: labels are the class ids (int64, (n,)); None gives classes 0, 1, 2, ... in turn."""
    G = models["G"]
    if G.n_classes and labels is None:
        labels = torch.arange(len(z), device=z.device) % G.n_classes
    return G(z, labels).float().add(1).div(2).clamp(0, 1)


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
    p = argparse.ArgumentParser(description="Train a conditional GAN: ACGAN or InfoGAN.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--model", default="acgan", choices=["acgan", "infogan"],
                   help="ACGAN (class-conditional, auxiliary classifier) or InfoGAN (latent codes, Q head)")
    p.add_argument("--dataset", default="mnist5k",
                   help="folder under --data_dir holding train.npy / test.npy (+ *_labels.npy for ACGAN)")
    p.add_argument("--data_dir", default="data", help="where the prepared datasets live")
    p.add_argument("--out_dir", default="out/cgan", help="checkpoint, samples, logs and curves go here")
    p.add_argument("--img_size", type=int, default=32, help="32 (4 layers, MNIST homework) or 64 (5 layers, CIS 680)")
    p.add_argument("--attr", default=None,
                   help="ACGAN on attribute data (celeba): the binary attribute to condition on, e.g. Smiling (DLCV HW4)")
    p.add_argument("--nz", type=int, default=None,
                   help="noise size; default 100 for acgan (DLCV HW4), 62 for infogan (Chen et al., MNIST)")
    p.add_argument("--cat_codes", type=int, default=1, help="InfoGAN: number of categorical codes (DLCV HW4 on CelebA: 5)")
    p.add_argument("--cat_dim", type=int, default=10, help="InfoGAN: categories per categorical code")
    p.add_argument("--cont_codes", type=int, default=2, help="InfoGAN: number of continuous codes, each U(-1, 1)")
    p.add_argument("--lambda_cat", type=float, default=1.0, help="InfoGAN: weight of the information term of the categorical codes")
    p.add_argument("--lambda_cont", type=float, default=1.0,
                   help="InfoGAN: weight of the continuous codes' term (Chen et al. advise a smaller one, e.g. 0.1, on some datasets)")
    p.add_argument("--three_optimizers", action="store_true",
                   help="InfoGAN as DLCV HW4 trains it: D's optimizer on the GAN loss only, G's on the GAN loss, and a third on "
                        "the information term over G and the Q head (not D's body). Default: the paper's form, the term added to "
                        "D's loss and G's")
    p.add_argument("--ngf", type=int, default=32, help="generator width: channels before the output layer (CIS 680: 128)")
    p.add_argument("--ndf", type=int, default=32, help="discriminator width of its first layer")
    p.add_argument("--leaky_slope", type=float, default=0.2,
                   help="negative slope of D's LeakyReLUs, Q head included (Radford et al.: 0.2; DLCV HW4: 0.1)")
    p.add_argument("--batch_size", type=int, default=64, help="images per step, over all processes")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate for both networks")
    p.add_argument("--beta1", type=float, default=0.5, help="Adam beta1")
    p.add_argument("--beta2", type=float, default=0.999, help="Adam beta2")
    p.add_argument("--augment", default="translation,cutout",
                   help="differentiable augmentation of D's inputs, real and fake, for all its heads (Zhao et al. 2020): "
                        "none, or a comma list of color, translation, cutout")
    p.add_argument("--ema_decay", type=float, default=0.999, help="exponential moving average of G's weights for samples and evaluation (0: off)")
    p.add_argument("--max_iters", type=int, default=8000, help="training iterations (each: one D then one G update)")
    p.add_argument("--log_interval", type=int, default=100, help="iterations between log.jsonl lines")
    p.add_argument("--sample_interval", type=int, default=1000, help="iterations between sample grids (and curves.png)")
    p.add_argument("--ckpt_interval", type=int, default=1000, help="iterations between checkpoints (one is always written at the end)")
    p.add_argument("--seed", type=int, default=1337, help="random seed")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="autocast dtype; auto: bfloat16 where the device computes it natively (CUDA, CPUs with AVX512-BF16 or AMX), else float32")
    p.add_argument("--compile", action="store_true", help="torch.compile both networks")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue from CKPT (default: --out_dir/ckpt.pt) exactly where it stopped")
    return p.parse_args(argv)


# Flags a resumed run may change; everything else comes from the checkpoint.
RESUMABLE_OVERRIDES = ("max_iters", "lr", "log_interval", "sample_interval", "ckpt_interval", "device", "dtype", "compile",
                       "out_dir", "resume")


def main(argv=None):
    config = vars(get_args(argv))
    device, rank, world = setup_distributed(config["device"])
    ddp, master = world > 1, rank == 0
    ckpt = None
    if config["resume"]:
        ckpt, config = resume_config(config, argv)
    if config["nz"] is None:
        config["nz"] = 100 if config["model"] == "acgan" else 62
    check_positive(config, ["batch_size", "max_iters", "log_interval", "sample_interval", "ckpt_interval", "nz", "ngf", "ndf",
                            "cat_dim", "lr"])
    for name in ("cat_codes", "cont_codes", "lambda_cat", "lambda_cont"):
        if config[name] < 0:
            fail(f"--{name} {config[name]} must not be negative")
    if config["img_size"] not in (32, 64):
        fail(f"--img_size {config['img_size']} is not supported: use 32 or 64")
    if not 0 <= config["ema_decay"] < 1:
        fail(f"--ema_decay {config['ema_decay']} must be in [0, 1)")
    if config["model"] == "infogan" and config["cat_codes"] + config["cont_codes"] == 0:
        fail("InfoGAN needs at least one code: --cat_codes or --cont_codes")
    if config["three_optimizers"] and config["model"] != "infogan":
        fail("--three_optimizers trains InfoGAN's Q head with an optimizer of its own (DLCV HW4); ACGAN trains with two")
    if not 0 <= config["leaky_slope"] < 1:
        fail(f"--leaky_slope {config['leaky_slope']} must be in [0, 1)")
    if config["model"] == "infogan" and config["attr"]:
        fail(f"--attr {config['attr']} conditions ACGAN on an attribute; InfoGAN learns its codes without labels")
    try:
        policy = augment_policy(config["augment"])
        train_images, train_labels = load_images(config["data_dir"], config["dataset"], "train", config["img_size"])
        if config["model"] == "acgan":
            train_labels, config["class_names"] = class_labels(config["data_dir"], config["dataset"], train_labels, config["attr"])
        else:
            config["class_names"] = []
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    if config["batch_size"] % world:
        fail(f"--batch_size {config['batch_size']} is not divisible by the {world} processes")
    config["n_classes"] = len(config["class_names"])
    config["channels"] = train_images.shape[1]
    acgan = config["n_classes"] > 0
    dtype = resolve_dtype(config["dtype"], device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    # conv layers run faster on N x H x W x C tensors (oneDNN on CPU, tensor cores on CUDA)
    memory_format = torch.channels_last
    data = train_images.to(device)  # uint8 on the device; batches are drawn by index
    labels = train_labels.to(device) if acgan else None
    local_batch = config["batch_size"] // world

    torch.manual_seed(config["seed"] + rank)
    models = build_models(config)
    G = models["G"].to(device, memory_format=memory_format)
    D = models["D"].to(device, memory_format=memory_format)
    ema_G = copy.deepcopy(G).eval().requires_grad_(False) if config["ema_decay"] > 0 else None
    optimizers = build_optimizers(G, D, config)
    opt_G, opt_D, opt_Q = optimizers["G"], optimizers["D"], optimizers.get("Q")
    three = opt_Q is not None
    data_gen = torch.Generator().manual_seed(config["seed"] + 1000 + rank)
    fixed_z = sample_latent(config, 36, "cpu", torch.Generator().manual_seed(config["seed"])).to(device)
    fixed_labels = torch.arange(36, device=device) % config["n_classes"] if acgan else None  # classes 0, 1, 2, ... in reading order
    # logged besides the GAN's: ACGAN: the class head's accuracy on the real batch and on G's fakes (the class G was
    # asked for); InfoGAN: the information term and how often Q recovers the categorical codes
    aux_keys = ("acc_real", "acc_fake") if acgan else ("loss_info", "acc_code")
    # running sums over the current log window: checkpointed, so a resumed log equals an uninterrupted one
    window = {k: torch.zeros((), device=device) for k in ("loss_D", "loss_G", "D_x", "D_G_z1", "D_G_z2", *aux_keys)}
    window_steps, step = 0, 0
    if ckpt is not None:
        G.load_state_dict(ckpt["models"]["G"])
        D.load_state_dict(ckpt["models"]["D"])
        if ema_G is not None:
            ema_G.load_state_dict(ckpt["ema"]["G"])
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(ckpt["optimizers"][name])
            for group in optimizer.param_groups:
                group["lr"] = config["lr"]
        step, fixed_z = ckpt["step"], ckpt["fixed_noise"].to(device)
        window = {k: v.to(device) for k, v in ckpt["log_window"]["sums"].items()}
        window_steps = ckpt["log_window"]["steps"]
        if world == 1:  # the saved streams are rank 0's; other ranks keep their own seeds
            torch.set_rng_state(ckpt["rng"]["torch"])
            data_gen.set_state(ckpt["rng"]["data"])
            if device.type == "cuda" and "cuda" in ckpt["rng"]:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)

    G_train, D_train = (torch.compile(G), torch.compile(D)) if config["compile"] else (G, D)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        G_train, D_train = DDP(G_train), DDP(D_train)
    out_dir = config["out_dir"]
    log_path = prepare_out_dir(config, step) if master else None

    def draw_real_batch():
        idx = torch.randint(0, len(data), (local_batch,), generator=data_gen).to(device)
        return to_unit_range(data[idx]).contiguous(memory_format=memory_format), (labels[idx] if acgan else None)

    def sample_generator():
        """The generator the grids and the checkpoint's evaluation use: the EMA one, with batch-norm statistics of its
        own from latents (and classes) drawn as in training, by a fixed-seed generator that leaves training's untouched."""
        if ema_G is None:
            return G
        g = torch.Generator().manual_seed(config["seed"])
        batches = []
        for _ in range(50):
            z, classes = sample_latent(config, local_batch, "cpu", g), sample_labels(config, local_batch, "cpu", g)
            batches.append((z.to(device), classes.to(device) if acgan else None))
        recompute_batchnorm_stats(ema_G, batches)
        return ema_G

    def save_samples(generator):
        was_training = generator.training
        generator.eval()
        with torch.no_grad():
            grid = generator(fixed_z, fixed_labels).float()
        generator.train(was_training)
        save_image(grid.add(1).div(2), os.path.join(out_dir, "samples", f"step_{step:06d}.png"), nrow=6, padding=2)

    def checkpoint():
        return {
            "script": SCRIPT, "format": CHECKPOINT_FORMAT, "config": config, "step": step,
            "models": {"G": G.state_dict(), "D": D.state_dict()},
            **({"ema": {"G": ema_G.state_dict()}} if ema_G is not None else {}),
            "optimizers": {name: optimizer.state_dict() for name, optimizer in optimizers.items()},
            "rng": {"torch": torch.get_rng_state(), "data": data_gen.get_state(),
                    **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})},
            "fixed_noise": fixed_z.cpu(),
            "log_window": {"sums": {k: v.cpu() for k, v in window.items()}, "steps": window_steps},
        }

    curve_keys = [("loss_D", "loss_G"), ("D_x", "D_G_z1", "D_G_z2"), aux_keys]
    ema_weights = list(ema_G.parameters()) if ema_G is not None else []  # saved too: checked with G's and D's
    t0, timed_steps = time.perf_counter(), 0  # the timer restarts with the process, the window may not
    while step < config["max_iters"]:
        # (1) Update D: the right source of real and fake images, plus (ACGAN) the right class of both, or
        # (InfoGAN) the codes of the fakes: as in Chen et al.'s code, the information term trains Q and the shared body here
        # (with three optimizers, D's loss is the GAN loss alone)
        real, real_labels = draw_real_batch()
        z, fake_labels = sample_latent(config, local_batch, device), sample_labels(config, local_batch, device)
        with autocast:
            fake = G_train(z, fake_labels)  # keeps its graph: G's update reuses these fakes
            real_logits, real_aux = D_train(diff_augment(real, policy))
            fake_logits, fake_aux = D_train(diff_augment(fake.detach(), policy))
            real_logits, real_aux = real_logits.float(), real_aux.float()
            fake_logits, fake_aux = fake_logits.float(), fake_aux.float()
            if acgan:
                loss_D = acgan_discriminator_loss(real_logits, fake_logits, real_aux, fake_aux, real_labels, fake_labels)
            elif three:
                loss_D = gan_discriminator_loss(real_logits, fake_logits) + unused(real_aux, fake_aux)
            else:
                loss_D = gan_discriminator_loss(real_logits, fake_logits) + info_loss(fake_aux, z, config)
        opt_D.zero_grad(set_to_none=True)
        loss_D.backward()
        opt_D.step()

        # (2) Update G: the updated D should take its fakes for real and recognise their class (ACGAN) or codes (InfoGAN)
        with autocast:
            fake_logits_G, fake_aux_G = D_train(diff_augment(fake, policy))
            fake_logits_G, fake_aux_G = fake_logits_G.float(), fake_aux_G.float()
            if acgan:
                loss_G = acgan_generator_loss(fake_logits_G, fake_aux_G, fake_labels)
            elif three:
                loss_G = gan_generator_loss(fake_logits_G) + unused(fake_aux_G)
            else:
                loss_info = info_loss(fake_aux_G, z, config)
                loss_G = gan_generator_loss(fake_logits_G) + loss_info
        opt_G.zero_grad(set_to_none=True)
        loss_G.backward()
        opt_G.step()

        # (3) With three optimizers (DLCV HW4), a third update on the information term alone, of G and the Q head;
        # D's body passes the gradient on but is not stepped. G has just moved, so its fakes are drawn again.
        if three:
            with autocast:
                fake_logits_Q, fake_aux_G = D_train(diff_augment(G_train(z), policy))
                fake_aux_G = fake_aux_G.float()
                loss_info = info_loss(fake_aux_G, z, config)
            opt_Q.zero_grad(set_to_none=True)
            (loss_info + unused(fake_logits_Q)).backward()
            opt_Q.step()
        if ema_G is not None:
            update_ema(ema_G, G, min(config["ema_decay"], (1 + step) / (10 + step)))  # short warm-up
        step += 1

        with torch.no_grad():
            window["loss_D"] += loss_D.detach()
            window["loss_G"] += loss_G.detach()
            window["D_x"] += torch.sigmoid(real_logits).mean()
            window["D_G_z1"] += torch.sigmoid(fake_logits).mean()  # on fakes, in D's update
            window["D_G_z2"] += torch.sigmoid(fake_logits_G).mean()  # after D's update
            if acgan:
                window["acc_real"] += class_accuracy(real_aux, real_labels)
                window["acc_fake"] += class_accuracy(fake_aux_G, fake_labels)
            else:
                window["loss_info"] += loss_info.detach()
                window["acc_code"] += code_accuracy(fake_aux_G, z, config)
        window_steps += 1
        timed_steps += 1

        is_last = step == config["max_iters"]
        is_log = step % config["log_interval"] == 0 or is_last
        is_sample = master and (step % config["sample_interval"] == 0 or is_last)
        is_ckpt = step % config["ckpt_interval"] == 0 or is_last
        if (is_log or is_ckpt) and not all_finite([*window.values(), *G.parameters(), *D.parameters(), *ema_weights], ddp):
            fail(f"non-finite loss or weights by step {step}; the last good checkpoint in {out_dir} is kept; try a lower --lr")
        if is_log:
            if master:
                seconds = time.perf_counter() - t0
                row = {"step": step, **{k: v.item() / window_steps for k, v in window.items()},
                       "ms_per_step": 1000 * seconds / timed_steps,
                       "images_per_s": timed_steps * config["batch_size"] / seconds}
                if device.type == "cuda":
                    row["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                write_log_row(log_path, row, config["max_iters"])
            for v in window.values():
                v.zero_()
            window_steps, timed_steps, t0 = 0, 0, time.perf_counter()
        if master and (is_sample or is_ckpt):
            generator = sample_generator()
            if is_sample:
                save_samples(generator)
                plot_curves(log_path, os.path.join(out_dir, "curves.png"), curve_keys)
            if is_ckpt:
                try:
                    save_checkpoint(checkpoint(), os.path.join(out_dir, "ckpt.pt"))
                except OSError as e:
                    fail(e)
    if ddp:
        del G_train, D_train  # DDP reducers must go before their process group, or exit can abort
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
