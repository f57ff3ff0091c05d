"""Conditional GANs in one file: ACGAN (a class given to G, an auxiliary classifier
on D) and InfoGAN (latent codes given to G, a Q head on D that recovers them).

Odena, Olah, Shlens, "Conditional Image Synthesis with Auxiliary Classifier
GANs", ICML 2017. Chen, Duan, Houthooft, Schulman, Sutskever, Abbeel,
"InfoGAN: Interpretable Representation Learning by Information Maximizing
Generative Adversarial Nets", NeurIPS 2016. The networks are the DCGAN ones of
dcgan.py (seed 001 at 32x32, seed 000 at 64x64) with the extra input and the
extra head of seed 002 (Problem 3 ACGAN, Bonus InfoGAN).

    python cgan.py                                    # ACGAN on the embedded MNIST sample: one class per digit
    python cgan.py --model infogan                    # InfoGAN: 62 noise + one 10-way code + 2 continuous codes
    python cgan.py --dataset celeba --img_size 64 --ngf 64 --ndf 64 --attr Smiling --batch_size 64
    python cgan.py --model infogan --dataset celeba --img_size 64 --ngf 64 --ndf 64 --nz 64 --cat_codes 5 --cont_codes 0
    torchrun --nproc_per_node=2 cgan.py               # DistributedDataParallel

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

SCRIPT = "cgan"
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


def class_labels(data_dir, dataset, labels, attr):
    """The class id of every image and the class names.

    Digit-style labels (N,) are their own classes; attribute labels (N x 40 in {0, 1},
    named in data/<dataset>/attr_names.json as data/celeba/prepare.py writes them)
    give the two classes "not <attr>" / "<attr>" of the column --attr picks.
    """
    if labels is None:
        raise ValueError(f"'{dataset}' has no labels ({dataset}/train_labels.npy); ACGAN needs them "
                         "(InfoGAN does not: --model infogan)")
    if labels.ndim == 1:
        if attr:
            raise ValueError(f"--attr {attr}: '{dataset}' has one class label per image, not attributes")
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

    For img_size 32 (seed 001):   in -> (ngf*4) x 4 x 4 -> (ngf*2) x 8 x 8 -> ngf x 16 x 16 -> C x 32 x 32
    For img_size 64 (seed 000):   in -> (ngf*8) x 4 x 4 -> ... -> ngf x 32 x 32 -> C x 64 x 64
    ACGAN (seed 002 P3): the class enters as a one-hot vector appended to the noise.
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
    """

    def __init__(self, ndf, channels, img_size, aux_dim, q_hidden=0):
        super().__init__()
        n_down = int(math.log2(img_size)) - 2
        layers = [nn.Conv2d(channels, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        width = ndf
        for _ in range(n_down - 1):
            layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width * 2), nn.LeakyReLU(0.2, True)]
            width *= 2
        self.body = nn.Sequential(*layers)
        # width x 4 x 4
        self.source = nn.Conv2d(width, 1, 4, 1, 0, bias=False)
        if q_hidden:
            self.aux = nn.Sequential(nn.Conv2d(width, q_hidden, 4, 1, 0, bias=False), nn.BatchNorm2d(q_hidden),
                                     nn.LeakyReLU(0.2, True), nn.Conv2d(q_hidden, aux_dim, 1))
        else:
            self.aux = nn.Conv2d(width, aux_dim, 4, 1, 0)

    def forward(self, x):
        h = self.body(x)
        return self.source(h).view(-1), self.aux(h).flatten(1)


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
    latent_dim = config["nz"] + code_size(config)
    G = Generator(latent_dim, config["n_classes"], config["ngf"], c, s)
    if config["model"] == "acgan":
        D = Discriminator(config["ndf"], c, s, aux_dim=config["n_classes"])
    else:
        D = Discriminator(config["ndf"], c, s, aux_dim=code_size(config), q_hidden=128)
    G.apply(init_weights)
    D.apply(init_weights)
    return {"G": G, "D": D}


# -----------------------------------------------------------------------------
# Losses. D's source head outputs logits: D(x) = sigmoid(logit).


def gan_discriminator_loss(real_logits, fake_logits):
    """-E[log D(x)] - E[log(1 - D(G(z)))]"""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def gan_generator_loss(fake_logits):
    """The non-saturating -E[log D(G(z))] (the log-D trick of seed 001)."""
    return F.softplus(-fake_logits).mean()


