"""SRGAN: 16x16 -> 64x64 super-resolution with a U-Net generator and a GAN loss, in one file.

The conditional image synthesis task of CIS 680 (2019) assignment 4. A 64x64
image is downsampled to 16x16 and upsampled back to 64x64 bilinearly, which keeps
the size and loses the detail; an encoder-decoder generator with skip connections
at every resolution (a U-Net: Ronneberger, Fischer, Brox, MICCAI 2015; used as a
conditional GAN generator by Isola et al., "Image-to-Image Translation with
Conditional Adversarial Networks", CVPR 2017) restores it. G is trained with a
pixel reconstruction loss plus a GAN loss (Goodfellow et al., NeurIPS 2014), the
recipe of Ledig et al., "Photo-Realistic Single Image Super-Resolution Using a
Generative Adversarial Network", CVPR 2017. Other GAN losses: least squares
(Mao et al., ICCV 2017), WGAN-GP (Gulrajani et al., NeurIPS 2017), hinge and
spectral normalisation (Miyato et al., ICLR 2018). The sample grids and the
checkpoint's evaluation use an exponential moving average of G's weights.

    python srgan.py                                   # embedded MNIST sample, upscaled to 64x64
    python srgan.py --dataset celeba --max_iters 62500 --sample_interval 12500 --ema_decay 0   # the assignment: 100 epochs of 20k
    python srgan.py --gan_loss wgan-gp --recon mse
    torchrun --nproc_per_node=2 srgan.py              # DistributedDataParallel

Everything the run makes goes to --out_dir: ckpt.pt, samples/step_*.png,
progress_strip.png, triplets.png, log.jsonl, curves.png and config.json.
"""
import argparse
import copy
import json
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

SCRIPT = "srgan"
CHECKPOINT_FORMAT = 1
IMG_SIZE = 64  # the U-Net and the discriminator of the assignment are built for 64x64


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


def degrade(x, config):
    """The low-resolution input: x in [0, 1] (N x C x 64 x 64) -> low_size^2 -> bilinear back to 64x64, in [0, 1].

    --down picks the downsampling filter: bilinear and bicubic are antialiased (a filter as wide as the
    scale factor, as PIL's resize does), area averages each 4x4 block, nearest keeps every 4th pixel (aliased).
    """
    down = config.get("down", "bilinear")
    size = config.get("low_size", 16)
    if down in ("bilinear", "bicubic"):
        low = F.interpolate(x, size=(size, size), mode=down, antialias=True, align_corners=False)
    else:
        low = F.interpolate(x, size=(size, size), mode=down)
    return F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False).clamp(0, 1)


# -----------------------------------------------------------------------------
# Models


