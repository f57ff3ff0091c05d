"""SRGAN: 16x16 -> 64x64 super-resolution with a U-Net generator and a GAN loss, in one file.

The conditional image synthesis task of the course handout (seed 000 §3). A 64x64
image is downsampled to 16x16 and upsampled back to 64x64 bilinearly, which keeps
the size and loses the detail; an encoder-decoder generator with skip connections
at every resolution (a U-Net: Ronneberger, Fischer, Brox, MICCAI 2015; used as a
conditional GAN generator by Isola et al., "Image-to-Image Translation with
Conditional Adversarial Networks", CVPR 2017) restores it. G is trained with a
pixel reconstruction loss plus a GAN loss (Goodfellow et al., NeurIPS 2014), the
recipe of Ledig et al., "Photo-Realistic Single Image Super-Resolution Using a
Generative Adversarial Network", CVPR 2017. Other GAN losses: least squares
(Mao et al., ICCV 2017), WGAN-GP (Gulrajani et al., NeurIPS 2017), hinge and
spectral normalisation (Miyato et al., ICLR 2018).

    python srgan.py                                   # embedded MNIST sample, upscaled to 64x64
    python srgan.py --dataset celeba --max_iters 62500 --sample_interval 12500   # the handout: 100 epochs of 20k
    python srgan.py --gan_loss wgan-gp --recon mse
    torchrun --nproc_per_node=2 srgan.py              # DistributedDataParallel

Everything the run makes goes to --out_dir: ckpt.pt, samples/step_*.png,
progress_strip.png, triplets.png, log.jsonl, curves.png and config.json.
"""
import argparse
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
IMG_SIZE = 64  # the U-Net and the discriminator are built for 64x64 (seed 000 §3)


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


def to_unit_range(images_uint8):
    """uint8 [0, 255] -> float [-1, 1], the range of the generator's tanh."""
    return images_uint8.float().div(127.5).sub(1.0)


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

    The handout's decoder table (seed 000 §3.1) gives its transposed convs kernel 4, padding 0 and no
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
    """Image (C x 64 x 64) -> one logit: the handout's six convs (seed 000 §3.1).

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
# The interface evaluate.py and interpolate.py use (see README "Model interface")


def load_models(ckpt, device):
    if ckpt.get("script") != SCRIPT or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"not a {SCRIPT} checkpoint (script={ckpt.get('script')!r}, format={ckpt.get('format')!r})")
    models = build_models(ckpt["config"])
    for name, model in models.items():
        model.load_state_dict(ckpt["models"][name])
        model.to(device).eval()
    return models


@torch.no_grad()
def upscale(models, x_low):
    """degrade(x) in [0, 1] -> G's 64x64 output in [0, 1]."""
    return models["G"](x_low * 2 - 1).float().add(1).div(2).clamp(0, 1)


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
        for key in group:
            have = [r for r in rows if key in r]  # test_mse is only in the rows of sample steps
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
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="mnist5k",
                   help="folder under --data_dir holding train.npy / test.npy (any size, RGB or grey; resized to 64x64)")
    p.add_argument("--data_dir", default="data", help="where the prepared datasets live")
    p.add_argument("--out_dir", default="out/srgan", help="checkpoint, samples, logs and curves go here")
    p.add_argument("--img_size", type=int, default=IMG_SIZE, help="output size; the networks are built for 64 only")
    p.add_argument("--low_size", type=int, default=16, help="side of the low-resolution image before it is upsampled back")
    p.add_argument("--down", default="bilinear", choices=["bilinear", "bicubic", "area", "nearest"],
                   help="downsampling filter (bilinear/bicubic antialiased); the way back up is always bilinear")
    p.add_argument("--ngf", type=int, default=32, help="generator width: encoder ngf..16ngf, decoder 8ngf..ngf/2 (handout: 32)")
    p.add_argument("--ndf", type=int, default=32, help="discriminator width of its first layer (handout: 32)")
    p.add_argument("--gan_loss", default="bce", choices=["bce", "lsgan", "hinge", "wgan-gp"],
                   help="adversarial loss; wgan-gp drops D's batch norm (the penalty is per sample)")
    p.add_argument("--gp_weight", type=float, default=10.0, help="gradient penalty weight for wgan-gp")
    p.add_argument("--sn", action="store_true", help="spectral norm on every D conv (and no batch norm in D)")
    p.add_argument("--recon", default="l1", choices=["l1", "mse"], help="pixel reconstruction loss, on [-1, 1] images")
    p.add_argument("--recon_weight", type=float, default=1.0, help="weight of the reconstruction loss in G's loss")
    p.add_argument("--adv_weight", type=float, default=1.0, help="weight of the adversarial loss in G's loss (0: a plain U-Net regressor)")
    p.add_argument("--batch_size", type=int, default=32, help="images per step, over all processes")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate for both networks")
    p.add_argument("--beta1", type=float, default=0.5, help="Adam beta1")
    p.add_argument("--beta2", type=float, default=0.999, help="Adam beta2")
    p.add_argument("--max_iters", type=int, default=800, help="training iterations (each: one D update, then one G update)")
    p.add_argument("--log_interval", type=int, default=25, help="iterations between log.jsonl lines")
    p.add_argument("--sample_interval", type=int, default=160,
                   help="iterations between sample grids, progress strip, triplets, test MSE and curves.png")
    p.add_argument("--eval_images", type=int, default=1000, help="test images for the test MSE at each sample step (0: all)")
    p.add_argument("--ckpt_interval", type=int, default=400, help="iterations between checkpoints (one is always written at the end)")
    p.add_argument("--seed", type=int, default=1337, help="random seed")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="autocast dtype; auto: bfloat16 on CUDA, else float32")
    p.add_argument("--compile", action="store_true", help="torch.compile both networks")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue from CKPT (default: --out_dir/ckpt.pt) exactly where it stopped")
    return p, p.parse_args(argv)


