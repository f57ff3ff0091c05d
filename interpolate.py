"""Pictures of a generator's latent space, from any checkpoint of the model scripts.

    python interpolate.py --ckpt out/dcgan/ckpt.pt                    # pairs + traversals
    python interpolate.py --ckpt out/dcgan/ckpt.pt --mode pairs --steps 10 --extrapolate 3 --method slerp
    python interpolate.py --ckpt out/vae/ckpt.pt --mode pixel --steps 11   # latent vs pixel space, a = 0, 0.1, ..., 1
    python interpolate.py --ckpt out/cgan/ckpt.pt --mode classes      # the same noise under every class
    python interpolate.py --ckpt out/infogan/ckpt.pt --mode codes     # InfoGAN: each code varied, noise fixed per row

Modes (default --mode all: every one that applies to the checkpoint):
  pairs     one row per random pair (z0, z1), columns z(t) for t = i / (steps - 1), i = -E .. steps - 1 + E
            (the MNIST homework's interpolation question; --extrapolate E adds E steps of the same size
            beyond both ends, as that homework asks too)
  traverse  one row per latent dimension in --dims, which takes --steps values over [-range, range]
            while all other dimensions keep the values of one random z (the 2018 image-generation assignment's traversals)
  pixel     VAEs: for pairs of test images x0, x1 with posterior means z0, z1, decode(z(t)) above
            (1 - t) x0 + t x1 (the 2018 image-generation assignment's latent vs pixel comparison)
  classes   conditional models: one column per noise vector, one row per class (DLCV (2018) HW4, problem 3)
  codes     InfoGAN: per categorical code, its categories across the columns; per continuous code,
            --steps values over [-code_range, code_range]; one noise (and other codes) per row (DLCV (2018) HW4, bonus)

Every grid is a PNG in --out_dir (default: the checkpoint's folder + /interpolations) with the column values
on top and the row names on the left; the paths are printed.
"""
import argparse
import math
import os
import sys

import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from torchvision.utils import make_grid

from evaluate import OneLineParser, import_script, load_checkpoint, load_models, resolve_device

MODES = ("pairs", "traverse", "pixel", "classes", "codes")
PAD = 2  # pixels of white between grid cells
MIN_CELL = 64  # cells are upscaled (nearest) by an integer factor to at least this many pixels


# -----------------------------------------------------------------------------
# Interpolation maths. z0, z1: (..., D); t: a float or a tensor broadcasting against (..., 1).


def lerp(z0, z1, t):
    """(1 - t) z0 + t z1; written this way (not z0 + t (z1 - z0)) so that t = 0 and t = 1 give z0 and z1 bit for bit."""
    return (1 - t) * z0 + t * z1


def slerp(z0, z1, t, eps=1e-6):
    """Spherical interpolation: the direction turns along the great circle from z0 to z1 at constant angular
    speed, the norm goes linearly from |z0| to |z1|. Between two points of one sphere this is the usual
    slerp (White 2016) and stays on the sphere. t outside [0, 1] continues around the circle (the norm is
    clamped at 0). Where the angle is ~0 or ~180 degrees (or a norm is 0) the great circle is undefined or
    not unique, and lerp is used instead.
    """
    n0, n1 = z0.norm(dim=-1, keepdim=True), z1.norm(dim=-1, keepdim=True)
    omega = torch.acos(((z0 * z1).sum(-1, keepdim=True) / (n0 * n1)).clamp(-1, 1))
    sin = torch.sin(omega)
    norm = ((1 - t) * n0 + t * n1).clamp(min=0)
    # coefficients of z0 and z1: exactly 1 and 0 at t = 0, 0 and 1 at t = 1
    c0 = norm * torch.sin((1 - t) * omega) / (sin * n0)
    c1 = norm * torch.sin(t * omega) / (sin * n1)
    return torch.where(sin > eps, c0 * z0 + c1 * z1, lerp(z0, z1, t))


def interpolation_coefficients(steps, extrapolate=0):
    """t_i = i / (steps - 1) for i = -extrapolate .. steps - 1 + extrapolate: steps points from 0 to 1
    (the MNIST homework's z1 + i/K (z2 - z1) with K = steps - 1), plus `extrapolate` points of the same spacing beyond each end."""
    if steps < 2:
        raise ValueError(f"--steps {steps}: need at least 2 points to interpolate")
    return [i / (steps - 1) for i in range(-extrapolate, steps + extrapolate)]


def interpolate(z0, z1, ts, method):
    """(P, D), (P, D), T coefficients -> (P, T, D)."""
    t = torch.tensor(ts, dtype=z0.dtype, device=z0.device).view(1, -1, 1)
    fn = slerp if method == "slerp" else lerp
    return fn(z0[:, None], z1[:, None], t)


