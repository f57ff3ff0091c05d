"""WGAN and WGAN-GP: Wasserstein GANs with weight clipping or a gradient penalty, in one file.

Arjovsky, Chintala, Bottou, "Wasserstein GAN", ICML 2017 (--mode clip).
Gulrajani, Ahmed, Arjovsky, Dumoulin, Courville, "Improved Training of
Wasserstein GANs", NeurIPS 2017 (--mode gp, the default).

The generator is the DCGAN generator of the course handouts; the critic is the
DCGAN discriminator without the sigmoid (seed 004): it outputs an unbounded
score, and training maximises E[D(x)] - E[D(G(z))], an estimate of the
Wasserstein-1 distance when D is 1-Lipschitz (seed 003 §4a). The Lipschitz
constraint comes either from clipping every critic weight to [-c, c] after each
critic update (c = 0.01 in Arjovsky et al.; seed 003 uses 0.05), or from the
penalty lambda * E[(||grad D(x_hat)||_2 - 1)^2] at random points x_hat between
real and generated samples (Gulrajani et al., lambda = 10), which needs a
critic without batch norm.

    python wgan.py                                    # WGAN-GP on the embedded MNIST sample, 32x32
    python wgan.py --mode clip                        # WGAN with weight clipping, RMSprop
    python wgan.py --mode clip --clip 0.05            # the clipping bound of seed 003
    python wgan.py --dataset celeba --img_size 64 --ngf 64 --ndf 64 --batch_size 64
    torchrun --nproc_per_node=2 wgan.py               # DistributedDataParallel

Everything the run makes goes to --out_dir: ckpt.pt, samples/step_*.png,
log.jsonl, curves.png and config.json.
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

SCRIPT = "wgan"
CHECKPOINT_FORMAT = 1


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


# -----------------------------------------------------------------------------
# Models


def upsample_block(in_ch, out_ch, mode):
    """Double the spatial size: a strided transposed conv, or resize then 3x3 conv (seed 003 §3)."""
    if mode == "convtranspose":
        return nn.ConvTranspose2d(in_ch, out_ch, 4, 2, 1, bias=False)
    align = dict(align_corners=False) if mode == "bilinear" else {}
    return nn.Sequential(nn.Upsample(scale_factor=2, mode=mode, **align), nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False))


class Generator(nn.Module):
    """z (nz x 1 x 1) -> image (channels x img_size x img_size) in [-1, 1]: the DCGAN generator.

    For img_size 32 (seed 001):   nz -> (ngf*4) x 4 x 4 -> (ngf*2) x 8 x 8 -> ngf x 16 x 16 -> C x 32 x 32
    For img_size 64 (seed 000):   nz -> (ngf*8) x 4 x 4 -> ... -> ngf x 32 x 32 -> C x 64 x 64
    """

    def __init__(self, nz, ngf, channels, img_size, upsample="convtranspose"):
        super().__init__()
        n_up = int(math.log2(img_size)) - 2  # stride-2 layers after the first 4 x 4 one
        width = ngf * 2 ** (n_up - 1)
        layers = [nn.ConvTranspose2d(nz, width, 4, 1, 0, bias=False), nn.BatchNorm2d(width), nn.ReLU(True)]
        # (ngf * 2^(n_up-1)) x 4 x 4
        for _ in range(n_up - 1):
            layers += [upsample_block(width, width // 2, upsample), nn.BatchNorm2d(width // 2), nn.ReLU(True)]
            width //= 2
        # ngf x (img_size/2) x (img_size/2)
        layers += [upsample_block(width, channels, upsample), nn.Tanh()]
        # channels x img_size x img_size
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z.view(z.shape[0], -1, 1, 1))


def critic_norm_layer(kind, channels):
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        # GroupNorm with one group normalises each sample over all of C x H x W (layer norm) with a
        # per-channel scale and offset, as the layer norm of Gulrajani et al.'s code does
        return nn.GroupNorm(1, channels)
    return nn.Identity()


class Critic(nn.Module):
    """image -> one unbounded score: the DCGAN discriminator without the sigmoid (seed 004).

    For img_size 32: C x 32 x 32 -> ndf x 16 x 16 -> (ndf*2) x 8 x 8 -> (ndf*4) x 4 x 4 -> 1
    For img_size 64: C x 64 x 64 -> ndf x 32 x 32 -> ... -> (ndf*8) x 4 x 4 -> 1
    norm: "batch" (DCGAN), "layer" or "none". Batch norm mixes the samples of a batch, so a
    per-sample gradient penalty is not defined for it (Gulrajani et al. §4).
    """

    def __init__(self, ndf, channels, img_size, norm="batch"):
        super().__init__()
        n_down = int(math.log2(img_size)) - 2
        layers = [nn.Conv2d(channels, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        width = ndf
        for _ in range(n_down - 1):
            # DCGAN's convs have no bias (the normalisation's offset plays its part); without one they need it
            layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=norm == "none"), critic_norm_layer(norm, width * 2),
                       nn.LeakyReLU(0.2, True)]
            width *= 2
        # width x 4 x 4
        layers += [nn.Conv2d(width, 1, 4, 1, 0, bias=False)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x).view(-1)


def init_weights(module):
    """N(0, 0.02) for conv weights, N(1, 0.02) for batch-norm scales (Radford et al. §4)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_models(config):
    c, s = config["channels"], config["img_size"]
    G = Generator(config["nz"], config["ngf"], c, s, config["upsample"])
    D = Critic(config["ndf"], c, s, config["critic_norm"])
    G.apply(init_weights)
    D.apply(init_weights)
    return {"G": G, "D": D}