def acgan_discriminator_loss(real_logits, fake_logits, real_class_logits, fake_class_logits, real_labels, fake_labels):
    """D maximises L_S + L_C (Odena et al. eq. 2-3): the right source, and the right class of real and fake images.

    For a binary attribute the two-way softmax equals the sigmoid cross-entropy of seed 002 on one logit.
    """
    class_loss = F.cross_entropy(real_class_logits, real_labels) + F.cross_entropy(fake_class_logits, fake_labels)
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


def code_accuracy(q_out, z, config):
    """How often Q's most likely category is the one G was given (over all categorical codes)."""
    if not config["cat_codes"]:
        return q_out.new_zeros(())
    _, cat, _ = split_codes(z, config)
    k, d = config["cat_codes"], config["cat_dim"]
    return (q_out[:, :k * d].reshape(len(z), k, d).argmax(-1) == cat).float().mean()


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
    """ACGAN: standard normal noise. InfoGAN: noise ++ uniformly drawn one-hot codes ++ U(-1, 1) codes."""
    z = torch.randn(n, config["nz"], device=device, generator=generator)
    if config["model"] != "infogan":
        return z
    cat = torch.randint(0, config["cat_dim"], (n, config["cat_codes"]), device=device, generator=generator)
    onehot = F.one_hot(cat, config["cat_dim"]).float().flatten(1)
    cont = torch.rand(n, config["cont_codes"], device=device, generator=generator) * 2 - 1
    return torch.cat([z, onehot, cont], 1)


