"""SRGAN: 16x16 -> 64x64 super-resolution with a U-Net generator and a GAN loss, in one file.

A 64x64 image is downsampled to 16x16 and upsampled back bilinearly; a U-Net (Ronneberger et al., MICCAI 2015)
restores the detail, trained with a pixel loss plus a GAN loss (BCE, least squares, hinge or WGAN-GP) as in Ledig et
al., "Photo-Realistic Single Image Super-Resolution Using a Generative Adversarial Network", CVPR 2017. docs/srgan.md.

    python srgan.py                                   # embedded MNIST sample, upscaled to 64x64
    python srgan.py --gan_loss wgan-gp --recon mse
    torchrun --nproc_per_node=2 srgan.py              # DistributedDataParallel

Outputs in --out_dir: ckpt.pt, samples/step_*.png, progress_strip.png, triplets.png, log.jsonl, config.json.
"""
import argparse, copy, io, json, math, os, sys, time, timeit

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn

SCRIPT = "srgan"
CHECKPOINT_FORMAT = 3  # 3: --residual

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

def degrade(x, config):
    """x in [0, 1] (N x C x 64 x 64) -> low_size^2 by --down (bilinear and bicubic antialiased) -> bilinear to 64^2."""
    down = config["down"]
    low = F.interpolate(x, size=config["low_size"], mode=down, antialias=down in ("bilinear", "bicubic"))
    return F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False).clamp(0, 1)

# -----------------------------------------------------------------------------
# Models
def block(in_ch, out_ch, up=False, norm=True):
    """4x4 stride-2 conv halving the size (transposed: doubling it), [batch norm], LeakyReLU(0.2)."""
    conv = (nn.ConvTranspose2d if up else nn.Conv2d)(in_ch, out_ch, 4, 2, 1, bias=not norm)
    return nn.Sequential(conv, *([nn.BatchNorm2d(out_ch)] if norm else []), nn.LeakyReLU(0.2, True))

class UNetGenerator(nn.Module):
    """Bilinear input (C x 64 x 64, [-1, 1]) -> restored image. Five encoder layers take 64 -> 2 pixels (ngf .. 16 ngf),
    five decoder layers 2 -> 64 (8 ngf .. ngf/2), each output set beside the encoder feature of its size (the last:
    the input); a 3x3 conv over that gives the image (tanh), or with residual a correction added to the input."""

    def __init__(self, channels, ngf=32, residual=False):
        super().__init__()
        self.residual = residual
        enc, dec = [ngf * 2 ** i for i in range(5)], [ngf * 8 // 2 ** i for i in range(5)]
        self.encoder = nn.ModuleList(block(a, b) for a, b in zip([channels] + enc[:-1], enc))
        dec_in = [enc[4]] + [d + e for d, e in zip(dec, enc[3::-1])]  # previous decoder output + skip
        self.decoder = nn.ModuleList(block(a, b, up=True) for a, b in zip(dec_in, dec))
        self.out = nn.Sequential(nn.Conv2d(dec[-1] + channels, channels, 3, 1, 1), *[] if residual else [nn.Tanh()])

    def forward(self, x):
        skips = [x]
        for layer in self.encoder:
            skips.append(layer(skips[-1]))
        h = skips.pop()  # (16 ngf) x 2 x 2
        for layer in self.decoder:
            h = torch.cat([layer(h), skips.pop()], 1)
        out = self.out(h)
        return (x + out).clamp(-1, 1) if self.residual else out

class Discriminator(nn.Sequential):
    """Image (C x 64 x 64) -> one logit: five 4x4 stride-2 convs take 64 -> 2 (ndf .. 16 ndf, [batch norm]), a 3x3
    stride-2 conv 2 -> 1. No batch norm with --sn, or with wgan-gp's per-sample penalty (Gulrajani et al. §4)."""

    def __init__(self, channels, ndf=32, norm=True):
        widths = [ndf * 2 ** i for i in range(5)]
        super().__init__(*(block(a, b, norm=norm) for a, b in zip([channels] + widths[:-1], widths)),
                         nn.Conv2d(widths[-1], 1, 3, 2, 1), nn.Flatten(0))

def init_weights(module):
    """N(0, 0.02) for conv and linear weights, N(1, 0.02) for batch-norm scales, zero biases (Radford et al. §4)."""
    batch_norm = isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d))
    if batch_norm or isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 1.0 if batch_norm else 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)