# -----------------------------------------------------------------------------
# Losses. The critic maximises E[D(x)] - E[D(G(z))], so it minimises the negative (seed 004);
# the generator minimises -E[D(G(z))]. (Seed 003 writes both as the quantities to maximise.)


def critic_loss(real_scores, fake_scores, penalty, gp_weight):
    return fake_scores.mean() - real_scores.mean() + gp_weight * penalty


def generator_loss(fake_scores):
    return -fake_scores.mean()


def gradient_penalty(critic, real, fake, eps=None):
    """E[(||grad D(x_hat)||_2 - 1)^2] with x_hat = eps x + (1 - eps) G(z) (Gulrajani et al. eq. 3).

    eps ~ U(0, 1) is drawn once per sample, so x_hat lies on the segment between a real and a
    generated image (one eps per pixel would put it off that segment).
    """
    if eps is None:
        eps = torch.rand(real.shape[0], *[1] * (real.dim() - 1), device=real.device)
    x_hat = (eps * real + (1 - eps) * fake.detach()).requires_grad_(True)
    scores = critic(x_hat)
    # create_graph: the penalty is a function of the critic's weights through this gradient, which
    # comes back in x_hat's dtype (float32 for float32 data, also when the critic runs in bf16)
    (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(2, dim=1) - 1).pow(2).mean()


@torch.no_grad()
def clip_weights_(critic, bound):
    """Clamp every critic parameter (batch-norm scales and offsets too) to [-bound, bound] (Arjovsky et al. Alg. 1)."""
    for p in critic.parameters():
        p.clamp_(-bound, bound)


def critic_step(D, G, opt_D, real, z, config, autocast=nullcontext()):
    """One critic update; returns (critic loss, Wasserstein estimate E[D(x)] - E[D(G(z))], penalty)."""
    with autocast:
        with torch.no_grad():
            fake = G(z)
        real_scores, fake_scores = D(real).float(), D(fake).float()
        penalty = gradient_penalty(D, real, fake) if config["mode"] == "gp" else torch.zeros((), device=real.device)
        loss = critic_loss(real_scores, fake_scores, penalty, config["gp_weight"])
    opt_D.zero_grad(set_to_none=True)
    loss.backward()
    opt_D.step()
    if config["mode"] == "clip":
        clip_weights_(D, config["clip"])
    return loss.detach(), (real_scores.mean() - fake_scores.mean()).detach(), penalty.detach()


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