# Flags a resumed run may change; everything else comes from the checkpoint.
RESUMABLE_OVERRIDES = ("max_iters", "lr", "log_interval", "sample_interval", "eval_images", "ckpt_interval",
                       "device", "dtype", "compile", "out_dir")


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

    if config["img_size"] != IMG_SIZE:
        fail(f"--img_size {config['img_size']} is not supported: the U-Net and discriminator of seed 000 §3 are built "
             f"for 64x64 (any dataset is resized to 64 when loaded), use --img_size 64")
    if not 1 <= config["low_size"] < IMG_SIZE:
        fail(f"--low_size {config['low_size']} must be between 1 and {IMG_SIZE - 1}")
    if config["ngf"] < 2 or config["ngf"] % 2:
        fail(f"--ngf {config['ngf']} must be an even number >= 2 (the last decoder layer has ngf/2 channels)")
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
        test_images, _ = load_images(config["data_dir"], config["dataset"], "test", config["img_size"])
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    if train_images.shape[1] != test_images.shape[1]:
        fail(f"the train and test splits of '{config['dataset']}' have {train_images.shape[1]} and {test_images.shape[1]} channels")
    config["channels"] = train_images.shape[1]
    if config["batch_size"] % world:
        fail(f"--batch_size {config['batch_size']} is not divisible by the {world} processes")
    local_batch = config["batch_size"] // world
    data = train_images.to(device)  # uint8 on the device; batches are drawn by index
    if config["eval_images"] > 0:
        test_images = test_images[:config["eval_images"]]
    test_data = test_images.to(device)

    torch.manual_seed(config["seed"] + rank)
    models = build_models(config)
    # G in channels-last memory runs about a fifth faster on CPU (oneDNN); D, five times smaller, gains little
    G, D = models["G"].to(device, memory_format=torch.channels_last), models["D"].to(device)
    betas = (config["beta1"], config["beta2"])
    opt_G = torch.optim.Adam(G.parameters(), lr=config["lr"], betas=betas)
    opt_D = torch.optim.Adam(D.parameters(), lr=config["lr"], betas=betas)
    data_gen = torch.Generator().manual_seed(config["seed"] + 1000 + rank)
    # fixed test inputs, evenly spread over the split: 12 for the sample grids, the first 10 for triplets.png,
    # the first one for progress_strip.png
    fixed_truth = test_data[torch.linspace(0, len(test_data) - 1, min(12, len(test_data))).long()].float().div(255)
    fixed_low = degrade(fixed_truth, config)
    progress_frames, progress_steps = [], []
    step = 0
    if ckpt is not None:
        G.load_state_dict(ckpt["models"]["G"])
        D.load_state_dict(ckpt["models"]["D"])
        opt_G.load_state_dict(ckpt["optimizers"]["G"])
        opt_D.load_state_dict(ckpt["optimizers"]["D"])
        for group in opt_G.param_groups + opt_D.param_groups:
            group["lr"] = config["lr"]
        step = ckpt["step"]
        progress_steps = list(ckpt["progress"]["steps"])
        progress_frames = [f.to(device).float().div(255) for f in ckpt["progress"]["frames"]]
        if world == 1:  # the saved streams are rank 0's; other ranks keep their own seeds
            torch.set_rng_state(ckpt["rng"]["torch"])
            data_gen.set_state(ckpt["rng"]["data"])
            if device.type == "cuda" and "cuda" in ckpt["rng"]:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)

    G_train, D_train = G, D
    if config["compile"]:
        G_train, D_train = torch.compile(G), torch.compile(D)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        G_train, D_train = DDP(G_train), DDP(D_train)

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
        """A training batch: (ground truth, low-resolution input), both in [-1, 1]."""
        idx = torch.randint(0, len(data), (local_batch,), generator=data_gen).to(device)
        truth = data[idx].float().div(255)
        return truth * 2 - 1, degrade(truth, config) * 2 - 1

    def checkpoint():
        return {
            "script": SCRIPT, "format": CHECKPOINT_FORMAT, "config": config, "step": step,
            "models": {"G": G.state_dict(), "D": D.state_dict()},
            "optimizers": {"G": opt_G.state_dict(), "D": opt_D.state_dict()},
            "rng": {"torch": torch.get_rng_state(), "data": data_gen.get_state(),
                    **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})},
            "progress": {"steps": progress_steps,
                         "frames": [f.mul(255).round().to(torch.uint8).cpu() for f in progress_frames]},
        }

    @torch.no_grad()
    def test_mse():
        """MSE in [0, 1] pixels over the test images: G's output and the bilinear input, each against the truth."""
        G.eval()
        sums = torch.zeros(2, device=device, dtype=torch.float64)
        for i in range(0, len(test_data), 250):
            truth = test_data[i:i + 250].float().div(255)
            low = degrade(truth, config)
            with autocast:
                out = upscale({"G": G}, low)
            sums += torch.stack([(out - truth).pow(2).flatten(1).mean(1).sum(), (low - truth).pow(2).flatten(1).mean(1).sum()]).double()
        G.train()
        return (sums / len(test_data)).tolist()

    def save_samples():
        G.eval()
        with torch.no_grad(), autocast:
            out = upscale({"G": G}, fixed_low)
        G.train()
        # 6x6 grid: each row holds two (input, output, truth) triplets of the fixed test images
        triplets = torch.stack([fixed_low, out, fixed_truth], 1)
        save_image(triplets.flatten(0, 1), os.path.join(out_dir, "samples", f"step_{step:06d}.png"), nrow=6, padding=2)
        save_image(triplets[:10].flatten(0, 1), os.path.join(out_dir, "triplets.png"), nrow=3, padding=2)
        progress_frames.append(out[0])
        progress_steps.append(step)
        save_progress_strip(os.path.join(out_dir, "progress_strip.png"), fixed_low[0], fixed_truth[0], progress_frames, progress_steps)

    loss_kind = config["gan_loss"]
    stats = torch.zeros(6, device=device)  # running sums over the log interval: loss_D, loss_G, recon, adv, D(x), D(G(y))
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    t0, iters_since_log = time.perf_counter(), 0
    curve_keys = [("loss_D", "loss_G"), ("recon", "adv"), ("D_x", "D_G_y"), ("test_mse", "baseline_mse")]
    while step < config["max_iters"]:
        truth, low = draw_batch()
        with autocast:
            fake = G_train(low)
        # (1) update D on the ground truth against G's output (detached: no gradient to G here)
        with autocast:
            real_scores, fake_scores = D_train(truth).float(), D_train(fake.detach()).float()
            loss_D = discriminator_loss(loss_kind, real_scores, fake_scores)
            if loss_kind == "wgan-gp":
                loss_D = loss_D + config["gp_weight"] * gradient_penalty(D_train, truth, fake.detach())
        opt_D.zero_grad(set_to_none=True)
        loss_D.backward()
        opt_D.step()
        # (2) update G: reconstruct the truth and fool the updated D
        with autocast:
            adv = generator_adv_loss(loss_kind, D_train(fake).float())
            recon = reconstruction_loss(config["recon"], fake.float(), truth)
            loss_G = config["recon_weight"] * recon + config["adv_weight"] * adv
        opt_G.zero_grad(set_to_none=True)
        loss_G.backward()
        opt_G.step()
        step += 1
        iters_since_log += 1
        with torch.no_grad():
            stats += torch.stack([loss_D.detach(), loss_G.detach(), recon.detach(), adv.detach(),
                                  discriminator_output(loss_kind, real_scores).mean(),
                                  discriminator_output(loss_kind, fake_scores).mean()])
            nonfinite |= ~torch.isfinite(loss_D.detach() + loss_G.detach())

        is_last = step == config["max_iters"]
        is_sample = step % config["sample_interval"] == 0 or is_last
        is_log = step % config["log_interval"] == 0 or is_sample
        if is_log or step % config["ckpt_interval"] == 0:
            if nonfinite.item():  # stop before a NaN can reach a checkpoint; the last good one stays
                fail(f"non-finite loss by step {step} (loss_D={loss_D.item():.4g}, loss_G={loss_G.item():.4g}); "
                     f"the last good checkpoint in {out_dir} is kept; try a lower --lr")
        if master and is_log:
            means = (stats / iters_since_log).tolist()
            dt = time.perf_counter() - t0
            row = {"step": step, "loss_D": means[0], "loss_G": means[1], "recon": means[2], "adv": means[3],
                   "D_x": means[4], "D_G_y": means[5], "ms_per_step": 1000 * dt / iters_since_log,
                   "images_per_s": iters_since_log * config["batch_size"] / dt}
            if is_sample:
                row["test_mse"], row["baseline_mse"] = test_mse()
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"step {step:6d} | loss_D {means[0]:.4f} loss_G {means[1]:.4f} (recon {means[2]:.4f} adv {means[3]:.4f}) "
                  f"| D(x) {means[4]:.3f} D(G(y)) {means[5]:.3f} | {row['ms_per_step']:.1f} ms/step {row['images_per_s']:.0f} img/s"
                  + (f" | test MSE {row['test_mse']:.5f} (bilinear {row['baseline_mse']:.5f})" if is_sample else ""))
        if master and is_sample:
            save_samples()
            plot_curves(log_path, os.path.join(out_dir, "curves.png"), curve_keys)
        if master and (step % config["ckpt_interval"] == 0 or is_last):
            save_checkpoint(checkpoint(), os.path.join(out_dir, "ckpt.pt"))
        if is_log:
            stats.zero_()
            t0, iters_since_log = time.perf_counter(), 0
    if ddp:
        del G_train, D_train  # DDP reducers must go before their process group, or exit can abort
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
