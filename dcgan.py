"""DCGAN: deep convolutional generative adversarial networks in one file.

Radford, Metz, Chintala, "Unsupervised Representation Learning with Deep
Convolutional Generative Adversarial Networks", ICLR 2016. The networks follow
the course handouts: 32x32 MNIST with four layers (the MNIST DCGAN + FID
homework) and 64x64 colour images with five layers (CIS 680 (2019)
assignment 4, Table 2: 1024-512-256-128-3, i.e. --ngf 128). --depth builds
CSI5340 assignment 4's modules instead, 1 to 5 blocks deep.

    python dcgan.py                                   # embedded MNIST sample, 32x32
    python dcgan.py --dataset stl10 --img_size 64 --ngf 128 --ndf 128
    python dcgan.py --depth 5 --loss sigmoid_mse --lr 3e-4      # CSI5340 assignment 4's GAN, 1 to 5 blocks deep
    python dcgan.py --leaky_slope 0.1 --g_steps 2               # DLCV HW4's discriminator slope and update ratio
    torchrun --nproc_per_node=2 dcgan.py              # DistributedDataParallel

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

SCRIPT = "dcgan"
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


def real_images(config, split):
    return load_images(config["data_dir"], config["dataset"], split, config["img_size"])


def to_unit_range(images_uint8):
    """uint8 [0, 255] -> float [-1, 1], the range of the generator's tanh."""
    return images_uint8.float().div(127.5).sub(1.0)


# -----------------------------------------------------------------------------
# Models


def upsample_block(in_ch, out_ch, mode):
    """Double the spatial size: a strided transposed conv, or resize then 3x3 conv (Odena et al. 2016, "Deconvolution and Checkerboard Artifacts")."""
    if mode == "convtranspose":
        return nn.ConvTranspose2d(in_ch, out_ch, 4, 2, 1, bias=False)
    align = dict(align_corners=False) if mode == "bilinear" else {}
    return nn.Sequential(nn.Upsample(scale_factor=2, mode=mode, **align), nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False))


class Generator(nn.Module):
    """z (nz x 1 x 1) -> image (channels x img_size x img_size) in [-1, 1].

    depth blocks of transposed conv, batch norm and ReLU, then a transposed conv to the image and a tanh
    (CSI5340 assignment 4's generator module). The first block turns z into a start x start map,
    start = img_size / 2^depth; each later layer doubles the resolution and halves the width. The
    default depth, log2(img_size) - 2, gives the DCGAN tables:
    For img_size 32 (MNIST homework, depth 3):   nz -> (ngf*4) x 4 x 4 -> (ngf*2) x 8 x 8 -> ngf x 16 x 16 -> C x 32 x 32
    For img_size 64 (CIS 680, depth 4):          nz -> (ngf*8) x 4 x 4 -> ... -> ngf x 32 x 32 -> C x 64 x 64
    """

    def __init__(self, nz, ngf, channels, img_size, upsample="convtranspose", depth=None):
        super().__init__()
        depth = depth or int(math.log2(img_size)) - 2
        start = img_size // 2 ** depth
        width = ngf * 2 ** (depth - 1)
        layers = [nn.ConvTranspose2d(nz, width, start, 1, 0, bias=False), nn.BatchNorm2d(width), nn.ReLU(True)]
        # (ngf * 2^(depth-1)) x start x start
        for _ in range(depth - 1):
            layers += [upsample_block(width, width // 2, upsample), nn.BatchNorm2d(width // 2), nn.ReLU(True)]
            width //= 2
        # ngf x (img_size/2) x (img_size/2)
        layers += [upsample_block(width, channels, upsample), nn.Tanh()]
        # channels x img_size x img_size
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z.view(z.shape[0], -1, 1, 1))


def strided_convs(channels, ndf, n_layers, slope):
    """D's body: a 4x4 stride-2 conv + LeakyReLU (no batch norm on the input layer), then n_layers - 1 blocks of
    conv + batch norm + LeakyReLU, each halving the resolution and doubling the width. -> (layers, last width)"""
    layers = [nn.Conv2d(channels, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(slope, True)]
    width = ndf
    for _ in range(n_layers - 1):
        layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width * 2), nn.LeakyReLU(slope, True)]
        width *= 2
    return layers, width