def sample_latent(config, n, device, generator=None):
    return torch.randn(n, config["nz"], device=device, generator=generator)


@torch.no_grad()
def generate(models, z, labels=None):
    return models["G"](z).float().add(1).div(2).clamp(0, 1)


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
    steps = [r["step"] for r in rows]
    groups = [k for k in keys if isinstance(k, tuple)]
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for key in group:
            ax.plot(steps, [r[key] for r in rows], label=key)
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
    p = argparse.ArgumentParser(description="Train a WGAN (weight clipping) or WGAN-GP (gradient penalty).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", default="gp", choices=["gp", "clip"],
                   help="Lipschitz constraint on the critic: gradient penalty (Gulrajani et al. 2017) or weight clipping (Arjovsky et al. 2017)")
    p.add_argument("--dataset", default="mnist5k", help="folder under --data_dir holding train.npy / test.npy")
    p.add_argument("--data_dir", default="data", help="where the prepared datasets live")
    p.add_argument("--out_dir", default="out/wgan", help="checkpoint, samples, logs and curves go here")
    p.add_argument("--img_size", type=int, default=32, help="32 (4 layers, seed 001) or 64 (5 layers, seed 000)")
    p.add_argument("--nz", type=int, default=100, help="latent size")
    p.add_argument("--ngf", type=int, default=32, help="generator width: channels before the output layer (seed 000: 128)")
    p.add_argument("--ndf", type=int, default=16, help="critic width of its first layer (16 keeps the default run within 10 CPU minutes)")
    p.add_argument("--upsample", default="convtranspose", choices=["convtranspose", "nearest", "bilinear"],
                   help="how G doubles resolution: transposed conv, or resize then 3x3 conv (seed 003 §3)")
    p.add_argument("--critic_norm", default=None, choices=["batch", "layer", "none"],
                   help="normalisation in the critic; default: batch for clip (the DCGAN discriminator), "
                        "layer for gp (Gulrajani et al. §4; batch norm is refused with gp)")
    p.add_argument("--clip", type=float, default=0.01, help="clip mode: weight bound c (Arjovsky et al. Alg. 1: 0.01; seed 003: 0.05)")
    p.add_argument("--gp_weight", type=float, default=10.0, help="gp mode: penalty weight lambda (Gulrajani et al. Alg. 1)")
    p.add_argument("--n_critic", type=int, default=5, help="critic updates per generator update (both papers' Alg. 1)")
    p.add_argument("--batch_size", type=int, default=32,
                   help="images per critic step, over all processes (both papers: 64; 32 gives the default run twice the generator steps)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate of both networks; default: 5e-5 RMSprop for clip (Arjovsky et al. Alg. 1), "
                        "1e-4 Adam for gp (Gulrajani et al. Alg. 1)")
    p.add_argument("--beta1", type=float, default=None, help="gp mode: Adam beta1; default 0.0 (Gulrajani et al. Alg. 1)")
    p.add_argument("--beta2", type=float, default=None, help="gp mode: Adam beta2; default 0.9 (Gulrajani et al. Alg. 1)")
    p.add_argument("--max_iters", type=int, default=2500, help="generator updates (each after n_critic critic updates)")
    p.add_argument("--log_interval", type=int, default=25, help="iterations between log.jsonl lines")
    p.add_argument("--sample_interval", type=int, default=250, help="iterations between sample grids (and curves.png)")
    p.add_argument("--ckpt_interval", type=int, default=500, help="iterations between checkpoints (one is always written at the end)")
    p.add_argument("--seed", type=int, default=1337, help="random seed")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="autocast dtype; auto: bfloat16 on CUDA, else float32")
    p.add_argument("--compile", action="store_true", help="torch.compile the generator, and the critic in clip mode only (a compiled graph cannot be differentiated twice, as the penalty needs)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue from CKPT (default: --out_dir/ckpt.pt) exactly where it stopped")
    return p, p.parse_args(argv)


