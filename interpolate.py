"""Pictures of a generator's latent space, from any checkpoint of the model scripts.

    python interpolate.py --ckpt out/dcgan/ckpt.pt                    # pairs + traversals
    python interpolate.py --ckpt out/dcgan/ckpt.pt --mode pairs --steps 10 --extrapolate 3 --method slerp
    python interpolate.py --ckpt out/wgan/ckpt.pt --mode pixel --steps 11  # latent vs pixel space, a = 0, 0.1, ..., 1
    python interpolate.py --compare out/dcgan_nearest/ckpt.pt out/dcgan_bilinear/ckpt.pt  # same noise, each model
    python interpolate.py --ckpt out/cgan/ckpt.pt --mode classes      # the same noise under every class
    python interpolate.py --ckpt out/infogan/ckpt.pt --mode codes     # InfoGAN: each code varied, noise fixed per row
    python interpolate.py --ckpt out/dcgan/ckpt.pt --gif               # also pairs_lerp.gif, ...: one frame per column
    python interpolate.py --movie out/dcgan              # out/dcgan/training.gif and curves.png

Modes (default --mode all: every grid that applies to the checkpoint, all but latents):
  pairs     one row per random pair (z0, z1), columns z(t) for t = i / (steps - 1), i = -E .. steps - 1 + E
            (--extrapolate E adds E steps of the same size beyond both ends)
  traverse  one row per latent dimension in --dims, which takes --steps values over [-range, range]
            while all other dimensions keep the values of one random z
  pixel     for random pairs (z0, z1) and their images x0 = G(z0), x1 = G(z1): G(z(t)) above (1 - t) x0 + t x1;
            --endpoints test (VAEs) takes z0, z1 as the posterior means of test images
  classes   conditional models: one column per noise vector, one row per class
  codes     InfoGAN: per categorical code, its categories across the columns; per continuous code,
            --steps values over [-code_range, code_range]; one noise (and other codes) per row
  latents   models with an encoder (VAE): latents.png, a 2-D map of the test images' posterior means coloured by
            label: t-SNE (scikit-learn), or --projection pca

Every grid is a PNG in --out_dir (default: the checkpoint's folder + /interpolations) with the column values
on top and the row names on the left; the paths are printed. --gif also draws each grid as an animation, one frame
per column, the rows stacked (classes: the noise walks from column to column, --steps points each).

--movie RUN draws a run's pictures over training instead, in RUN (or --out_dir), at any time during or after it:
training.gif, the grids RUN/samples/step_*.png in step order, each under a line naming its step, and curves.png,
every number of RUN/log.jsonl against the step (one panel per name before its first "_": loss_D with loss_G).

--compare CKPT CKPT ... draws one grid instead, compare.png (default: in the folder that holds the first run's
folder): the same --n_noise latents through every checkpoint, one row each, named by its run folder, the flags
that differ between the runs and the FID of the evaluate.py --json file beside it (--fid_json, default
evaluate.json, the name bench.py uses). Which course assignment asks for which grid: docs/interpolation.md.
"""
import argparse
import json
import math
import os
import re
import sys

import torch
from PIL import Image, ImageChops, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from torchvision.utils import make_grid

from evaluate import OneLineParser, import_script, load_checkpoint, load_models, real_data, resolve_device

MODES = ("pairs", "traverse", "pixel", "classes", "codes", "latents")
# flags that do not change the model, left out of --compare's row names
MAX_FLAGS_SHOWN = 4
BOOKKEEPING = {"out_dir", "data_dir", "resume", "device", "dtype", "compile", "log_interval", "sample_interval",
               "ckpt_interval"}
PAD = 2  # pixels of white between grid cells
MIN_CELL = 64  # cells are upscaled (nearest) by an integer factor to at least this many pixels
MAX_CELLS = Image.MAX_IMAGE_PIXELS // MIN_CELL ** 2  # a larger grid is a PNG that Pillow refuses to open