@torch.no_grad()
def generate(models, z, labels=None):
    """Images in [0, 1]. ACGAN: labels are the class ids (int64, (n,)); None gives classes 0, 1, 2, ... in turn."""
    G = models["G"]
    if G.n_classes and labels is None:
        labels = torch.arange(len(z), device=z.device) % G.n_classes
    return G(z, labels).float().add(1).div(2).clamp(0, 1)


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
    p = argparse.ArgumentParser(description="Train a conditional GAN: ACGAN or InfoGAN.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="acgan", choices=["acgan", "infogan"],
                   help="ACGAN (class-conditional, auxiliary classifier) or InfoGAN (latent codes, Q head)")
    p.add_argument("--dataset", default="mnist5k",
                   help="folder under --data_dir holding train.npy / test.npy (+ *_labels.npy for ACGAN)")
    p.add_argument("--data_dir", default="data", help="where the prepared datasets live")
    p.add_argument("--out_dir", default="out/cgan", help="checkpoint, samples, logs and curves go here")
    p.add_argument("--img_size", type=int, default=32, help="32 (4 layers, seed 001) or 64 (5 layers, seed 000)")
    p.add_argument("--attr", default=None,
                   help="ACGAN on attribute data (celeba): the binary attribute to condition on, e.g. Smiling (seed 002)")
    p.add_argument("--nz", type=int, default=None,
                   help="noise size; default 100 for acgan (seed 002), 62 for infogan (Chen et al., MNIST)")
    p.add_argument("--cat_codes", type=int, default=1, help="InfoGAN: number of categorical codes (seed 002 CelebA: 5)")
    p.add_argument("--cat_dim", type=int, default=10, help="InfoGAN: categories per categorical code")
    p.add_argument("--cont_codes", type=int, default=2, help="InfoGAN: number of continuous codes, each U(-1, 1)")
    p.add_argument("--lambda_cat", type=float, default=1.0, help="InfoGAN: weight of the information term of the categorical codes")
    p.add_argument("--lambda_cont", type=float, default=1.0,
                   help="InfoGAN: weight of the continuous codes' term (Chen et al. advise a smaller one, e.g. 0.1, on some datasets)")
    p.add_argument("--ngf", type=int, default=32, help="generator width: channels before the output layer (seed 000: 128)")
    p.add_argument("--ndf", type=int, default=32, help="discriminator width of its first layer")
    p.add_argument("--batch_size", type=int, default=128, help="images per step, over all processes")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate for both networks")
    p.add_argument("--beta1", type=float, default=0.5, help="Adam beta1")
    p.add_argument("--beta2", type=float, default=0.999, help="Adam beta2")
    p.add_argument("--max_iters", type=int, default=2000, help="training iterations (each: one D then one G update)")
    p.add_argument("--log_interval", type=int, default=50, help="iterations between log.jsonl lines")
    p.add_argument("--sample_interval", type=int, default=250, help="iterations between sample grids (and curves.png)")
    p.add_argument("--ckpt_interval", type=int, default=500, help="iterations between checkpoints (one is always written at the end)")
    p.add_argument("--seed", type=int, default=1337, help="random seed")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="autocast dtype; auto: bfloat16 on CUDA, else float32")
    p.add_argument("--compile", action="store_true", help="torch.compile both networks")
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

    if config["img_size"] not in (32, 64):
        fail(f"--img_size {config['img_size']} is not supported: use 32 or 64")
    if config["nz"] is None:
        config["nz"] = 100 if config["model"] == "acgan" else 62
    if config["model"] == "infogan" and config["cat_codes"] + config["cont_codes"] == 0:
        fail("InfoGAN needs at least one code: --cat_codes or --cont_codes")
    if config["model"] == "infogan" and config["attr"]:
        fail(f"--attr {config['attr']} conditions ACGAN on an attribute; InfoGAN learns its codes without labels")
    dtype = config["dtype"]
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    try:
        train_images, train_labels = load_images(config["data_dir"], config["dataset"], "train", config["img_size"])
        if config["model"] == "acgan":
            train_labels, config["class_names"] = class_labels(config["data_dir"], config["dataset"], train_labels, config["attr"])
        else:
            config["class_names"] = []
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    config["n_classes"] = len(config["class_names"])
    config["channels"] = train_images.shape[1]
    if config["batch_size"] % world:
        fail(f"--batch_size {config['batch_size']} is not divisible by the {world} processes")
    local_batch = config["batch_size"] // world
    data = train_images.to(device)  # uint8 on the device; batches are drawn by index
    labels = train_labels.to(device) if config["n_classes"] else None
    acgan = config["n_classes"] > 0

    torch.manual_seed(config["seed"] + rank)
    models = build_models(config)
    G, D = models["G"].to(device), models["D"].to(device)
    betas = (config["beta1"], config["beta2"])
    opt_G = torch.optim.Adam(G.parameters(), lr=config["lr"], betas=betas)
    opt_D = torch.optim.Adam(D.parameters(), lr=config["lr"], betas=betas)
    data_gen = torch.Generator().manual_seed(config["seed"] + 1000 + rank)
    fixed_z = sample_latent(config, 36, "cpu", torch.Generator().manual_seed(config["seed"])).to(device)
    fixed_labels = torch.arange(36, device=device) % config["n_classes"] if acgan else None  # classes 0, 1, 2, ... in reading order
    step = 0
    if ckpt is not None:
        G.load_state_dict(ckpt["models"]["G"])
        D.load_state_dict(ckpt["models"]["D"])
        opt_G.load_state_dict(ckpt["optimizers"]["G"])
        opt_D.load_state_dict(ckpt["optimizers"]["D"])
        for group in opt_G.param_groups + opt_D.param_groups:
            group["lr"] = config["lr"]
        step = ckpt["step"]
        fixed_z = ckpt["fixed_noise"].to(device)
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

    def draw_real_batch():
        idx = torch.randint(0, len(data), (local_batch,), generator=data_gen).to(device)
        return to_unit_range(data[idx]), (labels[idx] if acgan else None)

    def draw_fake_inputs():
        z = sample_latent(config, local_batch, device)
        return z, (torch.randint(0, config["n_classes"], (local_batch,), device=device) if acgan else None)

    def checkpoint():
        return {
            "script": SCRIPT, "format": CHECKPOINT_FORMAT, "config": config, "step": step,
            "models": {"G": G.state_dict(), "D": D.state_dict()},
            "optimizers": {"G": opt_G.state_dict(), "D": opt_D.state_dict()},
            "rng": {"torch": torch.get_rng_state(), "data": data_gen.get_state(),
                    **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})},
            "fixed_noise": fixed_z.cpu(),
        }

    def save_samples():
        G.eval()
        with torch.no_grad(), autocast:
            grid = G(fixed_z, fixed_labels).float()
        G.train()
        save_image(grid.add(1).div(2), os.path.join(out_dir, "samples", f"step_{step:06d}.png"), nrow=6, padding=2)

    # log keys: the two GAN losses, D's outputs, then ACGAN: class accuracy of D's auxiliary head on
    # real images and on G's fakes; InfoGAN: the information loss and Q's accuracy on the categorical codes
    extra_keys = ("acc_real", "acc_fake") if acgan else ("loss_info", "acc_code")
    stats = torch.zeros(7, device=device)  # running sums over the log interval
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    t0, iters_since_log = time.perf_counter(), 0
    curve_keys = [("loss_D", "loss_G"), ("D_x", "D_G_z1", "D_G_z2"), extra_keys]
    while step < config["max_iters"]:
        # (1) update D: the right source for real and fake, plus (ACGAN) the right class / (InfoGAN) the codes of the fakes
        real, real_labels = draw_real_batch()
        z, fake_labels = draw_fake_inputs()
        with autocast:
            with torch.no_grad():
                fake = G_train(z, fake_labels)
            real_logits, real_aux = D_train(real)
            fake_logits, fake_aux = D_train(fake)
            real_logits, real_aux = real_logits.float(), real_aux.float()
            fake_logits, fake_aux = fake_logits.float(), fake_aux.float()
            if acgan:
                loss_D = acgan_discriminator_loss(real_logits, fake_logits, real_aux, fake_aux, real_labels, fake_labels)
            else:  # as in Chen et al.'s code, the information term trains Q and the shared body in the D step too
                loss_D = gan_discriminator_loss(real_logits, fake_logits) + info_loss(fake_aux, z, config)
        opt_D.zero_grad(set_to_none=True)
        loss_D.backward()
        opt_D.step()
        # (2) update G: fool the updated D, and make the class / codes recognisable
        z, fake_labels = draw_fake_inputs()
        with autocast:
            fake_logits_G, fake_aux_G = D_train(G_train(z, fake_labels))
            fake_logits_G, fake_aux_G = fake_logits_G.float(), fake_aux_G.float()
            if acgan:
                loss_G = acgan_generator_loss(fake_logits_G, fake_aux_G, fake_labels)
            else:
                loss_info = info_loss(fake_aux_G, z, config)
                loss_G = gan_generator_loss(fake_logits_G) + loss_info
        opt_G.zero_grad(set_to_none=True)
        loss_G.backward()
        opt_G.step()
        step += 1
        iters_since_log += 1
        with torch.no_grad():
            if acgan:
                extra = [(real_aux.argmax(1) == real_labels).float().mean(), (fake_aux_G.argmax(1) == fake_labels).float().mean()]
            else:
                extra = [loss_info.detach(), code_accuracy(fake_aux_G, z, config)]
            stats += torch.stack([loss_D.detach(), loss_G.detach(), torch.sigmoid(real_logits).mean(),
                                  torch.sigmoid(fake_logits).mean(), torch.sigmoid(fake_logits_G).mean(), *extra])
            nonfinite |= ~torch.isfinite(loss_D.detach() + loss_G.detach())

        is_last = step == config["max_iters"]
        if step % config["log_interval"] == 0 or is_last or step % config["ckpt_interval"] == 0:
            if nonfinite.item():  # stop before a NaN can reach a checkpoint; the last good one stays
                fail(f"non-finite loss by step {step} (loss_D={loss_D.item():.4g}, loss_G={loss_G.item():.4g}); "
                     f"the last good checkpoint in {out_dir} is kept; try a lower --lr")
        if master and (step % config["log_interval"] == 0 or is_last):
            means = (stats / iters_since_log).tolist()
            dt = time.perf_counter() - t0
            row = {"step": step, "loss_D": means[0], "loss_G": means[1], "D_x": means[2], "D_G_z1": means[3], "D_G_z2": means[4],
                   extra_keys[0]: means[5], extra_keys[1]: means[6],
                   "ms_per_step": 1000 * dt / iters_since_log, "images_per_s": iters_since_log * config["batch_size"] / dt}
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"step {step:6d} | loss_D {means[0]:.4f} loss_G {means[1]:.4f} | D(x) {means[2]:.3f} "
                  f"D(G(z)) {means[3]:.3f} / {means[4]:.3f} | {extra_keys[0]} {means[5]:.3f} {extra_keys[1]} {means[6]:.3f} | "
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