class Discriminator(nn.Module):
    """image -> one logit: the generator mirrored, LeakyReLU (slope 0.2; DLCV HW4: 0.1), no batch norm on the input layer.

    For img_size 64: C x 64 x 64 -> ndf x 32 x 32 -> (ndf*2) x 16 x 16 -> (ndf*4) x 8 x 8 -> (ndf*8) x 4 x 4 -> 1
    The handouts' final sigmoid lives in the loss (BCE with logits), which is the numerically stable form.
    """

    def __init__(self, ndf, channels, img_size, slope=0.2):
        super().__init__()
        layers, width = strided_convs(channels, ndf, int(math.log2(img_size)) - 2, slope)
        # width x 4 x 4
        layers += [nn.Conv2d(width, 1, 4, 1, 0, bias=False)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x).view(-1)


class DepthDiscriminator(nn.Module):
    """image -> one logit: CSI5340 assignment 4's discriminator module, of depth 1 to 5.

    conv + LeakyReLU, depth - 1 blocks of conv + batch norm + LeakyReLU, conv + LeakyReLU, then a linear
    layer to one output. The first depth convs are the DCGAN discriminator's strided 4x4 ones, so the
    network mirrors the generator of the same depth; the last conv takes the start x start map to 1 x 1.
    For img_size 32, depth 3: C x 32 x 32 -> ndf x 16 x 16 -> (ndf*2) x 8 x 8 -> (ndf*4) x 4 x 4 -> (ndf*4) x 1 x 1 -> 1
    The handout's sigmoid after the linear layer lives in the loss, as in Discriminator.
    """

    def __init__(self, ndf, channels, img_size, depth, slope=0.2):
        super().__init__()
        layers, width = strided_convs(channels, ndf, depth, slope)
        # (ndf * 2^(depth-1)) x start x start, start = img_size / 2^depth
        start = img_size // 2 ** depth
        layers += [nn.Conv2d(width, width, start, 1, 0, bias=False), nn.LeakyReLU(slope, True), nn.Flatten()]
        # width x 1 x 1, flattened
        layers += [nn.Linear(width, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x).view(-1)


class MLPGenerator(nn.Module):
    """The fully connected baseline (the MNIST homework's bonus question): nz -> 4ngf -> 8ngf -> 16ngf -> C*H*W."""

    def __init__(self, nz, ngf, channels, img_size):
        super().__init__()
        self.shape = (channels, img_size, img_size)
        widths = [nz, ngf * 4, ngf * 8, ngf * 16]
        layers = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(True)]
        layers += [nn.Linear(widths[-1], channels * img_size * img_size), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z.view(z.shape[0], -1)).view(-1, *self.shape)


class MLPDiscriminator(nn.Module):
    """C*H*W -> 8ndf -> 4ndf -> 1 logit."""

    def __init__(self, ndf, channels, img_size, slope=0.2):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * img_size * img_size, ndf * 8), nn.LeakyReLU(slope, True),
            nn.Linear(ndf * 8, ndf * 4), nn.LeakyReLU(slope, True),
            nn.Linear(ndf * 4, 1),
        )

    def forward(self, x):
        return self.net(x).view(-1)


