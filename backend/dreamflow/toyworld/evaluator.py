"""The toy world's evaluator: a small CNN with a shape head and a colour head (a "toy CLIP"), and a
view head that tells from where an oriented object (world.ORIENTED_SHAPES) is seen: front, side, back.

It is trained on the toy world's renders made with a seed the generator never used (other
cameras, other images), with augmentations that stand for what generated images get wrong
(blur, noise, a shifted or scaled object, slightly wrong brightness), so that it can judge both
the 2D generator's samples and renders of 3D assets. Retrieval over prompts uses it as
``log p(shape) + log p(colour)`` (scoring.ToyScorer).

``train_evaluator`` reproduces the shipped weights (``dreamflow train-evaluator --out DIR``);
``load_evaluator`` loads them (or another folder).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

#: Where the shipped weights live inside the package.
SHIPPED = Path(__file__).resolve().parent / "weights" / "evaluator"
WEIGHTS_FILE = "evaluator.safetensors"
CONFIG_FILE = "evaluator.json"

#: The seeds of the evaluator's own renders (dataset.render_dataset's camera seed): reserved for the
#: evaluator, so that it sees other cameras and images than the generator was trained on.
TRAIN_SEED = 7301
HELD_OUT_SEED = 7302


@dataclass(frozen=True)
class EvaluatorConfig:
    """Architecture and training settings of the toy evaluator."""

    resolution: int = 32            # input size; other sizes are resized (area) to it
    render_resolution: int = 64     # renders are drawn at this size, then resized to the input size
    width: int = 32                 # channels of the first block, doubled twice
    shapes: tuple[str, ...] = ()
    colours: tuple[str, ...] = ()
    views: tuple[str, ...] = ()     # view names of the view head (none: no view head)
    views_per_object: int = 48      # training renders per (shape, colour)
    held_out_views: int = 12        # held-out renders per object (another seed)
    steps: int = 1200
    batch: int = 128
    lr: float = 2e-3
    seed: int = TRAIN_SEED
    held_out_seed: int = HELD_OUT_SEED


class ToyEvaluator(nn.Module):
    """Conv net -> pooled features -> shape logits and colour logits."""

    def __init__(self, config: EvaluatorConfig):
        super().__init__()
        self.config = config
        w = config.width

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())

        self.features = nn.Sequential(block(3, w, 1), block(w, w, 1), block(w, 2 * w, 2), block(2 * w, 2 * w, 1),
                                      block(2 * w, 4 * w, 2), block(4 * w, 4 * w, 2))
        self.shape_head = nn.Linear(8 * w, len(config.shapes))
        self.colour_head = nn.Linear(8 * w, len(config.colours))
        self.view_head = nn.Linear(8 * w, len(config.views)) if config.views else None

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] at any size -> the network's input (resized, centred on 0)."""
        x = images.float().clamp(0, 1)
        r = self.config.resolution
        if x.shape[-2:] != (r, r):
            x = F.interpolate(x, size=(r, r), mode="area" if x.shape[-1] > r else "bilinear", align_corners=None if x.shape[-1] > r else False)
        return x * 2.0 - 1.0

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, 8 width) of images (B, 3, H, W) in [0, 1]."""
        h = self.features(self.prepare(images))
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shape logits (B, S) and colour logits (B, C) of images (B, 3, H, W) in [0, 1]."""
        h = self.pooled(images)
        return self.shape_head(h), self.colour_head(h)

    @torch.no_grad()
    def classify_views(self, images: torch.Tensor, batch: int = 256) -> list[str]:
        """The most likely view ("front", "side", "back") of each image of an oriented object."""
        if self.view_head is None:
            raise ValueError("this evaluator has no view head (it predates the oriented objects); "
                             "train one with `dreamflow train-evaluator`")
        was = self.training
        self.eval()
        best = torch.cat([self.view_head(self.pooled(images[i:i + batch])).argmax(1) for i in range(0, len(images), batch)])
        self.train(was)
        return [self.config.views[i] for i in best.tolist()]

    @torch.no_grad()
    def log_probs(self, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities of shape (B, S) and colour (B, C), in eval mode, batched."""
        was = self.training
        self.eval()
        out_s, out_c = [], []
        for i in range(0, len(images), batch):
            s, c = self(images[i:i + batch])
            out_s.append(F.log_softmax(s, dim=1))
            out_c.append(F.log_softmax(c, dim=1))
        self.train(was)
        return torch.cat(out_s), torch.cat(out_c)

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> tuple[list[str], list[str]]:
        """The most likely shape and colour name of each image."""
        s, c = self.log_probs(images)
        return ([self.config.shapes[i] for i in s.argmax(1).tolist()],
                [self.config.colours[i] for i in c.argmax(1).tolist()])


# --- the toy world, as the evaluator sees it --------------------------------------------------


#: The view head's classes: the view suffix of the camera without " view" (toy cameras are never overhead).
VIEWS = ("front", "side", "back")


def world_vocabulary() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The world's shape names (the 6 symmetric, then the oriented) and colour names, in the world's order."""
    from . import world

    return tuple(world.ALL_SHAPES), tuple(world.COLOURS)


def label_indices(parsed: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (shape, colour) into world_vocabulary() of parse_prompt results."""
    shapes, colours = world_vocabulary()
    s_idx, c_idx = [], []
    for shape, colour in parsed:
        s_idx.append(shapes.index(shape))
        c_idx.append(colours.index(colour))
    return torch.tensor(s_idx, dtype=torch.long), torch.tensor(c_idx, dtype=torch.long)


def render_labelled(seed: int, views_per_object: int,
                    config: "EvaluatorConfig") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Renders of every object of the evaluator's shapes from random toy-preset cameras (dataset.render_dataset,
    this seed; the oriented ones from all sides evenly), drawn at ``render_resolution`` and area-resized to
    the input size: images, shape, colour and view labels (view -1: a symmetric shape, no view)."""
    from ..scene.cameras import view_suffix
    from .dataset import render_dataset
    from .world import ALL_SHAPES, ORIENTED_SHAPES

    data = render_dataset(views_per_object, config.render_resolution, seed, shapes=tuple(config.shapes), real_bias=False)
    images = data.float_images()
    if config.render_resolution != config.resolution:
        images = F.interpolate(images, size=(config.resolution, config.resolution), mode="area")
    shape_names = [ALL_SHAPES[i] for i in data.shape_ids.tolist()]
    views = [view_suffix(a, e).removesuffix(" view") for a, e in
             zip(data.cameras.azimuth_deg.tolist(), data.cameras.elevation_deg.tolist())]
    view_ids = [config.views.index(v) if s in ORIENTED_SHAPES and v in config.views else -1
                for s, v in zip(shape_names, views)]
    return (images, torch.tensor([config.shapes.index(s) for s in shape_names]), data.colour_ids,
            torch.tensor(view_ids, dtype=torch.long))


# --- training -----------------------------------------------------------------------------------


def augment(images: torch.Tensor, generator: torch.Generator, flippable: torch.Tensor | None = None) -> torch.Tensor:
    """What generated images get wrong, at random: blur, noise, brightness, a shifted/scaled object, a flip
    (only where ``flippable``: a mirrored oriented object shows another view)."""
    b = images.shape[0]
    x = images

    def u(lo: float, hi: float, shape=(b, 1, 1, 1)) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=generator)

    # Scale and shift about the image centre (grid_sample over the white background).
    scale = u(0.85, 1.15, (b,))
    shift = u(-0.08, 0.08, (b, 2))
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = 1.0 / scale
    theta[:, 1, 1] = 1.0 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x - 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 1.0
    flip = torch.rand(b, generator=generator) < 0.5
    flip = flip if flippable is None else flip & flippable
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    # Blur: a separable Gaussian of random width on half the batch.
    sigma = float(u(0.3, 1.5, (1,)).item())
    r = 2
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    blurred = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    blurred = F.conv2d(F.pad(blurred, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)
    do_blur = torch.rand(b, generator=generator) < 0.5
    x = torch.where(do_blur[:, None, None, None], blurred, x)
    x = x * u(0.85, 1.1)
    x = x + u(0.0, 0.06) * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1)


def accuracy(model: ToyEvaluator, images: torch.Tensor, shape_labels: torch.Tensor,
             colour_labels: torch.Tensor, view_labels: torch.Tensor | None = None) -> dict[str, float]:
    """Shape, colour and both-right accuracy of the evaluator on labelled images (and the view's, on
    the images with a view label, when the evaluator has a view head)."""
    s, c = model.log_probs(images)
    s_ok = s.argmax(1) == shape_labels
    c_ok = c.argmax(1) == colour_labels
    out = {"shape": float(s_ok.float().mean()), "colour": float(c_ok.float().mean()),
           "both": float((s_ok & c_ok).float().mean()), "images": int(len(images))}
    if view_labels is not None and model.view_head is not None and bool((view_labels >= 0).any()):
        seen = view_labels >= 0
        names = model.classify_views(images[seen])
        out["view"] = sum(n == model.config.views[i] for n, i in zip(names, view_labels[seen].tolist())) / len(names)
        out["view_images"] = int(seen.sum())
    return out


def judge(model: ToyEvaluator, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """How many images (e.g. the 2D generator's samples) show their prompt's shape, colour, both."""
    from .world import parse_prompt

    shape_idx, colour_idx = label_indices([parse_prompt(p) for p in prompts])
    return accuracy(model, images, shape_idx, colour_idx)


def train_evaluator(out: str | Path | None = None, config: EvaluatorConfig | None = None,
                    log: Callable[[str], None] = print,
                    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                    held_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> tuple[ToyEvaluator, dict]:
    """Train the evaluator from scratch on its own seed's renders; save it to ``out`` when given.

    Returns the model and a report with the held-out accuracy (renders of yet another seed).
    ``data``/``held_out`` replace the world's renders (tests).
    """
    config = config or EvaluatorConfig()
    if not config.shapes:
        shapes, colours = world_vocabulary()
        config = EvaluatorConfig(**{**asdict(config), "shapes": shapes, "colours": colours, "views": VIEWS})
    start = time.perf_counter()
    if data is None:
        data = render_labelled(config.seed, config.views_per_object, config)
    if held_out is None:
        held_out = render_labelled(config.held_out_seed, config.held_out_views, config)
    log(f"evaluator: {len(data[0])} training renders, {len(held_out[0])} held-out renders "
        f"({time.perf_counter() - start:.1f} s)")
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    model = ToyEvaluator(config)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, config.steps) / config.steps)))
    images, s_lab, c_lab = data[:3]
    v_lab = data[3] if len(data) > 3 else torch.full_like(s_lab, -1)
    model.train()
    for step in range(1, config.steps + 1):
        idx = torch.randint(0, len(images), (config.batch,), generator=gen)
        seen = v_lab[idx] >= 0
        h = model.pooled(augment(images[idx], gen, flippable=~seen))
        loss = F.cross_entropy(model.shape_head(h), s_lab[idx]) + F.cross_entropy(model.colour_head(h), c_lab[idx])
        if model.view_head is not None and bool(seen.any()):
            loss = loss + F.cross_entropy(model.view_head(h[seen]), v_lab[idx][seen])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == config.steps:
            log(f"evaluator: step {step}/{config.steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    model.eval()
    report = {"held_out": accuracy(model, *held_out), "train": accuracy(model, *data),
              "seconds": time.perf_counter() - start, "config": asdict(config)}
    log(f"evaluator: held-out accuracy shape {report['held_out']['shape']:.4f}, colour {report['held_out']['colour']:.4f}, "
        f"both {report['held_out']['both']:.4f} on {report['held_out']['images']} renders"
        + (f"; view {report['held_out']['view']:.4f} on {report['held_out']['view_images']}" if "view" in report["held_out"] else ""))
    if out is not None:
        save_evaluator(model, out, report)
    return model, report


def save_evaluator(model: ToyEvaluator, out: str | Path, report: dict | None = None) -> Path:
    """Write the weights (safetensors) and the config + training report (JSON) into folder ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS_FILE))
    meta = {"config": asdict(model.config), "report": {k: v for k, v in (report or {}).items() if k != "config"}}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return out


def load_evaluator(folder: str | Path | None = None) -> ToyEvaluator:
    """The evaluator saved in ``folder`` (default: the weights shipped in the package), in eval mode."""
    from safetensors.torch import load_file

    folder = SHIPPED if folder is None else Path(folder)
    cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        raise FileNotFoundError(f"no toy evaluator in {folder} (needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
                                f"make one with `dreamflow train-evaluator --out {folder}`")
    raw = json.loads(cfg_path.read_text())["config"]
    raw["shapes"], raw["colours"] = tuple(raw["shapes"]), tuple(raw["colours"])
    raw["views"] = tuple(raw.get("views", ()))  # evaluators from before the oriented objects have none
    model = ToyEvaluator(EvaluatorConfig(**raw))
    model.load_state_dict(load_file(str(w_path)))
    return model.eval()