# -----------------------------------------------------------------------------
# Interpolation maths. z0, z1: (..., D); t: a float or a tensor broadcasting against (..., 1).
def lerp(z0, z1, t):
    """(1 - t) z0 + t z1; written this way (not z0 + t (z1 - z0)) so that t = 0 and t = 1 give z0 and z1 bit for bit."""
    return (1 - t) * z0 + t * z1

def slerp(z0, z1, t, eps=1e-6):
    """Spherical interpolation (White 2016): the direction turns along the great circle from z0 to z1 at constant
    angular speed, the norm goes linearly from |z0| to |z1| (clamped at 0 beyond the ends). Where the angle is ~0 or
    ~180 degrees, or a norm is 0, the circle is undefined or not unique: lerp instead."""
    n0, n1 = z0.norm(dim=-1, keepdim=True), z1.norm(dim=-1, keepdim=True)
    omega = torch.acos(((z0 * z1).sum(-1, keepdim=True) / (n0 * n1)).clamp(-1, 1))
    sin = torch.sin(omega)
    norm = ((1 - t) * n0 + t * n1).clamp(min=0)
    # coefficients of z0 and z1: exactly 1 and 0 at t = 0, 0 and 1 at t = 1
    c0 = norm * torch.sin((1 - t) * omega) / (sin * n0)
    c1 = norm * torch.sin(t * omega) / (sin * n1)
    return torch.where(sin > eps, c0 * z0 + c1 * z1, lerp(z0, z1, t))

def interpolation_coefficients(steps, extrapolate=0):
    """t_i = i / (steps - 1) for i = -extrapolate .. steps - 1 + extrapolate: steps points from 0 to 1, plus
    `extrapolate` points of the same spacing beyond each end."""
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

def check_cells(rows, cols):
    """Refuse before generating a grid that is too large to draw."""
    if rows * cols > MAX_CELLS:
        raise ValueError(f"a grid of {rows:,} x {cols:,} images is more than Pillow opens ({MAX_CELLS:,} cells of "
                         f"{MIN_CELL}x{MIN_CELL}); lower --pairs, --steps, --extrapolate or --n_noise")

def generate_grid(module, models, z, labels=None):
    """z: (R, Cols, D), labels (R, Cols) or None -> images (R, Cols, C, H, W). One generate call per column, so the
    t = 0 column is exactly generate(z0): CPU convolutions may round differently for other batch sizes."""
    columns = [module.generate(models, z[:, j], None if labels is None else labels[:, j]) for j in range(z.shape[1])]
    return torch.stack(columns, 1)

def endpoint_latents(module, models, config, args, g):
    """--pairs pairs (z0, z1): random draws, or (--endpoints test, VAEs) the posterior means of 2 x pairs test
    images."""
    if args.endpoints == "random":
        return (module.sample_latent(config, args.pairs, args.device, generator=g),
                module.sample_latent(config, args.pairs, args.device, generator=g))
    images, _ = real_data(module, config, "test")
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))[:2 * args.pairs]
    if len(pick) < 2 * args.pairs:
        raise ValueError(f"--pairs {args.pairs}: the test split has only {len(images)} images")
    mu = module.encode(models, images[pick].to(args.device).float().div(255))[0]
    return mu[:args.pairs], mu[args.pairs:]

def latent_paths(module, models, config, args, g):
    """z(t) from z0 to z1 for each pair: (z (P, T, D), the t's, class labels (P, T) or None, the row names).
    Only the noise moves: InfoGAN's codes stay those of z0; an ACGAN row keeps one random class."""
    check_cells(2 * args.pairs, args.steps + 2 * args.extrapolate)  # pixel mode: two rows per pair
    z0, z1 = endpoint_latents(module, models, config, args, g)
    mask = noise_mask(module, config, z0.shape[1], z0.device)
    z1 = torch.where(mask, z1, z0)
    ts = interpolation_coefficients(args.steps, args.extrapolate)
    z = z0[:, None].repeat(1, len(ts), 1)
    z[:, :, mask] = interpolate(z0[:, mask], z1[:, mask], ts, args.method)
    labels = random_labels(config, args.pairs, z.device, g)
    names = [str(p) for p in range(args.pairs)]
    if labels is not None:
        names = [f"{n}: class {class_names(config)[c]}" for n, c in zip(names, labels.tolist())]
        labels = labels[:, None].expand(-1, len(ts))
    return z, ts, labels, names