def down_block(in_ch, out_ch, norm=True):
    """4x4 stride-2 conv: halves the size (encoder and discriminator layers), [BN], LeakyReLU(0.2)."""
    layers = [nn.Conv2d(in_ch, out_ch, 4, 2, 1, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.LeakyReLU(0.2, True))
    return nn.Sequential(*layers)


def up_block(in_ch, out_ch):
    """4x4 stride-2 padding-1 transposed conv: doubles the size, BN, LeakyReLU(0.2)."""
    return nn.Sequential(nn.ConvTranspose2d(in_ch, out_ch, 4, 2, 1, bias=False), nn.BatchNorm2d(out_ch), nn.LeakyReLU(0.2, True))


class UNetGenerator(nn.Module):
    """Low-resolution image (C x 64 x 64, [-1, 1]) -> restored image (C x 64 x 64, tanh).

    The assignment's decoder table gives its transposed convs kernel 4, padding 0 and no
    stride, which would grow 2 -> 5 -> 8 -> ... and never meet the encoder features; stride 2 and
    padding 1 double the size at each layer, so that decoder layer k meets the encoder feature of its
    resolution. With the handout's widths (--ngf 32) and skip = the encoder output concatenated on channels:

        layer   op                   input                              output          k/s/p
        enc1    conv, BN, LReLU      C x 64 x 64                        32 x 32 x 32    4/2/1
        enc2    conv, BN, LReLU      32 x 32 x 32                       64 x 16 x 16    4/2/1
        enc3    conv, BN, LReLU      64 x 16 x 16                       128 x 8 x 8     4/2/1
        enc4    conv, BN, LReLU      128 x 8 x 8                        256 x 4 x 4     4/2/1
        enc5    conv, BN, LReLU      256 x 4 x 4                        512 x 2 x 2     4/2/1
        dec1    tconv, BN, LReLU     enc5: 512 x 2 x 2                  256 x 4 x 4     4/2/1
        dec2    tconv, BN, LReLU     [dec1, enc4]: (256+256) x 4 x 4    128 x 8 x 8     4/2/1
        dec3    tconv, BN, LReLU     [dec2, enc3]: (128+128) x 8 x 8    64 x 16 x 16    4/2/1
        dec4    tconv, BN, LReLU     [dec3, enc2]: (64+64) x 16 x 16    32 x 32 x 32    4/2/1
        dec5    tconv, BN, LReLU     [dec4, enc1]: (32+32) x 32 x 32    16 x 64 x 64    4/2/1
        out     conv, tanh           [dec5, input]: (16+C) x 64 x 64    C x 64 x 64     3/1/1

    The handout's last layer is a 3x3 padding-1 "transposed conv" with 3 outputs: at stride 1 that is
    a plain 3x3 conv (with the kernel flipped), written here as one; it has C outputs (1 for MNIST).
    Every width scales with --ngf (encoder ngf..16 ngf, decoder 8 ngf..ngf/2).
    """

    def __init__(self, channels, ngf=32):
        super().__init__()
        enc = [ngf, ngf * 2, ngf * 4, ngf * 8, ngf * 16]
        dec = [ngf * 8, ngf * 4, ngf * 2, ngf, ngf // 2]
        self.encoder = nn.ModuleList([down_block(a, b) for a, b in zip([channels] + enc[:-1], enc)])
        dec_in = [enc[4]] + [d + e for d, e in zip(dec[:-1], enc[3::-1])]  # previous decoder output + skip
        self.decoder = nn.ModuleList([up_block(a, b) for a, b in zip(dec_in, dec)])
        self.out = nn.Sequential(nn.Conv2d(dec[-1] + channels, channels, 3, 1, 1), nn.Tanh())

    def forward(self, x):
        skips = []
        h = x
        for layer in self.encoder:
            h = layer(h)
            skips.append(h)
        # skips: enc1 (32 x 32) ... enc5 (2 x 2)
        h = self.decoder[0](skips[-1])
        for layer, skip in zip(self.decoder[1:], reversed(skips[:-1])):
            h = layer(torch.cat([h, skip], 1))
        # (ngf/2) x 64 x 64, then the input image itself joins for the last layer
        return self.out(torch.cat([h, x], 1))


class Discriminator(nn.Module):
    """Image (C x 64 x 64) -> one logit: the assignment's six convs.

        C x 64 x 64 -> 32 x 32 x 32 -> 64 x 16 x 16 -> 128 x 8 x 8 -> 256 x 4 x 4 -> 512 x 2 x 2   (4/2/1, [BN], LReLU)
                    -> 1 x 1 x 1                                                                   (3/2/1)

    The handout's sigmoid lives in the loss (BCE with logits). norm="none" drops the batch norms:
    used with spectral norm (SN-GAN has none) and with WGAN-GP, whose per-sample gradient penalty
    batch norm would mix across the batch (Gulrajani et al. §4).
    """

    def __init__(self, channels, ndf=32, norm="batch"):
        super().__init__()
        widths = [ndf, ndf * 2, ndf * 4, ndf * 8, ndf * 16]
        layers = [down_block(a, b, norm == "batch") for a, b in zip([channels] + widths[:-1], widths)]
        # (ndf*16) x 2 x 2
        layers.append(nn.Conv2d(widths[-1], 1, 3, 2, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x).view(-1)


def init_weights(module):
    """N(0, 0.02) for conv weights, N(1, 0.02) for batch-norm scales (the DCGAN init, also pix2pix's)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_models(config):
    c = config["channels"]
    d_norm = "none" if config["sn"] or config["gan_loss"] == "wgan-gp" else "batch"
    G = UNetGenerator(c, config["ngf"])
    D = Discriminator(c, config["ndf"], d_norm)
    G.apply(init_weights)
    D.apply(init_weights)
    if config["sn"]:
        for m in D.modules():
            if isinstance(m, nn.Conv2d):
                nn.utils.parametrizations.spectral_norm(m)
    return {"G": G, "D": D}


# -----------------------------------------------------------------------------
# Losses. D outputs logits (bce) or scores (lsgan, hinge, wgan-gp).


def discriminator_loss(kind, real, fake):
    if kind == "lsgan":  # E[(D(x) - 1)^2] + E[D(G(y))^2]
        return (real - 1).pow(2).mean() + fake.pow(2).mean()
    if kind == "hinge":  # E[max(0, 1 - D(x))] + E[max(0, 1 + D(G(y)))]
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    if kind == "wgan-gp":  # E[D(G(y))] - E[D(x)]; the gradient penalty is added by the caller
        return fake.mean() - real.mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()  # bce: -E[log D(x)] - E[log(1 - D(G(y)))]


def generator_adv_loss(kind, fake):
    if kind == "lsgan":
        return (fake - 1).pow(2).mean()
    if kind in ("hinge", "wgan-gp"):
        return -fake.mean()
    return F.softplus(-fake).mean()  # bce, non-saturating: -E[log D(G(y))]


def gradient_penalty(D, real, fake):
    """E[(||grad D(x_hat)||_2 - 1)^2] at x_hat = eps x + (1 - eps) G(y), one eps ~ U[0, 1] per sample."""
    eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    grad, = torch.autograd.grad(D(x_hat).float().sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(2, dim=1) - 1).pow(2).mean()


def reconstruction_loss(kind, output, target):
    """Pixel loss between G's output and the ground truth, both in [-1, 1] (so 2x the L1, 4x the MSE of [0, 1] pixels)."""
    return F.mse_loss(output, target) if kind == "mse" else F.l1_loss(output, target)


def discriminator_output(kind, scores):
    """What is logged as D(.): a probability for bce, the raw score for the other losses."""
    return torch.sigmoid(scores) if kind == "bce" else scores


# -----------------------------------------------------------------------------
# Training aids that leave the model as defined: averaging G's weights


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


@torch.no_grad()
def upscale(models, x_low):
    """degrade(x) in [0, 1] -> G's 64x64 output in [0, 1]."""
    return models["G"](x_low * 2 - 1).float().add(1).div(2).clamp(0, 1)


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


def save_progress_strip(path, low, truth, frames, steps):
    """One fixed test input through training, left to right: input | output at each sample step | ground truth."""
    from PIL import Image, ImageDraw  # pillow comes with torchvision
    cells = torch.cat([low[None], torch.stack(frames), truth[None]]).float().cpu()
    grid = make_grid(cells, nrow=len(cells), padding=2, pad_value=1.0)
    grid = grid.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    strip = Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).convert("RGB")
    canvas = Image.new("RGB", (strip.width, strip.height + 14), "white")
    canvas.paste(strip, (0, 14))
    draw = ImageDraw.Draw(canvas)
    cell = cells.shape[-1] + 2
    for i, label in enumerate(["input"] + [f"{s}" for s in steps] + ["truth"]):
        draw.text((2 + i * cell + 2, 1), label, fill="black")
    canvas.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


# -----------------------------------------------------------------------------
# Training


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Train a U-Net super-resolution GAN (16x16 -> 64x64).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--dataset", default="mnist5k",
                   help="folder under --data_dir holding train.npy / test.npy (any size, RGB or grey; resized to 64x64)")
    p.add_argument("--data_dir", default="data", help="where the prepared datasets live")
    p.add_argument("--out_dir", default="out/srgan", help="checkpoint, samples, logs and curves go here")
    p.add_argument("--img_size", type=int, default=IMG_SIZE, help="output size; the networks are built for 64 only")
    p.add_argument("--low_size", type=int, default=16, help="side of the low-resolution image before it is upsampled back")
    p.add_argument("--down", default="bilinear", choices=["bilinear", "bicubic", "area", "nearest"],
                   help="downsampling filter (bilinear/bicubic antialiased); the way back up is always bilinear")
    p.add_argument("--ngf", type=int, default=32, help="generator width: encoder ngf..16ngf, decoder 8ngf..ngf/2 (CIS 680: 32)")
    p.add_argument("--ndf", type=int, default=32, help="discriminator width of its first layer (CIS 680: 32)")
    p.add_argument("--gan_loss", default="bce", choices=["bce", "lsgan", "hinge", "wgan-gp"],
                   help="adversarial loss; wgan-gp drops D's batch norm (the penalty is per sample)")
    p.add_argument("--gp_weight", type=float, default=10.0, help="gradient penalty weight for wgan-gp (Gulrajani et al. 2017)")
    p.add_argument("--sn", action="store_true", help="spectral norm on every D conv (and no batch norm in D; Miyato et al. 2018)")
    p.add_argument("--recon", default="l1", choices=["l1", "mse"], help="pixel reconstruction loss, on [-1, 1] images")
    p.add_argument("--recon_weight", type=float, default=1.0, help="weight of the reconstruction loss in G's loss (CIS 680: 1)")
    p.add_argument("--adv_weight", type=float, default=1.0, help="weight of the adversarial loss in G's loss (0: a plain U-Net regressor)")
    p.add_argument("--batch_size", type=int, default=32, help="images per step, over all processes (CIS 680: 32)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate for both networks")
    p.add_argument("--beta1", type=float, default=0.5, help="Adam beta1")
    p.add_argument("--beta2", type=float, default=0.999, help="Adam beta2")
    p.add_argument("--ema_decay", type=float, default=0.999, help="exponential moving average of G's weights for samples and evaluation (0: off)")
    p.add_argument("--max_iters", type=int, default=1200, help="training iterations (each: one D update, then one G update)")
    p.add_argument("--log_interval", type=int, default=25, help="iterations between log.jsonl lines")
    p.add_argument("--sample_interval", type=int, default=300,
                   help="iterations between sample grids, progress strip, triplets, test MSE (each a log line) and curves.png")
    p.add_argument("--eval_images", type=int, default=1000, help="test images for the test MSE at each sample step (0: all; CIS 680: 1000)")
    p.add_argument("--ckpt_interval", type=int, default=300, help="iterations between checkpoints (one is always written at the end)")
    p.add_argument("--seed", type=int, default=1337, help="random seed")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="autocast dtype; auto: bfloat16 where the device computes it natively (CUDA, CPUs with AVX512-BF16 or AMX), else float32")
    p.add_argument("--compile", action="store_true", help="torch.compile both networks")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue from CKPT (default: --out_dir/ckpt.pt) exactly where it stopped")
    return p.parse_args(argv)


