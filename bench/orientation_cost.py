"""What the orientation loss costs per stage-1 render: off, finite-difference normals, closed-form normals.

Each row times one training render (forward + backward, orientation term included) of the same
cameras at a preset's stage-1 settings, on a field whose density has a surface: a stage-1
checkpoint's (``--checkpoint``, what `dreamflow generate` writes under checkpoints/) or the
starting ball plus a grid of random entries. It also says how far the closed-form normals are
from the finite-difference ones at points of the field's surface layer.

    .venv/bin/python bench/orientation_cost.py --preset toy --repeats 5 [--checkpoint OUT/checkpoints/stage1.pt]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from dreamflow.pipeline.config import build_config
from dreamflow.pipeline.stage1 import field_settings
from dreamflow.render.volume import OccupancyGrid, render_cameras
from dreamflow.scene.cameras import CameraSampler
from dreamflow.scene.nerf import NerfField


class FiniteDifferenceField(NerfField):
    """The same field with the forward-difference normals the loss used before."""

    def normals(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Forward-difference normals."""
        return self.normals_finite_difference(x, sigma)


def time_renders(variants: dict[str, tuple[NerfField, bool]], cameras, resolution: int, samples: int,
                 occupancy: OccupancyGrid, repeats: int) -> dict[str, float]:
    """Median seconds of one training render + backward per variant, taken in turns (a shared
    machine's load then falls on every variant alike)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(repeats + 1):
        for name, (field, orientation) in variants.items():
            gen = torch.Generator().manual_seed(r)
            field.zero_grad(set_to_none=True)
            start = time.perf_counter()
            out = render_cameras(field, cameras, resolution, resolution, samples, occupancy, perturb=True,
                                 generator=gen, orientation=orientation)
            (out.image.mean() + 0.01 * out.orientation).backward()
            if r:  # the first round is a warm-up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    """Print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="toy")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--checkpoint", help="a stage-1 checkpoint of the same preset (its field and occupancy grid)")
    args = ap.parse_args()
    cfg = build_config(args.preset).stage1
    torch.manual_seed(0)
    fields = {}
    for name, cls in (("exact", NerfField), ("finite-difference", FiniteDifferenceField)):
        f = cls(field_settings(cfg), "cpu", grid_backend="torch", seed=0)
        with torch.no_grad():
            f.grid.params.copy_(torch.randn(f.grid.params.shape, generator=torch.Generator().manual_seed(1)) * 0.2)
        fields[name] = f
    occupancy = OccupancyGrid(cfg.occupancy_resolution, cfg.occupancy_threshold)
    if args.checkpoint:
        problem = torch.load(args.checkpoint, map_location="cpu", weights_only=False)["loop"]["problem"]
        fields["exact"].load_state_dict(problem["field"])
        occupancy.load_state_dict(problem["occupancy"])
    else:
        occupancy.update(fields["exact"].density)
    fields["finite-difference"].load_state_dict(fields["exact"].state_dict())
    cameras = CameraSampler(cfg.cameras, seed=0).sample(cfg.views_per_iteration)
    res, spr = cfg.resolution, cfg.samples_per_ray
    t = time_renders({"(no orientation loss)": (fields["exact"], False), "exact": (fields["exact"], True),
                      "finite-difference": (fields["finite-difference"], True)}, cameras, res, spr, occupancy,
                     args.repeats)
    base = t["(no orientation loss)"]
    print(f"preset {args.preset}: {res}x{res} px, {spr} samples/ray, grid {cfg.grid.levels} levels; "
          f"median of {args.repeats} renders (forward + backward), variants in turns")
    print(f"{'orientation normals':<22} {'s/render':>9} {'x no loss':>10}")
    for name, seconds in t.items():
        print(f"{name:<22} {seconds:9.3f} {seconds / base:10.2f}")
    x = (torch.rand(20000, 3, generator=torch.Generator().manual_seed(2)) - 0.5) * 0.9
    with torch.no_grad():
        sigma = fields["exact"].density(x)
        surface = sigma > 1.0
        cos = (fields["exact"].normals(x, sigma) * fields["exact"].normals_finite_difference(x, sigma)).sum(-1)[surface]
    print(f"cosine(exact, finite-difference) on {int(surface.sum())} points of density > 1: "
          f"median {cos.median():.4f}, 5th percentile {cos.quantile(0.05):.4f}")


if __name__ == "__main__":
    main()