def pairs_grid(module, models, config, args, g):
    z, ts, labels, names = latent_paths(module, models, config, args, g)
    ext = f", {args.extrapolate} extrapolated beyond each end" if args.extrapolate else ""
    return {"name": f"pairs_{args.method}", "images": generate_grid(module, models, z, labels),
            "rows": [f"pair {n}" for n in names],
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
    check_cells(len(dims), args.steps)
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
    """x0 = G(z0) and x1 = G(z1), then G(z(t)) above (1 - t) x0 + t x1: both rows start on x0 and end on x1."""
    z, ts, labels, names = latent_paths(module, models, config, args, g)
    latent = generate_grid(module, models, z, labels)
    first, last = args.extrapolate, args.extrapolate + args.steps - 1  # the columns of t = 0 and t = 1
    x0, x1 = latent[:, first], latent[:, last]
    t = torch.tensor(ts, dtype=x0.dtype, device=x0.device).view(1, -1, 1, 1, 1)
    pixel = lerp(x0[:, None], x1[:, None], t).clamp(0, 1)  # clamped where t extrapolates
    grid = torch.stack([latent, pixel], 1).flatten(0, 1)  # rows: latent 0, pixel 0, latent 1, pixel 1, ...
    rows = [f"{kind} {n}" for n in names for kind in ("latent", "pixel")]
    return {"name": "pixel", "images": grid, "rows": rows, "cols": [f"{t:.2f}" for t in ts],
            "title": f"G({args.method} of z0, z1) vs (1-t) G(z0) + t G(z1)"}

def classes_grid(module, models, config, args, g):
    names = class_names(config)
    check_cells(len(names), args.n_noise)
    z = module.sample_latent(config, args.n_noise, args.device, generator=g)
    z = z[None].expand(len(names), -1, -1)
    labels = torch.arange(len(names), device=z.device)[:, None].expand(-1, args.n_noise)
    grid = {"name": "classes", "images": generate_grid(module, models, z, labels), "rows": [str(n) for n in names],
            "cols": [f"z{j}" for j in range(args.n_noise)], "title": "the same noise (column) under every class (row)",
            "latents": z}
    if args.gif:  # the columns are no path: the GIF walks from each column's noise to the next, --steps points each
        ts = interpolation_coefficients(args.steps)[:-1]
        walk = interpolate(z[0], z[0].roll(-1, 0), ts, args.method).flatten(0, 1)[None].expand(len(names), -1, -1)
        grid["walk"] = {**grid, "images": generate_grid(module, models, walk, labels[:, :1].expand(-1, walk.shape[1])),
                        "cols": [f"z{j + t:.2f}" for j in range(args.n_noise) for t in ts]}
    return grid

def code_grids(module, models, config, args, g):
    grids = []
    for part in module.latent_layout(config):
        if part["kind"] == "noise":
            continue
        s, n = part["start"], part["size"]
        check_cells(args.n_noise, n if part["kind"] == "categorical" else args.steps)
        z = module.sample_latent(config, args.n_noise, args.device, generator=g)  # noise and other codes: one per row
        if part["kind"] == "categorical":
            z = z[:, None].repeat(1, n, 1)
            z[:, :, s:s + n] = torch.eye(n, device=z.device)
            cols, title = [f"c={j}" for j in range(n)], f"categorical code {part['name']}: one category per column"
        else:
            values = torch.linspace(-args.code_range, args.code_range, args.steps, device=z.device)
            z = z[:, None].repeat(1, args.steps, 1)
            z[:, :, s] = values
            cols = [f"{v:+.2f}" for v in values.tolist()]
            title = (f"continuous code {part['name']} over [-{args.code_range:g}, {args.code_range:g}] "
                     "(trained on [-1, 1])")
        grids.append({"name": f"code_{part['name']}", "images": generate_grid(module, models, z),
                      "rows": [f"z{i}" for i in range(args.n_noise)], "cols": cols, "title": title, "latents": z})
    return grids

def applicable_modes(module, config):
    modes = []
    if hasattr(module, "sample_latent") and hasattr(module, "generate"):
        modes += ["pairs", "traverse", "pixel"] + ["classes"] * bool(config.get("n_classes"))
        if hasattr(module, "latent_layout") and any(p["kind"] != "noise" for p in module.latent_layout(config)):
            modes.append("codes")
    return modes + ["latents"] * hasattr(module, "encode")

def run_label(path, config, differing, fid_json):
    """A --compare row name: the run's folder, its values of the flags that differ between the runs, and the FID
    that evaluate.py --json wrote beside the checkpoint (with its step when it is not the checkpoint's)."""
    folder = os.path.dirname(os.path.abspath(path))
    parts = [os.path.basename(folder)] + [f"{k}={config.get(k)}" for k in differing]
    report_path = os.path.join(folder, fid_json)
    if not os.path.exists(report_path):
        return ", ".join(parts)
    try:
        with open(report_path) as f:
            report = json.load(f)
        fid, step = report["metrics"].get("fid"), report.get("source", {}).get("step")
    except (OSError, ValueError, KeyError, AttributeError):
        raise ValueError(f"{report_path} is not an evaluate.py --json report") from None
    if isinstance(fid, (int, float)):  # a report without the fid row (--metrics kid, say) names no FID
        parts.append(f"FID {fid:.1f}" + (f" (step {step})" if step != config.get("step") else ""))
    return ", ".join(parts)

def compare_grid(args):
    """The same latents through several checkpoints, one row each (the 2018 image-generation assignment, section 3:
    the upsampling schemes side by side). An ACGAN draws the classes 0, 1, 2, ... along the row."""
    check_cells(len(args.compare), args.n_noise)
    runs = []
    for path in args.compare:
        ckpt = load_checkpoint(path)
        module = import_script(ckpt["script"], args.script)
        if not (hasattr(module, "sample_latent") and hasattr(module, "generate")):
            raise ValueError(f"--compare {path}: {ckpt['script']}.py has no latent space to draw")
        config = {**ckpt["config"], "step": ckpt.get("step")}
        runs.append((path, module, load_models(module, ckpt, args.device, path), config))
    latents = [module.sample_latent(config, args.n_noise, args.device,
                                    generator=torch.Generator(device=args.device).manual_seed(args.seed))
               for _, module, _, config in runs]
    images = [module.generate(models, z) for (_, module, models, _), z in zip(runs, latents)]
    sizes = [(z.shape[1], tuple(x.shape[1:])) for z, x in zip(latents, images)]
    if len(set(sizes)) > 1:
        raise ValueError("--compare: the same noise cannot go through checkpoints of different latent or image sizes ("
                         + "; ".join(f"{run[0]}: latent {n}, images {shape}" for run, (n, shape) in zip(runs, sizes))
                         + ")")
    configs = [run[3] for run in runs]
    shared = set.intersection(*(set(c) for c in configs)) - BOOKKEEPING - {"step"}
    differing = sorted(k for k in shared if len({json.dumps(c[k], sort_keys=True) for c in configs}) > 1)
    differing = differing[:MAX_FLAGS_SHOWN]
    rows = [run_label(path, config, differing, args.fid_json) for path, _, _, config in runs]
    return {"name": "compare", "images": torch.stack(images), "rows": rows,
            "cols": [f"z{j}" for j in range(args.n_noise)],
            "title": "the same noise (column) through each checkpoint (row)"}

# -----------------------------------------------------------------------------
# latents: the 2-D map of a VAE's posterior means (DLCV (2018) HW4, problem 1)
def latent_map(points, method="tsne"):
    """2-D embedding of (N, L) points and its name: t-SNE through scikit-learn, or PCA. Without scikit-learn,
    t-SNE falls back to PCA, saying so."""
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError:
            print("interpolate.py: scikit-learn is not installed: latents.png is a PCA map "
                  "(pip install scikit-learn for t-SNE)", file=sys.stderr)
            method = "pca"
    if method == "pca":
        centred = points - points.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        return centred @ v[:2].T, "PCA"
    tsne = TSNE(2, perplexity=min(30.0, (len(points) - 1) / 3), init="pca", random_state=0)
    return torch.from_numpy(tsne.fit_transform(points.numpy())), "t-SNE"

def map_labels(labels, config, attr):
    """One integer per image for the latent map, and its name: the class, or one attribute column (CelebA)."""
    if labels is None or labels.dim() == 1:
        return labels, "label"
    names_path = os.path.join(config["data_dir"], config["dataset"], "attr_names.json")
    names = []
    if os.path.exists(names_path):
        with open(names_path) as f:
            names = json.load(f)
    col = names.index(attr) if attr in names else 0
    return labels[:, col], names[col] if names else f"attribute {col}"

def save_latent_map(xy, labels, method, label_name, png_path):
    from matplotlib.figure import Figure  # no pyplot: no display backend needed
    fig = Figure(figsize=(6, 5.5))
    ax = fig.subplots()
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=4)
    else:
        points = ax.scatter(xy[:, 0], xy[:, 1], c=labels, s=4, cmap="tab10" if labels.max() < 10 else "viridis")
        fig.colorbar(points, ax=ax, label=label_name)
    coloured = f", coloured by {label_name}" if labels is not None else ""
    ax.set_title(f"latent means of {len(xy)} images, {method}{coloured}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100, format="png")

def latents_figure(module, models, config, args, g):
    """Every test image (t-SNE takes ~6 s on 1,000 points, ~1 min on 10,000); without a test split, at most
    10,000 training images."""
    images, labels = real_data(module, config, "test")
    if not len(images):
        images, labels = real_data(module, config, "train")
        keep = torch.linspace(0, len(images) - 1, min(len(images), 10000)).long()
        images, labels = images[keep], None if labels is None else labels[keep]
    if len(images) < 2:
        raise ValueError(f"--mode latents: the data has {len(images)} image(s); a map needs at least 2")
    mu = torch.cat([module.encode(models, x.to(args.device).float() / 255)[0].cpu() for x in images.split(500)])
    labels, label_name = map_labels(labels, config, args.attr)
    xy, method = latent_map(mu, args.projection)
    labels = None if labels is None else labels.numpy()
    return {"name": "latents", "draw": lambda path: save_latent_map(xy.numpy(), labels, method, label_name, path)}

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

def save_gif(frames, path, ms=200):
    """A looping GIF of PIL frames. GIF holds 256 colours a frame: gray frames are kept exactly, colour is quantised."""
    if all(ImageChops.difference(f, f.convert("L").convert("RGB")).getbbox() is None for f in frames):
        frames = [f.convert("L") for f in frames]
    frames[0].save(path + ".tmp.gif", save_all=True, append_images=frames[1:], duration=ms, loop=0)
    os.replace(path + ".tmp.gif", path)
    return path

def grid_gif(grid, out_dir):
    """NAME.gif: one frame per column of the grid (a step of its walk), the rows stacked, the column's label on top."""
    walk = grid.get("walk", grid)
    frames = [render_grid({**walk, "images": walk["images"][:, j:j + 1], "cols": [col]})[0]
              for j, col in enumerate(walk["cols"])]
    return save_gif(frames, os.path.join(out_dir, grid["name"] + ".gif"))

def training_movie(run, out_dir, ms=200):
    """training.gif: a run's grids samples/step_*.png in step order, each under a line giving its step."""
    folder = os.path.join(run, "samples") if os.path.isdir(os.path.join(run, "samples")) else run
    steps = sorted((int(m[1]), m[0]) for m in map(re.compile(r"step_(\d+)\.png").fullmatch, os.listdir(folder)) if m)
    if not steps:
        return None
    grids = [Image.open(os.path.join(folder, name)).convert("RGB") for _, name in steps]
    font = load_font(max(12, grids[0].width // 16))
    line = font.getbbox("step 0")[3] + 8
    frames = []
    for (step, _), grid in zip(steps, grids):
        frame = Image.new("RGB", (max(g.width for g in grids), max(g.height for g in grids) + line), "white")
        frame.paste(grid, (0, line))
        ImageDraw.Draw(frame).text((4, 4), f"step {step:,}", fill="black", font=font)
        frames.append(frame)
    return save_gif(frames, os.path.join(out_dir, "training.gif"), [ms] * (len(frames) - 1) + [5 * ms])

def training_curves(run, out_dir):
    """curves.png: each number of RUN/log.jsonl against the step, the speed left out, one panel per name prefix."""
    log = os.path.join(run, "log.jsonl")
    rows = [json.loads(line) for line in open(log)] if os.path.isfile(log) else []
    panels, speed = {}, ("step", "ms_per_step", "images_per_s", "peak_mem_mb")
    for key in dict.fromkeys(k for row in rows for k in row if k not in speed):
        panels.setdefault(key.split("_")[0], []).append(key)
    if not panels:
        return None
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, keys in zip(axes[0], panels.values()):
        for key in keys:  # some keys (a test metric) are only in some rows
            ax.plot([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r], label=key)
        ax.set(xlabel="step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curves.tmp.png"), dpi=100)
    plt.close(fig)
    os.replace(os.path.join(out_dir, "curves.tmp.png"), os.path.join(out_dir, "curves.png"))
    return os.path.join(out_dir, "curves.png")

def save_grid(grid, out_dir):
    path = os.path.join(out_dir, grid["name"] + ".png")
    if "draw" in grid:  # a matplotlib figure (latents)
        grid["draw"](path + ".tmp.png")
    else:
        image, layout = render_grid(grid)
        info = PngInfo()
        for key, value in layout.items():  # where the grid is, for anyone cutting cells out of the PNG
            info.add_text(key, str(value))
        image.save(path + ".tmp.png", pnginfo=info)
    os.replace(path + ".tmp.png", path)
    return path

# -----------------------------------------------------------------------------
def get_args(argv=None):
    p = OneLineParser(prog="interpolate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint of a model script (ckpt.pt)")
    p.add_argument("--compare", nargs="+", metavar="CKPT",
                   help="instead of --ckpt: two or more checkpoints, drawn from the same noise, one row each, "
                        "into compare.png")
    p.add_argument("--movie", metavar="RUN", help="instead of --ckpt: training.gif (the grids RUN/samples/step_*.png "
                                                  "in step order) and curves.png (RUN/log.jsonl) in RUN or --out_dir")
    p.add_argument("--gif", action="store_true", help="also draw each grid as NAME.gif, one frame per column")
    p.add_argument("--script", metavar="PATH.py", help="the model script to load the checkpoints with, if it is not "
                                                      "one of this project's")
    p.add_argument("--data_dir", default=None, help="where the datasets are, if not where the checkpoint says")
    p.add_argument("--fid_json", default="evaluate.json",
                   help="compare: the evaluate.py --json file beside each checkpoint whose FID goes into its row "
                        "name (if present)")
    p.add_argument("--mode", default="all",
                   help=f"comma-separated subset of {','.join(MODES)}, or all (those that apply)")
    p.add_argument("--pairs", type=int, default=5,
                   help="pairs, pixel: latent pairs (z0, z1), one row each (pixel: two rows each)")
    p.add_argument("--endpoints", default="random", choices=["random", "test"],
                   help="pairs, pixel: z0, z1 drawn at random, or (VAEs) the posterior means of two test images")
    p.add_argument("--steps", type=int, default=10,
                   help="points from t=0 to t=1 (pairs, pixel), values of a traversal or continuous code")
    p.add_argument("--method", default="lerp", choices=["lerp", "slerp"],
                   help="linear or spherical interpolation of the latents")
    p.add_argument("--extrapolate", type=int, default=0, metavar="E",
                   help="pairs, pixel: E more points of the same spacing beyond each end")
    p.add_argument("--dims", default=None,
                   help="traverse: comma-separated latent dimensions (default the first 8 noise dimensions)")
    p.add_argument("--range", type=float, default=3.0, help="traverse: each dimension goes over [-range, range]")
    p.add_argument("--n_noise", type=int, default=10, help="classes, compare: columns (noise vectors); codes: rows")
    p.add_argument("--code_range", type=float, default=2.0,
                   help="codes: continuous codes go over [-code_range, code_range]")
    p.add_argument("--projection", default="tsne", choices=["tsne", "pca"], help="latents: the 2-D map's projection")
    p.add_argument("--attr", default="Male", help="latents: of multi-attribute labels (CelebA), the one colouring it")
    p.add_argument("--seed", type=int, default=0, help="seed of the latents and of the test images picked")
    p.add_argument("--out_dir", default=None, help="where the PNGs go (default: CKPT_FOLDER/interpolations)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    args = p.parse_args(argv)
    if [args.ckpt, args.compare, args.movie].count(None) != 2:
        p.error("give either --ckpt or --compare, or --movie")
    if args.compare is not None and len(args.compare) < 2:
        p.error("--compare needs two or more checkpoints")
    for flag in ("pairs", "n_noise"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    if args.steps < 2:
        p.error("--steps must be at least 2")
    if args.extrapolate < 0:
        p.error("--extrapolate must be 0 or more")
    for flag in ("range", "code_range"):
        if not 0 <= getattr(args, flag) < math.inf:
            p.error(f"--{flag} must be a number, 0 or more")
    return args

def make_grids(module, models, config, args):
    """Every grid --mode asks for, each from its own seeded stream of latents."""
    available = applicable_modes(module, config)
    if not available:
        raise ValueError(f"{config.get('script', 'this')}.py has no latent space to draw (no sample_latent/generate, "
                         "no encode)")
    if args.endpoints == "test" and not hasattr(module, "encode"):
        raise ValueError(f"--endpoints test needs a VAE (encode); this {config.get('script', 'checkpoint')} "
                         "has random endpoints only")
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    if args.mode == "all":  # the grids, which need the checkpoint alone (latents reads the dataset)
        modes = [m for m in available if m != "latents"]
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"--mode {mode}: choose from {', '.join(MODES)} or all")
        if mode not in available:
            need = {"classes": "a class-conditional model (ACGAN)", "codes": "a model with latent codes (InfoGAN)",
                    "latents": "an encoder (encode, as the VAE's)"}.get(mode, "a generator (sample_latent, generate)")
            raise ValueError(f"--mode {mode} needs {need}; this {config.get('script', 'checkpoint')} allows "
                             f"{', '.join(available)}")
    builders = {"pairs": pairs_grid, "traverse": traverse_grid, "pixel": pixel_grid, "classes": classes_grid,
                "codes": code_grids, "latents": latents_figure}
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
        if args.movie:
            make_out_dir(args.out_dir or args.movie)
            drawn = [f(args.movie, args.out_dir or args.movie) for f in (training_movie, training_curves)]
            if drawn == [None, None]:
                raise ValueError(f"--movie {args.movie}: neither grids samples/step_*.png nor rows in log.jsonl there")
            print("\n".join(path for path in drawn if path))
            return
        if args.compare:  # written beside the run folders: out/a/ckpt.pt, out/b/ckpt.pt -> out/compare.png
            with torch.no_grad():
                grids = [compare_grid(args)]
            out_dir = args.out_dir or os.path.dirname(os.path.dirname(os.path.abspath(args.compare[0])))
        else:
            ckpt = load_checkpoint(args.ckpt)
            module = import_script(ckpt["script"], args.script)
            models = load_models(module, ckpt, args.device, args.ckpt)
            config = {**ckpt["config"], "script": ckpt["script"]}
            if args.data_dir is not None:
                config["data_dir"] = args.data_dir
            with torch.no_grad():
                grids = make_grids(module, models, config, args)
            out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "interpolations")
        make_out_dir(out_dir)
        for grid in grids:
            print(save_grid(grid, out_dir))
            if args.gif and "images" in grid:
                print(grid_gif(grid, out_dir))
    except (OSError, ValueError, ImportError) as e:
        print(f"interpolate.py: error: {e}", file=sys.stderr)
        sys.exit(1)

if __name__ == "__main__":
    main()