def build_models(config):
    c, sn = config["channels"], config["sn"]
    G = UNetGenerator(c, config["ngf"], config["residual"]).apply(init_weights)
    if config["residual"]:  # a zero correction: training starts at the bilinear baseline, exact black included
        nn.init.zeros_(G.out[0].weight)
        nn.init.zeros_(G.out[0].bias)
    D = Discriminator(c, config["ndf"], norm=not (sn or config["gan_loss"] == "wgan-gp")).apply(init_weights)
    for conv in [m for m in D.modules() if sn and isinstance(m, nn.Conv2d)]:
        nn.utils.parametrizations.spectral_norm(conv)  # Miyato et al. 2018
    return {"G": G, "D": D}

@torch.no_grad()
def upscale(models, x_low):
    """degrade(x) in [0, 1] -> G's 64x64 output in [0, 1]."""
    return models["G"](x_low * 2 - 1).float().add(1).div(2).clamp(0, 1)

# -----------------------------------------------------------------------------
# Losses. D outputs logits (bce) or scores (lsgan, hinge, wgan-gp); y is the low-resolution input.
def discriminator_loss(kind, real, fake):
    if kind == "lsgan":  # Mao et al. 2017: E[(D(x) - 1)^2] + E[D(G(y))^2]
        return (real - 1).pow(2).mean() + fake.pow(2).mean()
    if kind == "hinge":  # E[max(0, 1 - D(x))] + E[max(0, 1 + D(G(y)))]
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    if kind == "wgan-gp":  # E[D(G(y))] - E[D(x)]; the caller adds the gradient penalty
        return fake.mean() - real.mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()  # bce: -E[log D(x)] - E[log(1 - D(G(y)))]

def generator_adv_loss(kind, fake):
    if kind == "lsgan":
        return (fake - 1).pow(2).mean()
    if kind in ("hinge", "wgan-gp"):
        return -fake.mean()
    return F.softplus(-fake).mean()  # bce, non-saturating: -E[log D(G(y))]

def gradient_penalty(critic, real, fake, eps=None):
    """E[(||grad critic(x_hat)||_2 - 1)^2] at x_hat = eps x + (1 - eps) G(z) (Gulrajani et al. 2017, eq. 3), one
    eps ~ U(0, 1) per sample, so that x_hat lies on the segment between a real and a generated image."""
    if eps is None:
        eps = torch.rand(real.shape[0], *[1] * (real.dim() - 1), device=real.device)
    x_hat = (eps * real + (1 - eps) * fake.detach()).requires_grad_(True)
    grad, = torch.autograd.grad(critic(x_hat).float().sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(2, dim=1) - 1).pow(2).mean()

def reconstruction_loss(kind, output, target):
    """Pixel loss on [-1, 1] images (so 2x the L1, 4x the MSE of [0, 1] pixels)."""
    return F.mse_loss(output, target) if kind == "mse" else F.l1_loss(output, target)

# -----------------------------------------------------------------------------
# Training aids that leave the model as defined: averaging G's weights
@torch.no_grad()
def update_ema(ema_model, model, decay):
    """ema <- decay * ema + (1 - decay) * weights, for every parameter."""
    for averaged, current in zip(ema_model.parameters(), model.parameters()):
        averaged.lerp_(current, 1 - decay)