def noise_mask(module, config, latent_dim, device):
    """True on the dimensions of z that are noise; InfoGAN's codes are not interpolated or traversed by default."""
    mask = torch.zeros(latent_dim, dtype=torch.bool, device=device)
    if not hasattr(module, "latent_layout"):
        return mask.fill_(True)
    for part in module.latent_layout(config):
        if part["kind"] == "noise":
            mask[part["start"]:part["start"] + part["size"]] = True
    return mask


# -----------------------------------------------------------------------------
# The grids. Each returns {"name", "images": (rows, cols, C, H, W) in [0, 1], "rows": [...], "cols": [...],
# "title", "latents": (rows, cols, D) the images were made from (pixel mode: none)}.


def class_names(config):
    return list(config.get("class_names") or range(config.get("n_classes", 0)))


def random_labels(config, n, device, g):
    if not config.get("n_classes"):
        return None
    return torch.randint(0, config["n_classes"], (n,), device=device, generator=g)


def generate_grid(module, models, z, labels=None):
    """z: (R, Cols, D), labels (R, Cols) or None -> images (R, Cols, C, H, W).

    One generate call per column: the t = 0 column of a pairs grid is then exactly generate(z0) (on CPU,
    convolutions may round differently for other batch sizes, so one big batch would not be bit-identical).
    """
    columns = [module.generate(models, z[:, j], None if labels is None else labels[:, j]) for j in range(z.shape[1])]
    return torch.stack(columns, 1)


def pairs_grid(module, models, config, args, g):
    z0 = module.sample_latent(config, args.pairs, args.device, generator=g)
    z1 = module.sample_latent(config, args.pairs, args.device, generator=g)
    mask = noise_mask(module, config, z0.shape[1], z0.device)
    z1 = torch.where(mask, z1, z0)  # codes (InfoGAN) stay those of z0: only the noise moves
    ts = interpolation_coefficients(args.steps, args.extrapolate)
    z = z0[:, None].repeat(1, len(ts), 1)
    z[:, :, mask] = interpolate(z0[:, mask], z1[:, mask], ts, args.method)
    labels = random_labels(config, args.pairs, z.device, g)
    rows = [f"pair {p}" for p in range(args.pairs)]
    if labels is not None:
        rows = [f"{r}: class {class_names(config)[c]}" for r, c in zip(rows, labels.tolist())]
        labels = labels[:, None].expand(-1, len(ts))
    ext = f", {args.extrapolate} extrapolated beyond each end" if args.extrapolate else ""
    return {"name": f"pairs_{args.method}", "images": generate_grid(module, models, z, labels), "rows": rows,
            "cols": [f"{t:.2f}" for t in ts], "title": f"{args.method} from z0 (t=0) to z1 (t=1){ext}", "latents": z}


def parse_dims(text, default_count, latent_dim):
    if text is None:
        return list(range(min(8, default_count)))
    try:
        dims = [int(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise ValueError(f"--dims {text}: give comma-separated dimension numbers, e.g. 0,1,2") from None
    bad = [d for d in dims if not 0 <= d < latent_dim]
    if bad or not dims:
        raise ValueError(f"--dims {text}: the latent has dimensions 0..{latent_dim - 1}")
    return dims


def traverse_grid(module, models, config, args, g):
    base = module.sample_latent(config, 1, args.device, generator=g)
    mask = noise_mask(module, config, base.shape[1], base.device)
    dims = parse_dims(args.dims, int(mask.sum()), base.shape[1])
    values = torch.linspace(-args.range, args.range, args.steps, device=base.device)
    z = base.repeat(len(dims), args.steps, 1)
    for row, d in enumerate(dims):
        z[row, :, d] = values
    labels = random_labels(config, 1, z.device, g)
    title = f"one z, dimension varied over [-{args.range:g}, {args.range:g}]"
    if labels is not None:
        title += f", class {class_names(config)[labels.item()]}"
        labels = labels.expand(len(dims) * args.steps).view(len(dims), args.steps)
    return {"name": "traverse", "images": generate_grid(module, models, z, labels), "rows": [f"z[{d}]" for d in dims],
            "cols": [f"{v:+.2f}" for v in values.tolist()], "title": title, "latents": z}


def pixel_grid(module, models, config, args, g):
    images, _ = module.real_images(config, "test")
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))[:2 * args.pairs]
    if len(pick) < 2 * args.pairs:
        raise ValueError(f"--pairs {args.pairs}: the test split has only {len(images)} images")
    x = images[pick].to(args.device).float().div(255)
    x0, x1 = x[:args.pairs], x[args.pairs:]
    with torch.no_grad():
        z0, z1 = module.encode(models, x0)[0], module.encode(models, x1)[0]  # posterior means
    ts = interpolation_coefficients(args.steps, args.extrapolate)
    latent = generate_grid(module, models, interpolate(z0, z1, ts, args.method))
    pixel = interpolate(x0.flatten(1), x1.flatten(1), ts, "lerp").clamp(0, 1).view(args.pairs, len(ts), *x.shape[1:])
    grid = torch.stack([latent, pixel], 1).flatten(0, 1)  # rows: latent 0, pixel 0, latent 1, pixel 1, ...
    rows = [f"{kind} {p}" for p in range(args.pairs) for kind in ("latent", "pixel")]
    return {"name": "pixel", "images": grid, "rows": rows, "cols": [f"{t:.2f}" for t in ts],
            "title": f"decode({args.method} of the means) vs (1-t) x0 + t x1"}


