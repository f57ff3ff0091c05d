"""WGAN (Arjovsky et al. 2017, --mode clip) and WGAN-GP (Gulrajani et al. 2017, --mode gp, the default) in one file.
G is dcgan.py's generator; the critic D is its discriminator without the sigmoid, trained to maximise
E[D(x)] - E[D(G(z))] with its weights clipped to [-c, c] or under a gradient penalty. A run writes ckpt.pt,
samples/step_*.png, log.jsonl and config.json to --out_dir.

    python wgan.py                                    # WGAN-GP on the embedded MNIST sample, 32x32
    python wgan.py --mode clip                        # WGAN with weight clipping, RMSprop
    python wgan.py --augment none --ema_decay 0       # the papers' plain training: no augmentation, no averaging
"""
import argparse, copy, io, json, math, os, sys, time, timeit

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn

SCRIPT = "wgan"
CHECKPOINT_FORMAT = 2

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

def to_unit_range(images_uint8):
    """uint8 [0, 255] -> float [-1, 1], the range of the generator's tanh."""
    return images_uint8.float().div(127.5).sub(1.0)

# -----------------------------------------------------------------------------
# Models
def upsample_block(in_ch, out_ch, mode):
    """Double the size: a strided transposed conv, or resize then 3x3 conv (Odena et al. 2016)."""
    if mode == "convtranspose":
        return nn.ConvTranspose2d(in_ch, out_ch, 4, 2, 1, bias=False)
    return nn.Sequential(nn.Upsample(scale_factor=2, mode=mode), nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False))