# -----------------------------------------------------------------------------
# What a run shows besides its losses: the test MSE rows and the progress strip
def load_test_split(config, master):
    """The test images, uint8 on the CPU; an empty split (prepare.py --test_size 0): no test MSE, training grids."""
    try:
        test, _ = real_images(config, "test")
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    if len(test) and test.shape[1] != config["channels"]:
        fail(f"'{config['dataset']}' has {config['channels']} channels in its train split, {test.shape[1]} in test")
    if not len(test) and master:
        print(f"{SCRIPT}.py: note: the test split of '{config['dataset']}' is empty: no test MSE rows", flush=True)
    return test

@torch.no_grad()
def write_test_row(log_path, step, models, images, config):
    """Log the MSE in [0, 1] pixels of G's output and of the bilinear input over the test images, as evaluate.py."""
    sums = torch.zeros(2, dtype=torch.float64, device=images.device)
    for truth in images.split(250):
        truth = truth.float().div(255)
        low = degrade(truth, config)
        sums += torch.stack([(x - truth).pow(2).flatten(1).mean(1).sum() for x in (upscale(models, low), low)])
    test_mse, baseline_mse = (sums / len(images)).tolist()
    with open(log_path, "a") as f:
        f.write(json.dumps({"step": step, "test_mse": test_mse, "baseline_mse": baseline_mse}) + "\n")
    print(f"step {step}: test_mse {test_mse:.4g} (bilinear input {baseline_mse:.4g})", flush=True)

def saved_grids(out_dir):
    """[(step, path)] of the grids samples/step_*.png, in step order."""
    names = [n for n in os.listdir(os.path.join(out_dir, "samples")) if n.startswith("step_") and n.endswith(".png")]
    return sorted((int(n[5:-4]), os.path.join(out_dir, "samples", n)) for n in names if n[5:-4].isdigit())

def save_progress_strip(out_dir, size=64):
    """The first fixed input through training: input | G's output at each sample step | truth, cut from the saved
    grids (their first three cells), so that a resumed run's strip also shows the steps before the resume."""
    from PIL import Image, ImageDraw

    steps, paths = zip(*saved_grids(out_dir))
    cells = [(paths[-1], 0), *((path, 1) for path in paths), (paths[-1], 2)]  # (grid, cell) of each column
    canvas = Image.new("RGB", (2 + len(cells) * (size + 2), size + 18), "white")
    for i, ((path, k), label) in enumerate(zip(cells, ["input", *steps, "truth"])):
        with Image.open(path) as grid:  # make_grid's layout, padding 2
            cell = grid.convert("RGB").crop((2 + k * (size + 2), 2, 2 + k * (size + 2) + size, 2 + size))
        canvas.paste(cell, (2 + i * (size + 2), 16))
        ImageDraw.Draw(canvas).text((4 + i * (size + 2), 1), str(label), fill="black")
    canvas.save(os.path.join(out_dir, "progress_strip.tmp.png"))
    os.replace(os.path.join(out_dir, "progress_strip.tmp.png"), os.path.join(out_dir, "progress_strip.png"))