# Flags a resumed run may change; everything else comes from the checkpoint.
RESUMABLE_OVERRIDES = ("max_iters", "lr", "log_interval", "sample_interval", "eval_images", "ckpt_interval",
                       "device", "dtype", "compile", "out_dir", "resume")


def main(argv=None):
    config = vars(get_args(argv))
    device, rank, world = setup_distributed(config["device"])
    ddp, master = world > 1, rank == 0
    ckpt = None
    if config["resume"]:
        ckpt, config = resume_config(config, argv)
    check_positive(config, ["batch_size", "max_iters", "log_interval", "sample_interval", "ckpt_interval", "low_size",
                            "ngf", "ndf", "lr"])
    if config["img_size"] != IMG_SIZE:
        fail(f"--img_size {config['img_size']} is not supported: the U-Net and discriminator of CIS 680 (2019) assignment 4 "
             f"are built for 64x64 (any dataset is resized to 64 when loaded), use --img_size 64")
    if config["low_size"] >= IMG_SIZE:
        fail(f"--low_size {config['low_size']} must be below {IMG_SIZE}")
    if config["ngf"] % 2:
        fail(f"--ngf {config['ngf']} must be even (the last decoder layer has ngf/2 channels)")
    for name in ("eval_images", "gp_weight", "recon_weight", "adv_weight"):
        if config[name] < 0:
            fail(f"--{name} {config[name]} must not be negative")
    for name in ("beta1", "beta2", "ema_decay"):
        if not 0 <= config[name] < 1:
            fail(f"--{name} {config[name]} must be in [0, 1)")
    try:
        train_images, _ = load_images(config["data_dir"], config["dataset"], "train", config["img_size"])
        test_images, _ = load_images(config["data_dir"], config["dataset"], "test", config["img_size"])
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    if len(test_images) and train_images.shape[1] != test_images.shape[1]:
        fail(f"the train and test splits of '{config['dataset']}' have {train_images.shape[1]} and {test_images.shape[1]} channels")
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
    memory_format = torch.channels_last
    data = train_images.to(device)  # uint8 on the device; batches are drawn by index
    test_data = test_images[:config["eval_images"] or None].to(device)
    local_batch = config["batch_size"] // world
    # 12 fixed images, evenly spread over the test split, for the sample grids (the first 10 for triplets.png,
    # the first one for progress_strip.png); an empty test split (prepare.py --test_size 0) lends training images
    shown = test_images if len(test_images) else train_images
    if not len(test_images) and master:
        print(f"{SCRIPT}.py: note: the test split of '{config['dataset']}' is empty: "
              f"the sample grids show training images and no test MSE is logged", flush=True)
    fixed_truth = shown[torch.linspace(0, len(shown) - 1, min(12, len(shown))).long()].to(device).float().div(255)
    fixed_low = degrade(fixed_truth, config)

    torch.manual_seed(config["seed"] + rank)
    models = build_models(config)
    G = models["G"].to(device, memory_format=memory_format)
    D = models["D"].to(device, memory_format=memory_format)
    ema_G = copy.deepcopy(G).eval().requires_grad_(False) if config["ema_decay"] > 0 else None
    opt_G = torch.optim.Adam(G.parameters(), lr=config["lr"], betas=(config["beta1"], config["beta2"]))
    opt_D = torch.optim.Adam(D.parameters(), lr=config["lr"], betas=(config["beta1"], config["beta2"]))
    data_gen = torch.Generator().manual_seed(config["seed"] + 1000 + rank)
    # running sums over the current log window: checkpointed, so a resumed log equals an uninterrupted one
    window = {k: torch.zeros((), device=device) for k in ("loss_D", "loss_G", "recon", "adv", "D_x", "D_G_y")}
    window_steps, step = 0, 0
    progress_frames, progress_steps = [], []  # G's output for the first fixed image at each sample step
    if ckpt is not None:
        G.load_state_dict(ckpt["models"]["G"])
        D.load_state_dict(ckpt["models"]["D"])
        if ema_G is not None:
            ema_G.load_state_dict(ckpt["ema"]["G"])
        opt_G.load_state_dict(ckpt["optimizers"]["G"])
        opt_D.load_state_dict(ckpt["optimizers"]["D"])
        for group in opt_G.param_groups + opt_D.param_groups:
            group["lr"] = config["lr"]
        step = ckpt["step"]
        window = {k: v.to(device) for k, v in ckpt["log_window"]["sums"].items()}
        window_steps = ckpt["log_window"]["steps"]
        progress_steps = list(ckpt["progress"]["steps"])
        progress_frames = [f.to(device).float().div(255) for f in ckpt["progress"]["frames"]]
        if world == 1:  # the saved streams are rank 0's; other ranks keep their own seeds
            torch.set_rng_state(ckpt["rng"]["torch"])
            data_gen.set_state(ckpt["rng"]["data"])
            if device.type == "cuda" and "cuda" in ckpt["rng"]:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    saved_weights = [*G.parameters(), *D.parameters(), *(ema_G.parameters() if ema_G is not None else [])]

    G_train, D_train = (torch.compile(G), torch.compile(D)) if config["compile"] else (G, D)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        G_train, D_train = DDP(G_train), DDP(D_train)
    out_dir = config["out_dir"]
    log_path = prepare_out_dir(config, step) if master else None

    def draw_batch(generator):
        """Training images picked with `generator`: (ground truth, low-resolution input), both in [-1, 1]."""
        idx = torch.randint(0, len(data), (local_batch,), generator=generator).to(device)
        truth = data[idx].float().div(255)
        low = degrade(truth, config)
        return truth.mul(2).sub(1).contiguous(memory_format=memory_format), low.mul(2).sub(1).contiguous(memory_format=memory_format)

    def sample_generator():
        """The generator the grids and the checkpoint's evaluation use: the EMA one, with its own batch-norm statistics."""
        if ema_G is None:
            return G
        picks = torch.Generator().manual_seed(config["seed"])  # fixed inputs, and the training streams stay untouched
        recompute_batchnorm_stats(ema_G, ((draw_batch(picks)[1],) for _ in range(50)))
        return ema_G

    @torch.no_grad()
    def test_mse(generator):
        """MSE in [0, 1] pixels over the test images of G's output and of the bilinear input, each against the truth:
        float32, as evaluate.py computes it."""
        was_training = generator.training
        generator.eval()
        sums = torch.zeros(2, device=device, dtype=torch.float64)
        for i in range(0, len(test_data), 250):
            truth = test_data[i:i + 250].float().div(255)
            low = degrade(truth, config)
            out = upscale({"G": generator}, low)
            sums += torch.stack([(out - truth).pow(2).flatten(1).mean(1).sum(), (low - truth).pow(2).flatten(1).mean(1).sum()]).double()
        generator.train(was_training)
        return (sums / len(test_data)).tolist()

    def save_samples(generator):
        was_training = generator.training
        generator.eval()
        out = upscale({"G": generator}, fixed_low)
        generator.train(was_training)
        # 6x6 grid: each row holds two (input, output, truth) triplets of the fixed images
        triplets = torch.stack([fixed_low, out, fixed_truth], 1)
        save_image(triplets.flatten(0, 1), os.path.join(out_dir, "samples", f"step_{step:06d}.png"), nrow=6, padding=2)
        save_image(triplets[:10].flatten(0, 1), os.path.join(out_dir, "triplets.png"), nrow=3, padding=2)
        progress_frames.append(out[0])
        progress_steps.append(step)
        save_progress_strip(os.path.join(out_dir, "progress_strip.png"), fixed_low[0], fixed_truth[0], progress_frames, progress_steps)

    def checkpoint():
        return {
            "script": SCRIPT, "format": CHECKPOINT_FORMAT, "config": config, "step": step,
            "models": {"G": G.state_dict(), "D": D.state_dict()},
            **({"ema": {"G": ema_G.state_dict()}} if ema_G is not None else {}),
            "optimizers": {"G": opt_G.state_dict(), "D": opt_D.state_dict()},
            "rng": {"torch": torch.get_rng_state(), "data": data_gen.get_state(),
                    **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})},
            "progress": {"steps": progress_steps,
                         "frames": [f.mul(255).round().to(torch.uint8).cpu() for f in progress_frames]},
            "log_window": {"sums": {k: v.cpu() for k, v in window.items()}, "steps": window_steps},
        }

    loss_kind = config["gan_loss"]
    t0, timed_steps = time.perf_counter(), 0  # the timer restarts with the process, the window may not
    while step < config["max_iters"]:
        truth, low = draw_batch(data_gen)
        with autocast:
            fake = G_train(low)  # G's one forward: detached for D's update, with its graph for G's

        # (1) Update D: tell the ground truth from G's output
        with autocast:
            real_scores = D_train(truth).float()
            fake_scores = D_train(fake.detach()).float()
            loss_D = discriminator_loss(loss_kind, real_scores, fake_scores)
            if loss_kind == "wgan-gp":
                loss_D = loss_D + config["gp_weight"] * gradient_penalty(D_train, truth, fake.detach())
        opt_D.zero_grad(set_to_none=True)
        loss_D.backward()
        opt_D.step()

        # (2) Update G: reconstruct the ground truth and make the updated D call its output real
        with autocast:
            adv = generator_adv_loss(loss_kind, D_train(fake).float())
            recon = reconstruction_loss(config["recon"], fake.float(), truth)
            loss_G = config["recon_weight"] * recon + config["adv_weight"] * adv
        opt_G.zero_grad(set_to_none=True)
        loss_G.backward()
        opt_G.step()
        if ema_G is not None:
            update_ema(ema_G, G, min(config["ema_decay"], (1 + step) / (10 + step)))  # short warm-up
        step += 1

        with torch.no_grad():
            window["loss_D"] += loss_D.detach()
            window["loss_G"] += loss_G.detach()
            window["recon"] += recon.detach()
            window["adv"] += adv.detach()
            window["D_x"] += discriminator_output(loss_kind, real_scores).mean()
            window["D_G_y"] += discriminator_output(loss_kind, fake_scores).mean()  # on G's output, in D's update
        window_steps += 1
        timed_steps += 1

        is_last = step == config["max_iters"]
        is_sample = step % config["sample_interval"] == 0 or is_last  # on every process: it also writes a log line
        is_log = step % config["log_interval"] == 0 or is_sample
        is_ckpt = step % config["ckpt_interval"] == 0 or is_last
        if (is_log or is_ckpt) and not all_finite([*window.values(), *saved_weights], ddp):
            fail(f"non-finite loss or weights by step {step}; the last good checkpoint in {out_dir} is kept; try a lower --lr")
        generator = sample_generator() if master and (is_sample or is_ckpt) else None
        if is_log:
            if master:
                seconds = time.perf_counter() - t0
                row = {"step": step, **{k: v.item() / window_steps for k, v in window.items()},
                       "ms_per_step": 1000 * seconds / timed_steps,
                       "images_per_s": timed_steps * config["batch_size"] / seconds}
                if is_sample and len(test_data):
                    row["test_mse"], row["baseline_mse"] = test_mse(generator)
                if device.type == "cuda":
                    row["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                write_log_row(log_path, row, config["max_iters"])
            for v in window.values():
                v.zero_()
            window_steps, timed_steps, t0 = 0, 0, time.perf_counter()
        if master and is_sample:
            save_samples(generator)
            plot_curves(log_path, os.path.join(out_dir, "curves.png"), [("loss_D", "loss_G"), ("recon", "adv"), ("D_x", "D_G_y")])
        if master and is_ckpt:
            try:
                save_checkpoint(checkpoint(), os.path.join(out_dir, "ckpt.pt"))
            except OSError as e:
                fail(e)
    if ddp:
        del G_train, D_train  # DDP reducers must go before their process group, or exit can abort
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