class Generator(nn.Sequential):
    """z -> image in [-1, 1]: depth blocks of (transposed) conv, batch norm and ReLU, each doubling the size and
    halving the width, then a conv to the image and a tanh. img_size 32, default depth (the DCGAN tables):
    nz -> (ngf*4) x 4 x 4 -> (ngf*2) x 8 x 8 -> ngf x 16 x 16 -> C x 32 x 32"""
    def __init__(self, nz, ngf, channels, img_size, upsample="convtranspose", depth=None):
        depth = depth or int(math.log2(img_size)) - 2
        start, width = img_size // 2 ** depth, ngf * 2 ** (depth - 1)
        layers = [nn.ConvTranspose2d(nz, width, start, 1, 0, bias=False), nn.BatchNorm2d(width), nn.ReLU(True)]
        for _ in range(depth - 1):  # (ngf * 2^(depth-1)) x start x start -> ... -> ngf x (img_size/2) x (img_size/2)
            layers += [upsample_block(width, width // 2, upsample), nn.BatchNorm2d(width // 2), nn.ReLU(True)]
            width //= 2
        super().__init__(nn.Unflatten(1, (nz, 1, 1)), *layers, upsample_block(width, channels, upsample), nn.Tanh())

NORMS = {"batch": nn.BatchNorm2d, "layer": lambda width: nn.GroupNorm(1, width), "none": lambda width: nn.Identity()}

class Critic(nn.Sequential):
    """image -> one unbounded score: a 4x4 stride-2 conv + LeakyReLU, then blocks of conv + norm (batch, layer:
    GroupNorm with one group as in Gulrajani et al.'s code, or none) + LeakyReLU, each halving the size and doubling
    the width, then a conv to the score (the DCGAN discriminator without its sigmoid) or, with depth, a conv to
    1 x 1 + LeakyReLU + linear. img_size 64: C x 64 x 64 -> ndf x 32 x 32 -> ... -> (ndf*8) x 4 x 4 -> 1;
    img_size 32, depth 3: C x 32 x 32 -> ndf x 16 x 16 -> ... -> (ndf*4) x 4 x 4 -> (ndf*4) x 1 x 1 -> 1"""
    def __init__(self, ndf, channels, img_size, depth=None, norm="batch", slope=0.2):
        n_layers = depth or int(math.log2(img_size)) - 2
        layers, width = [nn.Conv2d(channels, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(slope, True)], ndf
        for _ in range(n_layers - 1):  # a norm's offset plays the part of the conv's bias; without one, the conv has it
            layers += [nn.Conv2d(width, 2 * width, 4, 2, 1, bias=norm == "none"), NORMS[norm](2 * width),
                       nn.LeakyReLU(slope, True)]
            width *= 2
        layers.append(nn.Conv2d(width, width if depth else 1, img_size // 2 ** n_layers, 1, 0, bias=False))
        if depth:  # the score from a linear layer
            layers += [nn.LeakyReLU(slope, True), nn.Flatten(), nn.Linear(width, 1)]
        super().__init__(*layers, nn.Flatten(0))

def init_weights(module):
    """N(0, 0.02) for conv and linear weights, N(1, 0.02) for batch-norm scales, zero biases (Radford et al. §4)."""
    batch_norm = isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d))
    if batch_norm or isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 1.0 if batch_norm else 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)

def build_models(config):
    c, s, depth, norm, slope = (config[k] for k in ("channels", "img_size", "depth", "critic_norm", "leaky_slope"))
    G = Generator(config["nz"], config["ngf"], c, s, config["upsample"], depth)
    D = Critic(config["ndf"], c, s, depth, norm, slope)
    return {"G": G.apply(init_weights), "D": D.apply(init_weights)}

def sample_latent(config, n, device, generator=None):
    return torch.randn(n, config["nz"], device=device, generator=generator)

@torch.no_grad()
def generate(models, z, labels=None):
    return models["G"](z).float().add(1).div(2).clamp(0, 1)

# -----------------------------------------------------------------------------
# Losses. The critic maximises E[D(x)] - E[D(G(z))], an estimate of the Wasserstein-1 distance while D is 1-Lipschitz,
# so it minimises the negative (plus the penalty); G minimises -E[D(G(z))].
def critic_loss(real_scores, fake_scores, penalty, gp_weight):
    return fake_scores.mean() - real_scores.mean() + gp_weight * penalty

def generator_loss(fake_scores):
    return -fake_scores.mean()

def gradient_penalty(critic, real, fake, eps=None):
    """E[(||grad critic(x_hat)||_2 - 1)^2] at x_hat = eps x + (1 - eps) G(z) (Gulrajani et al. 2017, eq. 3), one
    eps ~ U(0, 1) per sample, so that x_hat lies on the segment between a real and a generated image."""
    if eps is None:
        eps = torch.rand(real.shape[0], *[1] * (real.dim() - 1), device=real.device)
    x_hat = (eps * real + (1 - eps) * fake.detach()).requires_grad_(True)
    grad, = torch.autograd.grad(critic(x_hat).float().sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(2, dim=1) - 1).pow(2).mean()

# -----------------------------------------------------------------------------
# Training aids that leave the model as defined: augmenting what D sees, and averaging G's weights
def augment_color(x):
    """Random brightness, saturation and contrast, per image (Zhao et al. 2020, DiffAugment)."""
    def rand():
        return torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype)
    x = x + (rand() - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (rand() * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (rand() + 0.5) + mean

def augment_translation(x, ratio=0.125):
    """Shift each image by up to ratio * size pixels; the edge pixels fill the gap (the background on digits)."""
    n, c, h, w = x.shape
    shift = int(h * ratio + 0.5)
    dy, dx = (torch.randint(-shift, shift + 1, (n, 1, 1), device=x.device) for _ in range(2))
    rows = (torch.arange(h, device=x.device).view(1, h, 1) - dy).clamp(0, h - 1)
    cols = (torch.arange(w, device=x.device).view(1, 1, w) - dx).clamp(0, w - 1)
    source = (rows * w + cols).view(n, 1, h * w).expand(n, c, h * w)
    return x.reshape(n, c, h * w).gather(2, source).view(n, c, h, w)

def augment_cutout(x, ratio=0.5):
    """Zero a square of ratio * size pixels at a random place in each image; it may hang over the edge."""
    n, _, h, w = x.shape
    size = int(h * ratio + 0.5)
    top, left = (torch.randint(-(size // 2), h - size // 2, (n, 1, 1), device=x.device) for _ in range(2))
    rows, cols = torch.arange(h, device=x.device).view(1, h, 1), torch.arange(w, device=x.device).view(1, 1, w)
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return x * (~inside).unsqueeze(1).to(x.dtype)

AUGMENTATIONS = {"color": augment_color, "translation": augment_translation, "cutout": augment_cutout}

def diff_augment(x, policy):
    """The same random, differentiable transforms on real and generated images before D sees them (Zhao et al.
    2020, DiffAugment): D cannot memorise a small training set, and G's gradient passes through the transforms."""
    for kind in policy:
        x = AUGMENTATIONS[kind](x)
    return x

def augment_policy(text):
    """'translation,cutout' -> ["translation", "cutout"]; 'none' -> []."""
    policy = [] if text == "none" else text.split(",")
    if any(kind not in AUGMENTATIONS for kind in policy):
        raise argparse.ArgumentTypeError(f"{text}: use none or a comma list of {', '.join(AUGMENTATIONS)}")
    return policy

@torch.no_grad()
def update_ema(ema_model, model, decay):
    """ema <- decay * ema + (1 - decay) * weights, for every parameter."""
    for averaged, current in zip(ema_model.parameters(), model.parameters()):
        averaged.lerp_(current, 1 - decay)

# -----------------------------------------------------------------------------
# Training
def resolve_mode_defaults(config):
    """The flags left unset (None) take the defaults of --mode; a resumed run has them all from its checkpoint.
    clip: Arjovsky et al.'s Alg. 1 (RMSprop has no betas). gp: Gulrajani et al.'s, but for 2 critic updates instead of
    5 and lr 2e-4 instead of 1e-4, which take the digits' FID from about 58 to 34 in the same time (docs/wgan.md)."""
    defaults = {"clip": dict(lr=5e-5, critic_norm="batch", n_critic=5, max_iters=4000),
                "gp": dict(lr=2e-4, beta1=0.0, beta2=0.9, critic_norm="layer", n_critic=2, max_iters=7000)}
    config.update({key: value for key, value in defaults[config["mode"]].items() if config.get(key) is None})
    return config

def get_args(argv=None, defaults=None):
    p = argparse.ArgumentParser(description="Train a WGAN-GP (Gulrajani et al. 2017) or a WGAN (Arjovsky et al. 2017).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--mode", default="gp", choices=["gp", "clip"], help="the critic's Lipschitz constraint")
    p.add_argument("--img_size", type=number(int, 1, 1024), default=32, help="32 or 64; --depth: a multiple of 2^depth")
    p.add_argument("--depth", type=int, choices=range(1, 6), metavar="{1,...,5}", help="G of depth (transposed conv, "
                   "BN, ReLU) blocks, the critic of depth blocks and a linear layer; unset: the DCGAN tables")
    p.add_argument("--nz", type=number(int, 1, 4096), default=100, help="latent size")
    p.add_argument("--ngf", type=number(int, 1, 4096), default=32, help="G's width before its output layer")
    p.add_argument("--ndf", type=number(int, 1, 4096), default=16, help="critic width of its first layer")
    p.add_argument("--upsample", default="convtranspose", choices=["convtranspose", "nearest", "bilinear"],
                   help="how G doubles resolution: transposed conv, or resize then 3x3 conv (Odena et al. 2016)")
    p.add_argument("--leaky_slope", type=FRACTION, default=0.2, help="the critic's LeakyReLU slope")
    p.add_argument("--critic_norm", choices=["batch", "layer", "none"], help="unset: batch (clip), layer (gp)")
    p.add_argument("--clip", type=number(float, 0, low_open=True), default=0.01, help="clip mode: weight bound c")
    p.add_argument("--gp_weight", type=number(float, 0, low_open=True), default=10.0, help="gp mode: penalty weight")
    p.add_argument("--n_critic", type=number(int, 1, 100), help="critic updates per G update; unset: 5 (clip), 2 (gp)")
    p.add_argument("--lr", type=number(float, 0, low_open=True), help="unset: RMSprop 5e-5 (clip), Adam 2e-4 (gp)")
    p.add_argument("--beta1", type=FRACTION, help="gp mode: Adam beta1; unset: 0.0")
    p.add_argument("--beta2", type=FRACTION, help="gp mode: Adam beta2; unset: 0.9")
    p.add_argument("--augment", type=augment_policy, default="translation", help="differentiable augmentation "
                   "of what the critic sees (Zhao et al. 2020): none, or a comma list of color, translation, cutout")
    p.add_argument("--ema_decay", type=FRACTION, default=0.999, help="G's weight average; 0: off")
    defaults = {"sample_interval": 500, "ckpt_interval": 500, **(defaults or {})}
    args = parse_run_flags(p, argv, defaults, batch_size=32, max_iters=None)  # unset: 4000 (clip), 7000 (gp)
    resolve_mode_defaults(vars(args))
    if args.mode == "clip" and (args.beta1 is not None or args.beta2 is not None):
        fail("--beta1/--beta2 set Adam's betas, but --mode clip trains with RMSprop (Arjovsky et al.)")
    if args.mode == "gp" and args.critic_norm == "batch":
        fail("--critic_norm batch couples the samples: --mode gp's per-sample gradient penalty needs layer or none")
    if args.depth and args.img_size % 2 ** args.depth:
        fail(f"--img_size {args.img_size} with --depth {args.depth}: use a multiple of 2^depth = {2 ** args.depth}")
    if not args.depth and args.img_size not in (32, 64):
        fail(f"--img_size {args.img_size} is not supported by the DCGAN networks: use 32 or 64 (or --depth)")
    return args

def main(argv=None):
    config, ckpt = parse_config(get_args, argv)
    device, rank, world = setup_distributed(config)
    data, _ = train_data(config, device)
    local_batch, nz, n_critic = config["batch_size"] // world, config["nz"], config["n_critic"]
    master, gp_mode, policy = rank == 0, config["mode"] == "gp", config["augment"]

    torch.manual_seed(config["seed"])  # the same initial weights on every rank, so the EMA starts from DDP's
    models = {name: m.to(device, memory_format=torch.channels_last) for name, m in build_models(config).items()}
    if rank:  # from here each rank draws its own noise; rank 0 goes on as a single process does
        torch.manual_seed(config["seed"] + rank)
    G, D = models["G"], models["D"]
    optimizers = {name: torch.optim.Adam(m.parameters(), config["lr"], (config["beta1"], config["beta2"])) if gp_mode
                  else torch.optim.RMSprop(m.parameters(), config["lr"]) for name, m in models.items()}
    ema = {"G": copy.deepcopy(G).eval().requires_grad_(False)} if config["ema_decay"] else {}
    data_gen = torch.Generator().manual_seed(config["seed"] + 1000 + rank)
    state = {"models": models, "optimizers": optimizers, "ema": ema}  # what a checkpoint holds and restores
    step, window = restore(ckpt, config, state, data_gen, device)
    trial = [copy.deepcopy(G), copy.deepcopy(D), fixed_randn(config["seed"] + 2, local_batch, nz).to(device)]
    autocast = choose_precision(config, device, lambda: trial[1](trial[0](trial[2])).mean().backward())
    fixed_noise = fixed_randn(config["seed"], 36, nz).to(device)  # the grids' latents
    bn_noise = fixed_randn(config["seed"] + 1, 10, local_batch, nz)  # the EMA generator's batch-norm statistics

    G_train = torch.compile(G) if config["compile"] else G
    # gp: D stays eager, since the penalty differentiates it twice, which a compiled graph cannot
    D_train = torch.compile(D) if config["compile"] and not gp_mode else D
    D_judge = D_train  # D in G's update: outside DDP, since its frozen weights get no gradient there
    if world > 1:  # the penalty's gradient w.r.t. x_hat fires no DDP hook; loss_D.backward() reduces it all
        G_train, D_train = (torch.nn.parallel.DistributedDataParallel(m) for m in (G_train, D_train))
    log_path = prepare_out_dir(config, step) if master else None
    t0, timed = time.perf_counter(), 0
    while step < config["max_iters"]:
        # (1) n_critic critic updates, each on fresh fakes: maximise E[D(x)] - E[D(G(z))] (- lambda * penalty)
        critic_stats = 0
        for critic_step in range(n_critic):
            idx = torch.randint(0, len(data), (local_batch,), generator=data_gen).to(device)
            real = to_unit_range(data[idx]).contiguous(memory_format=torch.channels_last)  # faster convs
            with autocast, torch.set_grad_enabled(critic_step == n_critic - 1):  # the last fakes feed G's update
                fake = G_train(torch.randn(local_batch, nz, device=device))
            with autocast:
                real_seen, fake_seen = diff_augment(real, policy), diff_augment(fake.detach(), policy)
                real_scores, fake_scores = D_train(real_seen).float(), D_train(fake_seen).float()
                # on interpolates of the images the critic sees, augmented as they are
                penalty = gradient_penalty(D_train, real_seen, fake_seen) if gp_mode else torch.zeros((), device=device)
                loss_D = critic_loss(real_scores, fake_scores, penalty, config["gp_weight"])
            optimizers["D"].zero_grad(set_to_none=True)
            loss_D.backward()
            optimizers["D"].step()
            if not gp_mode:  # clip every weight, batch norm's too (Arjovsky et al. Alg. 1)
                for p in D.parameters():
                    p.data.clamp_(-config["clip"], config["clip"])
            wasserstein = real_scores.mean() - fake_scores.mean()  # the critic's estimate of the distance
            critic_stats = critic_stats + torch.stack([loss_D, wasserstein, penalty]).detach() / n_critic

        # (2) Update G on the last fakes: maximise E[D(G(z))]; D is frozen, the gradient only passes through it
        D.requires_grad_(False)
        with autocast:
            loss_G = generator_loss(D_judge(diff_augment(fake, policy)).float())
        optimizers["G"].zero_grad(set_to_none=True)
        loss_G.backward()
        optimizers["G"].step()
        D.requires_grad_(True)
        if ema:
            update_ema(ema["G"], G, min(config["ema_decay"], (1 + step) / (10 + step)))  # short warm-up
        step, timed = step + 1, timed + 1
        accumulate(window, **dict(zip(("loss_D", "wasserstein", "gp"), critic_stats)), loss_G=loss_G)

        is_log, is_sample, is_ckpt = (step % config[k] == 0 or step == config["max_iters"] for k in INTERVALS)
        if is_log:
            check_finite(window, step, config)
            if master:  # images_per_s: those through the critic, n_critic batches a step
                write_log_row(log_path, step, window, time.perf_counter() - t0, timed,
                              {**config, "batch_size": n_critic * config["batch_size"]})
            window, t0, timed = {}, time.perf_counter(), 0
        if ema and (is_sample or is_ckpt):  # the averaged weights need batch-norm statistics of their own
            update_bn(bn_noise.to(device), ema["G"])
        if is_sample and master:
            G.eval()
            save_grid(generate(ema or models, fixed_noise), f"{config['out_dir']}/samples/step_{step:06d}.png", nrow=6)
            G.train()
        if is_ckpt:
            save_checkpoint(config, step, state, data_gen, window, master)
    if world > 1:
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