def classes_grid(module, models, config, args, g):
    names = class_names(config)
    z = module.sample_latent(config, args.n_noise, args.device, generator=g)
    z = z[None].expand(len(names), -1, -1)
    labels = torch.arange(len(names), device=z.device)[:, None].expand(-1, args.n_noise)
    return {"name": "classes", "images": generate_grid(module, models, z, labels), "rows": [str(n) for n in names],
            "cols": [f"z{j}" for j in range(args.n_noise)], "title": "the same noise (column) under every class (row)",
            "latents": z}


def code_grids(module, models, config, args, g):
    grids = []
    for part in module.latent_layout(config):
        if part["kind"] == "noise":
            continue
        z = module.sample_latent(config, args.n_noise, args.device, generator=g)  # noise and other codes: one per row
        s, n = part["start"], part["size"]
        if part["kind"] == "categorical":
            z = z[:, None].repeat(1, n, 1)
            z[:, :, s:s + n] = torch.eye(n, device=z.device)
            cols, title = [f"c={j}" for j in range(n)], f"categorical code {part['name']}: one category per column"
        else:
            values = torch.linspace(-args.code_range, args.code_range, args.steps, device=z.device)
            z = z[:, None].repeat(1, args.steps, 1)
            z[:, :, s] = values
            cols = [f"{v:+.2f}" for v in values.tolist()]
            title = f"continuous code {part['name']} over [-{args.code_range:g}, {args.code_range:g}] (trained on [-1, 1])"
        grids.append({"name": f"code_{part['name']}", "images": generate_grid(module, models, z),
                      "rows": [f"z{i}" for i in range(args.n_noise)], "cols": cols, "title": title, "latents": z})
    return grids


def applicable_modes(module, config):
    modes = ["pairs", "traverse"]
    if hasattr(module, "encode") and hasattr(module, "real_images"):
        modes.append("pixel")
    if config.get("n_classes"):
        modes.append("classes")
    if hasattr(module, "latent_layout") and any(p["kind"] != "noise" for p in module.latent_layout(config)):
        modes.append("codes")
    return modes


# -----------------------------------------------------------------------------
# Drawing: the image grid with column headers on top and row names on the left