# Flags a resumed run may change; everything else comes from the checkpoint.
RESUMABLE_OVERRIDES = ("max_iters", "lr", "log_interval", "sample_interval", "ckpt_interval", "device", "dtype", "compile", "out_dir")

# Each mode's defaults, with their sources (the help strings say the same).
MODE_DEFAULTS = {
    "clip": dict(lr=5e-5, critic_norm="batch"),  # Arjovsky et al. 2017, Alg. 1; RMSprop has no betas
    "gp": dict(lr=1e-4, beta1=0.0, beta2=0.9, critic_norm="layer"),  # Gulrajani et al. 2017, Alg. 1 and §4
}


def resolve_mode_defaults(config):
    """Fill the flags left at None with the defaults of config["mode"]; return an error message or None."""
    mode = config["mode"]
    if mode == "clip" and (config["beta1"] is not None or config["beta2"] is not None):
        return "--beta1/--beta2 set Adam's betas, but --mode clip trains with RMSprop (Arjovsky et al.)"
    for key, value in MODE_DEFAULTS[mode].items():
        if config[key] is None:
            config[key] = value
    if mode == "gp" and config["critic_norm"] == "batch":
        return "--critic_norm batch cannot be used with --mode gp: batch norm couples the samples, so the per-sample gradient penalty is wrong; use layer or none"
    return None


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

    error = resolve_mode_defaults(config)
    if error:
        fail(error)
    if config["img_size"] not in (32, 64):
        fail(f"--img_size {config['img_size']} is not supported by the DCGAN generator and critic: use 32 or 64")
    if config["mode"] == "clip" and not config["clip"] > 0:
        fail(f"--clip {config['clip']} must be positive")
    if config["n_critic"] < 1:
        fail(f"--n_critic {config['n_critic']} must be at least 1")
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
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    config["channels"] = train_images.shape[1]
    if config["batch_size"] % world:
        fail(f"--batch_size {config['batch_size']} is not divisible by the {world} processes")
    local_batch = config["batch_size"] // world
    data = train_images.to(device)  # uint8 on the device; batches are drawn by index

    torch.manual_seed(config["seed"] + rank)
    models = build_models(config)
    G, D = models["G"].to(device), models["D"].to(device)
    if config["mode"] == "clip":
        opt_G = torch.optim.RMSprop(G.parameters(), lr=config["lr"])
        opt_D = torch.optim.RMSprop(D.parameters(), lr=config["lr"])
    else:
        betas = (config["beta1"], config["beta2"])
        opt_G = torch.optim.Adam(G.parameters(), lr=config["lr"], betas=betas)
        opt_D = torch.optim.Adam(D.parameters(), lr=config["lr"], betas=betas)
    data_gen = torch.Generator().manual_seed(config["seed"] + 1000 + rank)
    fixed_noise = torch.randn(36, config["nz"], generator=torch.Generator().manual_seed(config["seed"])).to(device)
    step = 0
    if ckpt is not None:
        G.load_state_dict(ckpt["models"]["G"])
        D.load_state_dict(ckpt["models"]["D"])
        opt_G.load_state_dict(ckpt["optimizers"]["G"])
        opt_D.load_state_dict(ckpt["optimizers"]["D"])
        for group in opt_G.param_groups + opt_D.param_groups:
            group["lr"] = config["lr"]
        step = ckpt["step"]
        fixed_noise = ckpt["fixed_noise"].to(device)
        if world == 1:  # the saved streams are rank 0's; other ranks keep their own seeds
            torch.set_rng_state(ckpt["rng"]["torch"])
            data_gen.set_state(ckpt["rng"]["data"])
            if device.type == "cuda" and "cuda" in ckpt["rng"]:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)

    G_train, D_train = G, D
    if config["compile"]:
        G_train = torch.compile(G)
        if config["mode"] == "clip":  # torch.compile cannot differentiate twice, which the penalty needs
            D_train = torch.compile(D)
    if ddp:
        # The penalty's torch.autograd.grad is taken w.r.t. x_hat, not the weights, so it fires none of
        # DDP's gradient hooks; the one loss.backward() then all-reduces the weights' full gradient,
        # penalty included (tests/test_wgan.py checks this against a single process).
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

    def draw_real_batch():
        idx = torch.randint(0, len(data), (local_batch,), generator=data_gen).to(device)
        return to_unit_range(data[idx])

    def checkpoint():
        return {
            "script": SCRIPT, "format": CHECKPOINT_FORMAT, "config": config, "step": step,
            "models": {"G": G.state_dict(), "D": D.state_dict()},
            "optimizers": {"G": opt_G.state_dict(), "D": opt_D.state_dict()},
            "rng": {"torch": torch.get_rng_state(), "data": data_gen.get_state(),
                    **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})},
            "fixed_noise": fixed_noise.cpu(),
        }

    def save_samples():
        G.eval()
        with torch.no_grad(), autocast:
            grid = G(fixed_noise).float()
        G.train()
        save_image(grid.add(1).div(2), os.path.join(out_dir, "samples", f"step_{step:06d}.png"), nrow=6, padding=2)

    stats = torch.zeros(4, device=device)  # running sums over the log interval: loss_D, wasserstein, gp (per critic step), loss_G
    t0, iters_since_log = time.perf_counter(), 0
    curve_keys = [("loss_D", "loss_G"), ("wasserstein",), ("gp",)]
    while step < config["max_iters"]:
        # (1) n_critic critic updates: maximise E[D(x)] - E[D(G(z))] (- lambda * penalty), clip in clip mode
        for _ in range(config["n_critic"]):
            real = draw_real_batch()
            z = torch.randn(local_batch, config["nz"], device=device)
            loss_D, wasserstein, penalty = critic_step(D_train, G_train, opt_D, real, z, config, autocast)
            stats[:3] += torch.stack([loss_D, wasserstein, penalty]) / config["n_critic"]
        # (2) one generator update: maximise E[D(G(z))]
        z = torch.randn(local_batch, config["nz"], device=device)
        with autocast:
            loss_G = generator_loss(D_train(G_train(z)).float())
        opt_G.zero_grad(set_to_none=True)
        loss_G.backward()
        opt_G.step()
        step += 1
        iters_since_log += 1
        stats[3] += loss_G.detach()

        is_last = step == config["max_iters"]
        if step % config["log_interval"] == 0 or is_last or step % config["ckpt_interval"] == 0:
            if not torch.isfinite(stats).all():  # stop before a NaN can reach a checkpoint; the last good one stays
                fail(f"non-finite loss by step {step} (loss_D={loss_D.item():.4g}, loss_G={loss_G.item():.4g}); "
                     f"the last good checkpoint in {out_dir} is kept; try a lower --lr")
        if master and (step % config["log_interval"] == 0 or is_last):
            means = (stats / iters_since_log).tolist()
            dt = time.perf_counter() - t0
            row = {"step": step, "loss_D": means[0], "wasserstein": means[1], "gp": means[2], "loss_G": means[3],
                   "ms_per_step": 1000 * dt / iters_since_log,
                   "images_per_s": iters_since_log * config["batch_size"] * config["n_critic"] / dt}
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"step {step:6d} | loss_D {means[0]:.4f} loss_G {means[3]:.4f} | W {means[1]:.4f} gp {means[2]:.4f} | "
                  f"{row['ms_per_step']:.1f} ms/step {row['images_per_s']:.0f} img/s")
        if step % config["log_interval"] == 0 or is_last:
            stats.zero_()
            t0, iters_since_log = time.perf_counter(), 0
        if master and (step % config["sample_interval"] == 0 or is_last):
            save_samples()
            plot_curves(log_path, os.path.join(out_dir, "curves.png"), curve_keys)
        if master and (step % config["ckpt_interval"] == 0 or is_last):
            save_checkpoint(checkpoint(), os.path.join(out_dir, "ckpt.pt"))
    if ddp:
        del G_train, D_train  # DDP reducers must go before their process group, or exit can abort
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