# -----------------------------------------------------------------------------
# Training
def get_args(argv=None, defaults=None):
    p = argparse.ArgumentParser(description="Train a U-Net super-resolution GAN (16x16 -> 64x64).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--img_size", type=number(int, 1), default=64, help="output size: 64 only")
    p.add_argument("--low_size", type=number(int, 1, 63), default=16, help="side of the low-resolution image")
    p.add_argument("--down", default="bilinear", choices=["bilinear", "bicubic", "area", "nearest"],
                   help="downsampling filter (bilinear/bicubic antialiased); the way back up is always bilinear")
    p.add_argument("--ngf", type=number(int, 2, 1024), default=32, help="G's width, even: encoder ngf..16ngf")
    p.add_argument("--ndf", type=number(int, 1, 1024), default=32, help="discriminator width of its first layer")
    p.add_argument("--gan_loss", default="bce", choices=["bce", "lsgan", "hinge", "wgan-gp"], help="GAN loss")
    p.add_argument("--gp_weight", type=number(float, 0), default=10.0, help="gradient penalty weight for wgan-gp")
    p.add_argument("--residual", action=argparse.BooleanOptionalAction, default=True,
                   help="G outputs its input plus a correction starting at zero; --no-residual: a tanh image")
    p.add_argument("--sn", action="store_true", help="spectral norm on every D conv, and no batch norm in D")
    p.add_argument("--recon", default="l1", choices=["l1", "mse"], help="pixel reconstruction loss, on [-1, 1] images")
    p.add_argument("--recon_weight", type=number(float, 0), default=1.0, help="weight of the reconstruction loss")
    p.add_argument("--adv_weight", type=number(float, 0), default=1.0, help="weight of the GAN loss (0: a plain U-Net)")
    p.add_argument("--lr", type=number(float, 0, low_open=True), default=2e-4, help="Adam learning rate, both networks")
    p.add_argument("--beta1", type=FRACTION, default=0.5, help="Adam beta1")
    p.add_argument("--beta2", type=FRACTION, default=0.999, help="Adam beta2")
    p.add_argument("--ema_decay", type=FRACTION, default=0.999, help="G's weight average; 0: off")
    p.add_argument("--eval_images", type=number(int, 0), default=1000, help="test images for the test MSE; 0: all")
    args = parse_run_flags(p, argv, {"log_interval": 25, "sample_interval": 300, "ckpt_interval": 300,
                                     **(defaults or {})}, batch_size=32, max_iters=700)
    if args.img_size != 64:
        fail(f"--img_size {args.img_size} is not supported: the networks take 64x64 (every dataset is resized to 64)")
    if args.ngf % 2:
        fail(f"--ngf {args.ngf} must be even (the last decoder layer has ngf/2 channels)")
    return args