def load_font(size=12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def render_grid(grid, font=None):
    """-> (PIL image, layout): layout gives rows, cols, cell, pad and the grid's top-left corner (left, top)."""
    font = font or load_font()
    images = grid["images"].float().cpu()
    rows, cols, channels, h, w = images.shape
    scale = max(1, math.ceil(MIN_CELL / max(h, w)))
    cells = images.flatten(0, 1).repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    if channels == 1:
        cells = cells.expand(-1, 3, -1, -1)
    body = make_grid(cells, nrow=cols, padding=PAD, pad_value=1.0)
    body = Image.fromarray(body.mul(255).add(0.5).clamp(0, 255).byte().permute(1, 2, 0).numpy())

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    def size(text):
        box = measure.textbbox((0, 0), text, font=font)
        return box[2] - box[0], box[3] - box[1]
    line = size("Ag")[1] + 6
    cell_h, cell_w = h * scale, w * scale
    left = max(size(r)[0] for r in grid["rows"]) + 10
    title_h = line if grid.get("title") else 0
    top = title_h + line
    overhang = max(0, max(size(c)[0] for c in grid["cols"]) - cell_w) // 2 + 4
    width = max(left + body.width + overhang, size(grid.get("title", ""))[0] + 10)
    canvas = Image.new("RGB", (width, top + body.height), "white")
    canvas.paste(body, (left, top))
    draw = ImageDraw.Draw(canvas)
    if title_h:
        draw.text((5, 3), grid["title"], fill="black", font=font)
    for j, text in enumerate(grid["cols"]):
        x = left + PAD + j * (cell_w + PAD) + (cell_w - size(text)[0]) // 2
        draw.text((x, title_h + 2), text, fill="black", font=font)
    for i, text in enumerate(grid["rows"]):
        y = top + PAD + i * (cell_h + PAD) + (cell_h - size(text)[1]) // 2
        draw.text((left - 6 - size(text)[0], y), text, fill="black", font=font)
    layout = {"rows": rows, "cols": cols, "cell_h": cell_h, "cell_w": cell_w, "pad": PAD, "left": left, "top": top}
    return canvas, layout


def save_grid(grid, out_dir):
    image, layout = render_grid(grid)
    info = PngInfo()
    for key, value in layout.items():  # where the grid is, for anyone cutting cells out of the PNG
        info.add_text(key, str(value))
    path = os.path.join(out_dir, grid["name"] + ".png")
    image.save(path + ".tmp.png", pnginfo=info)
    os.replace(path + ".tmp.png", path)
    return path


# -----------------------------------------------------------------------------


def get_args(argv=None):
    p = OneLineParser(prog="interpolate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint of a model script (ckpt.pt)")
    p.add_argument("--mode", default="all", help=f"comma-separated subset of {','.join(MODES)}, or all (those that apply)")
    p.add_argument("--pairs", type=int, default=5, help="pairs: rows (random latent pairs); pixel: pairs of test images")
    p.add_argument("--steps", type=int, default=10, help="points from t=0 to t=1 (pairs, pixel), values of a traversal or continuous code")
    p.add_argument("--method", default="lerp", choices=["lerp", "slerp"], help="linear or spherical interpolation of the latents")
    p.add_argument("--extrapolate", type=int, default=0, metavar="E", help="pairs, pixel: E more points of the same spacing beyond each end")
    p.add_argument("--dims", default=None, help="traverse: comma-separated latent dimensions (default the first 8 noise dimensions)")
    p.add_argument("--range", type=float, default=3.0, help="traverse: each dimension goes over [-range, range]")
    p.add_argument("--n_noise", type=int, default=10, help="classes: columns (noise vectors); codes: rows")
    p.add_argument("--code_range", type=float, default=2.0, help="codes: continuous codes go over [-code_range, code_range]")
    p.add_argument("--seed", type=int, default=0, help="seed of the latents and of the test images picked")
    p.add_argument("--out_dir", default=None, help="where the PNGs go (default: the checkpoint's folder/interpolations)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    args = p.parse_args(argv)
    for flag in ("pairs", "n_noise"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    if args.steps < 2:
        p.error("--steps must be at least 2")
    if args.extrapolate < 0:
        p.error("--extrapolate must be 0 or more")
    return args


def make_grids(module, models, config, args):
    """Every grid --mode asks for, each from its own seeded stream of latents."""
    if not (hasattr(module, "sample_latent") and hasattr(module, "generate")):
        raise ValueError(f"{config.get('script', 'this')}.py has no latent space to draw (no sample_latent/generate)")
    available = applicable_modes(module, config)
    modes = available if args.mode == "all" else [m.strip() for m in args.mode.split(",") if m.strip()]
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"--mode {mode}: choose from {', '.join(MODES)} or all")
        if mode not in available:
            need = {"pixel": "a VAE (encode)", "classes": "a class-conditional model (ACGAN)",
                    "codes": "a model with latent codes (InfoGAN)"}[mode]
            raise ValueError(f"--mode {mode} needs {need}; this {config.get('script', 'checkpoint')} allows {', '.join(available)}")
    builders = {"pairs": pairs_grid, "traverse": traverse_grid, "pixel": pixel_grid, "classes": classes_grid, "codes": code_grids}
    grids = []
    for mode in modes:
        g = torch.Generator(device=args.device).manual_seed(args.seed)
        made = builders[mode](module, models, config, args, g)
        grids += made if isinstance(made, list) else [made]
    return grids


def make_out_dir(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OSError(f"--out_dir {path}: cannot create it ({e})") from None


def main(argv=None):
    args = get_args(argv)
    try:
        args.device = resolve_device(args.device)
        ckpt = load_checkpoint(args.ckpt)
        module = import_script(ckpt["script"])
        models = load_models(module, ckpt, args.ckpt, args.device)
        config = {**ckpt["config"], "script": ckpt["script"]}
        with torch.no_grad():
            grids = make_grids(module, models, config, args)
        out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "interpolations")
        make_out_dir(out_dir)
        for grid in grids:
            print(save_grid(grid, out_dir))
    except (OSError, ValueError) as e:
        print(f"interpolate.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