def init_weights(module):
    """N(0, 0.02) for conv and linear weights, N(1, 0.02) for batch-norm scales (Radford et al. §4)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_models(config):
    c, s = config["channels"], config["img_size"]
    depth, slope = config.get("depth"), config.get("leaky_slope", 0.2)  # configs older than these flags: the defaults
    if config["arch"] == "mlp":
        G = MLPGenerator(config["nz"], config["ngf"], c, s)
        D = MLPDiscriminator(config["ndf"], c, s, slope)
    elif depth:
        G = Generator(config["nz"], config["ngf"], c, s, config["upsample"], depth)
        D = DepthDiscriminator(config["ndf"], c, s, depth, slope)
    else:
        G = Generator(config["nz"], config["ngf"], c, s, config["upsample"])
        D = Discriminator(config["ndf"], c, s, slope)
    G.apply(init_weights)
    D.apply(init_weights)
    return {"G": G, "D": D}


# -----------------------------------------------------------------------------
# Losses. D outputs logits; D(x) = sigmoid(logit) for the BCE losses.


def discriminator_loss(kind, real_logits, fake_logits):
    if kind == "lsgan":  # Mao et al. 2017: E[(D(x) - 1)^2] + E[D(G(z))^2]
        return (real_logits - 1).pow(2).mean() + fake_logits.pow(2).mean()
    if kind == "sigmoid_mse":  # CSI5340 assignment 4: (mse(D(G(z)), 0) + mse(D(x), 1)) / 2, D(.) after the sigmoid
        return (torch.sigmoid(fake_logits).pow(2).mean() + (torch.sigmoid(real_logits) - 1).pow(2).mean()) / 2
    # -E[log D(x)] - E[log(1 - D(G(z)))], the same for minimax and non-saturating
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(kind, fake_logits):
    if kind == "lsgan":
        return (fake_logits - 1).pow(2).mean()
    if kind == "sigmoid_mse":  # CSI5340 assignment 4: mse(D(G(z)), 1)
        return (torch.sigmoid(fake_logits) - 1).pow(2).mean()
    if kind == "minimax":  # minimise E[log(1 - D(G(z)))]: saturates when D wins
        return -F.softplus(fake_logits).mean()
    return F.softplus(-fake_logits).mean()  # non-saturating: minimise -E[log D(G(z))] (the log-D trick)


def discriminator_output(kind, logits):
    """What is logged as D(.): a probability for the BCE losses, the raw score for LSGAN."""
    return logits if kind == "lsgan" else torch.sigmoid(logits)


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
    return torch.randn(n, config["nz"], device=device, generator=generator)


@torch.no_grad()
def generate(models, z, labels=None):
    return models["G"](z).float().add(1).div(2).clamp(0, 1)


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
    p = argparse.ArgumentParser(description="Train a DCGAN.", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--dataset", default="mnist5k", help="folder under --data_dir holding train.npy / test.npy")
    p.add_argument("--data_dir", default="data", help="where the prepared datasets live")
    p.add_argument("--out_dir", default="out/dcgan", help="checkpoint, samples, logs and curves go here")
    p.add_argument("--img_size", type=int, default=32, help="32 (4 layers, MNIST homework) or 64 (5 layers, CIS 680); with --depth, a multiple of 2^depth; any size for --arch mlp")
    p.add_argument("--arch", default="conv", choices=["conv", "mlp"], help="convolutional DCGAN or the fully connected baseline")
    p.add_argument("--depth", type=int, default=None, choices=range(1, 6), metavar="{1,...,5}",
                   help="CSI5340 assignment 4's networks of configurable depth: G has depth (transposed conv, BN, ReLU) blocks "
                        "before its output layer; D is conv + LeakyReLU, depth-1 (conv, BN, LeakyReLU) blocks, conv + LeakyReLU, "
                        "linear; --img_size a multiple of 2^depth. Unset: the DCGAN tables (G of depth 3 at 32x32, 4 at 64x64)")
    p.add_argument("--nz", type=int, default=100, help="latent size")
    p.add_argument("--ngf", type=int, default=32, help="generator width: channels before the output layer (CIS 680: 128)")
    p.add_argument("--ndf", type=int, default=32, help="discriminator width of its first layer")
    p.add_argument("--leaky_slope", type=float, default=0.2,
                   help="negative slope of D's LeakyReLUs (Radford et al.: 0.2; DLCV HW4: 0.1)")
    p.add_argument("--upsample", default="convtranspose", choices=["convtranspose", "nearest", "bilinear"],
                   help="how G doubles resolution: transposed conv, or resize then 3x3 conv (Odena et al. 2016)")
    p.add_argument("--loss", default="nonsaturating", choices=["nonsaturating", "minimax", "lsgan", "sigmoid_mse"],
                   help="GAN loss: non-saturating (the log-D trick), minimax (Goodfellow et al. 2014 eq. 1), least squares on D's raw "
                        "score (Mao et al. 2017), or least squares on D's sigmoid output, D's loss halved (CSI5340 assignment 4)")
    p.add_argument("--batch_size", type=int, default=64, help="images per D step, over all processes (the handouts: 128)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate for both networks")
    p.add_argument("--beta1", type=float, default=0.5, help="Adam beta1")
    p.add_argument("--beta2", type=float, default=0.999, help="Adam beta2")
    p.add_argument("--d_steps", type=int, default=1, help="D updates per iteration")
    p.add_argument("--g_steps", type=int, default=1, help="G updates per iteration")
    p.add_argument("--augment", default="translation,cutout",
                   help="differentiable augmentation of D's inputs, real and fake (Zhao et al. 2020): none, or a comma list of color, translation, cutout")
    p.add_argument("--ema_decay", type=float, default=0.999, help="exponential moving average of G's weights for samples and evaluation (0: off)")
    p.add_argument("--max_iters", type=int, default=10000, help="training iterations (each: d_steps D then g_steps G updates)")
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
    check_positive(config, ["batch_size", "max_iters", "log_interval", "sample_interval", "ckpt_interval", "nz", "ngf", "ndf",
                            "d_steps", "g_steps", "lr"])
    depth = config["depth"]
    if depth and config["arch"] == "mlp":
        fail(f"--depth {depth} sets the depth of the conv networks; --arch mlp has its own fixed layers")
    if depth and config["img_size"] % 2 ** depth:
        fail(f"--img_size {config['img_size']} is not supported with --depth {depth}: use a multiple of 2^depth = {2 ** depth}")
    if not depth and config["arch"] == "conv" and config["img_size"] not in (32, 64):
        fail(f"--img_size {config['img_size']} is not supported by the conv DCGAN: use 32 or 64 (or --arch mlp, or --depth)")
    if not 0 <= config["leaky_slope"] < 1:
        fail(f"--leaky_slope {config['leaky_slope']} must be in [0, 1)")
    if not 0 <= config["ema_decay"] < 1:
        fail(f"--ema_decay {config['ema_decay']} must be in [0, 1)")
    try:
        policy = augment_policy(config["augment"])
        train_images, _ = load_images(config["data_dir"], config["dataset"], "train", config["img_size"])
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
    memory_format = torch.channels_last if config["arch"] == "conv" else torch.contiguous_format
    data = train_images.to(device)  # uint8 on the device; batches are drawn by index
    local_batch = config["batch_size"] // world

    torch.manual_seed(config["seed"] + rank)
    models = build_models(config)
    G = models["G"].to(device, memory_format=memory_format)
    D = models["D"].to(device, memory_format=memory_format)
    opt_G = torch.optim.Adam(G.parameters(), lr=config["lr"], betas=(config["beta1"], config["beta2"]))
    opt_D = torch.optim.Adam(D.parameters(), lr=config["lr"], betas=(config["beta1"], config["beta2"]))
    data_gen = torch.Generator().manual_seed(config["seed"] + 1000 + rank)
    fixed_noise = torch.randn(36, config["nz"], generator=torch.Generator().manual_seed(config["seed"])).to(device)
    # running sums over the current log window: checkpointed, so a resumed log equals an uninterrupted one
    window = {k: torch.zeros((), device=device) for k in ("loss_D", "loss_G", "D_x", "D_G_z1", "D_G_z2")}
    window_steps, step = 0, 0
    if ckpt is not None:
        G.load_state_dict(ckpt["models"]["G"])
        D.load_state_dict(ckpt["models"]["D"])
        opt_G.load_state_dict(ckpt["optimizers"]["G"])
        opt_D.load_state_dict(ckpt["optimizers"]["D"])
        for group in opt_G.param_groups + opt_D.param_groups:
            group["lr"] = config["lr"]
        step, fixed_noise = ckpt["step"], ckpt["fixed_noise"].to(device)
        if "log_window" in ckpt:
            window = {k: v.to(device) for k, v in ckpt["log_window"]["sums"].items()}
            window_steps = ckpt["log_window"]["steps"]
        if world == 1:  # the saved streams are rank 0's; other ranks keep their own seeds
            torch.set_rng_state(ckpt["rng"]["torch"])
            data_gen.set_state(ckpt["rng"]["data"])
            if device.type == "cuda" and "cuda" in ckpt["rng"]:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)

    ema_G = None
    if config["ema_decay"] > 0:
        ema_G = copy.deepcopy(G).eval().requires_grad_(False)
        if ckpt is not None and "ema" in ckpt:
            ema_G.load_state_dict(ckpt["ema"]["G"])

    G_train, D_train = (torch.compile(G), torch.compile(D)) if config["compile"] else (G, D)
    D_judge = D_train  # D as G's update uses it: outside DDP, since D's weights get no gradient there
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        G_train, D_train = DDP(G_train), DDP(D_train)
    out_dir = config["out_dir"]
    log_path = prepare_out_dir(config, step) if master else None

    def draw_real_batch():
        idx = torch.randint(0, len(data), (local_batch,), generator=data_gen).to(device)
        return to_unit_range(data[idx]).contiguous(memory_format=memory_format)

    def sample_generator():
        """The generator the grids and the checkpoint's evaluation use: the EMA one, with its own batch-norm statistics."""
        if ema_G is None:
            return G
        latents = torch.randn(50, local_batch, config["nz"], generator=torch.Generator().manual_seed(config["seed"]))
        recompute_batchnorm_stats(ema_G, [(z,) for z in latents.to(device)])
        return ema_G

    def save_samples(generator):
        was_training = generator.training
        generator.eval()
        with torch.no_grad():
            grid = generator(fixed_noise).float()
        generator.train(was_training)
        save_image(grid.add(1).div(2), os.path.join(out_dir, "samples", f"step_{step:06d}.png"), nrow=6, padding=2)

    def checkpoint():
        return {
            "script": SCRIPT, "format": CHECKPOINT_FORMAT, "config": config, "step": step,
            "models": {"G": G.state_dict(), "D": D.state_dict()},
            **({"ema": {"G": ema_G.state_dict()}} if ema_G is not None else {}),
            "optimizers": {"G": opt_G.state_dict(), "D": opt_D.state_dict()},
            "rng": {"torch": torch.get_rng_state(), "data": data_gen.get_state(),
                    **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})},
            "fixed_noise": fixed_noise.cpu(),
            "log_window": {"sums": {k: v.cpu() for k, v in window.items()}, "steps": window_steps},
        }

    loss_kind, nz = config["loss"], config["nz"]
    t0, timed_steps = time.perf_counter(), 0  # the timer restarts with the process, the window may not
    while step < config["max_iters"]:
        # (1) Update D: maximise log D(x) + log(1 - D(G(z))) (or the least-squares form)
        for d_step in range(config["d_steps"]):
            real = draw_real_batch()
            z = torch.randn(local_batch, nz, device=device)
            reuse = d_step == config["d_steps"] - 1  # the last fakes keep their graph for G's first update
            with autocast, torch.set_grad_enabled(reuse):
                fake = G_train(z)
            with autocast:
                real_logits = D_train(diff_augment(real, policy)).float()
                fake_logits = D_train(diff_augment(fake.detach(), policy)).float()
                loss_D = discriminator_loss(loss_kind, real_logits, fake_logits)
            opt_D.zero_grad(set_to_none=True)
            loss_D.backward()
            opt_D.step()

        # (2) Update G: make the updated D call its fakes real
        D.requires_grad_(False)  # the gradient flows through D to G; D's own weight gradients would be wasted work
        for g_step in range(config["g_steps"]):
            if g_step > 0:
                with autocast:
                    fake = G_train(torch.randn(local_batch, nz, device=device))
            with autocast:
                fake_logits_G = D_judge(diff_augment(fake, policy)).float()
                loss_G = generator_loss(loss_kind, fake_logits_G)
            opt_G.zero_grad(set_to_none=True)
            loss_G.backward()
            opt_G.step()
        D.requires_grad_(True)
        if ema_G is not None:
            update_ema(ema_G, G, min(config["ema_decay"], (1 + step) / (10 + step)))  # short warm-up
        step += 1

        with torch.no_grad():
            window["loss_D"] += loss_D.detach()
            window["loss_G"] += loss_G.detach()
            window["D_x"] += discriminator_output(loss_kind, real_logits).mean()
            window["D_G_z1"] += discriminator_output(loss_kind, fake_logits).mean()  # on fakes, in D's update
            window["D_G_z2"] += discriminator_output(loss_kind, fake_logits_G).mean()  # after D's update
        window_steps += 1
        timed_steps += 1

        is_last = step == config["max_iters"]
        is_log = step % config["log_interval"] == 0 or is_last
        is_sample = master and (step % config["sample_interval"] == 0 or is_last)
        is_ckpt = step % config["ckpt_interval"] == 0 or is_last
        if (is_log or is_ckpt) and not all_finite([*window.values(), *G.parameters(), *D.parameters(),
                                                    *(ema_G.parameters() if ema_G is not None else [])], ddp):
            fail(f"non-finite loss or weights by step {step}; the last good checkpoint in {out_dir} is kept; try a lower --lr")
        if is_log:
            if master:
                seconds = time.perf_counter() - t0
                row = {"step": step, **{k: v.item() / window_steps for k, v in window.items()},
                       "ms_per_step": 1000 * seconds / timed_steps,
                       "images_per_s": timed_steps * config["batch_size"] * config["d_steps"] / seconds}
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
                plot_curves(log_path, os.path.join(out_dir, "curves.png"), [("loss_D", "loss_G"), ("D_x", "D_G_z1", "D_G_z2")])
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