def main(argv=None):
    config, ckpt = parse_config(get_args, argv)
    device, rank, world = setup_distributed(config)
    ddp, master, out_dir = world > 1, rank == 0, config["out_dir"]
    data, _ = train_data(config, device)
    test = load_test_split(config, master)
    test_data = test[:config["eval_images"] or None].to(device)
    shown = test if len(test) else data  # 12 fixed images spread over it: the grids, triplets.png, the strip's first
    fixed_truth = shown[torch.linspace(0, len(shown) - 1, min(12, len(shown))).long()].to(device).float().div(255)
    fixed_low = degrade(fixed_truth, config)
    local_batch, loss_kind = config["batch_size"] // world, config["gan_loss"]

    def draw(idx):  # (ground truth, low-resolution input) of the training images at idx, both in [-1, 1]
        truth = data[idx.to(device)].float().div(255)
        return [x.mul(2).sub(1).contiguous(memory_format=torch.channels_last) for x in (truth, degrade(truth, config))]

    torch.manual_seed(config["seed"])  # the same initial weights on every rank, so the EMA starts from DDP's
    models = {name: m.to(device, memory_format=torch.channels_last) for name, m in build_models(config).items()}
    if rank:  # from here each rank draws its own noise; rank 0 goes on as a single process does
        torch.manual_seed(config["seed"] + rank)
    G, D = models["G"], models["D"]
    optimizers = {name: torch.optim.Adam(m.parameters(), config["lr"], (config["beta1"], config["beta2"]))
                  for name, m in models.items()}
    ema = {"G": copy.deepcopy(G).eval().requires_grad_(False)} if config["ema_decay"] else {}
    data_gen = torch.Generator().manual_seed(config["seed"] + 1000 + rank)
    state = {"models": models, "optimizers": optimizers, "ema": ema}  # what a checkpoint holds and restores
    step, window = restore(ckpt, config, state, data_gen, device)
    trial = [copy.deepcopy(G), copy.deepcopy(D), fixed_randn(config["seed"] + 2, local_batch, data.shape[1], 64, 64)]
    autocast = choose_precision(config, device, lambda: trial[1](trial[0](trial[2].to(device))).mean().backward())
    bn_batches = torch.randint(0, len(data), (10, local_batch), generator=torch.Generator().manual_seed(config["seed"]))

    G_train, D_train = (torch.compile(G), torch.compile(D)) if config["compile"] else (G, D)
    D_judge = D_train  # D in G's update: outside DDP, since its frozen weights get no gradient there
    if ddp:
        G_train, D_train = (torch.nn.parallel.DistributedDataParallel(m) for m in (G_train, D_train))
    log_path = prepare_out_dir(config, step) if master else None
    if master:  # the grids after the checkpoint are stale, as its log rows are (the progress strip is drawn from them)
        for stale in [path for s, path in saved_grids(out_dir) if s > step]:
            os.remove(stale)
    t0, timed = time.perf_counter(), 0
    while step < config["max_iters"]:
        truth, low = draw(torch.randint(0, len(data), (local_batch,), generator=data_gen))
        # (1) Update D: tell the ground truth from G's output (G's one forward: detached here, with its graph in (2))
        with autocast:
            fake = G_train(low)
            real_scores, fake_scores = D_train(truth).float(), D_train(fake.detach()).float()
            loss_D = discriminator_loss(loss_kind, real_scores, fake_scores)
            if loss_kind == "wgan-gp":
                loss_D = loss_D + config["gp_weight"] * gradient_penalty(D_train, truth, fake)
        optimizers["D"].zero_grad(set_to_none=True)
        loss_D.backward()
        optimizers["D"].step()

        # (2) Update G: reconstruct the truth and make the updated D call its output real; D is frozen meanwhile
        D.requires_grad_(False)
        with autocast:
            adv = generator_adv_loss(loss_kind, D_judge(fake).float())
            recon = reconstruction_loss(config["recon"], fake.float(), truth)
            loss_G = config["recon_weight"] * recon + config["adv_weight"] * adv
        optimizers["G"].zero_grad(set_to_none=True)
        loss_G.backward()
        optimizers["G"].step()
        D.requires_grad_(True)
        if ema:
            update_ema(ema["G"], G, min(config["ema_decay"], (1 + step) / (10 + step)))  # short warm-up
        step, timed = step + 1, timed + 1
        D_x, D_G_y = (s.sigmoid() if loss_kind == "bce" else s for s in (real_scores, fake_scores))  # bce: probability
        accumulate(window, loss_D=loss_D, loss_G=loss_G, recon=recon, adv=adv, D_x=D_x, D_G_y=D_G_y)

        is_log, is_sample, is_ckpt = (step % config[k] == 0 or step == config["max_iters"] for k in INTERVALS)
        if is_log:
            check_finite(window, step, config)
            if master:
                write_log_row(log_path, step, window, time.perf_counter() - t0, timed, config)
            window, t0, timed = {}, time.perf_counter(), 0
        if ema and (is_sample or is_ckpt):  # the averaged weights need batch-norm statistics of their own
            update_bn((draw(idx)[1] for idx in bn_batches), ema["G"])
        if is_sample and master:  # after the loss row, so that its time is not counted as training
            G.eval()
            triplets = torch.stack([fixed_low, upscale(ema or models, fixed_low), fixed_truth], 1)  # input|output|truth
            save_grid(triplets.flatten(0, 1), f"{out_dir}/samples/step_{step:06d}.png", nrow=6, padding=2)
            save_grid(triplets[:10].flatten(0, 1), f"{out_dir}/triplets.png", nrow=3, padding=2)
            if len(test_data):
                write_test_row(log_path, step, ema or models, test_data, config)
            G.train()
            save_progress_strip(out_dir)
        if is_ckpt:
            save_checkpoint(config, step, state, data_gen, window, master)
    if ddp:
        del G_train, D_train  # DDP reducers must go before their process group, or exit can abort
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
