"""Volume rendering in ray chunks whose activations are recomputed in the backward pass.

Chunking alone does not bound the memory of a training render: every chunk's graph is kept for
the backward pass. Here each chunk runs under activation checkpointing, so the forward keeps only
the chunk's outputs (colour, opacity, depth per ray) and the backward re-renders one chunk at a
time. Peak memory is then one chunk's graph instead of the whole image's (at the paper's 256x256
rays x 512 samples the whole graph of the pure-PyTorch hash grid is about 75 GB before
empty-space skipping), for about one
more forward pass of compute.

The stratified jitter is drawn from the caller's generator: each chunk records the generator's
state before its forward and the recomputation replays exactly those draws (and then gives the
generator back as it found it), so the gradients are those of the image that was rendered.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..scene.cameras import Cameras
from .volume import OccupancyGrid, VolumeImages, render_rays


def render_cameras_checkpointed(field, cameras: Cameras, height: int, width: int, samples: int,
                                occupancy: OccupancyGrid | None = None, perturb: bool = True,
                                generator: torch.Generator | None = None, orientation: bool = False,
                                chunk: int = 4096) -> VolumeImages:
    """``render_cameras`` with ``chunk`` rays per checkpointed piece (same images, bounded memory)."""
    o, d = cameras.rays(height, width)
    b = len(cameras)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    rgb, opacity, depth, orient_sum, evaluated = [], [], [], [], 0
    for i in range(0, o.shape[0], chunk):
        state = generator.get_state() if generator is not None else None
        calls = {"n": 0}

        def piece(origins: torch.Tensor, dirs: torch.Tensor, state=state, calls=calls):
            replay = calls["n"] > 0
            calls["n"] += 1
            saved = generator.get_state() if (replay and generator is not None) else None
            if generator is not None:
                generator.set_state(state)
            try:
                out = render_rays(field, origins, dirs, samples, occupancy, perturb, generator, orientation)
            finally:
                # The recomputation may stop early (torch stops it once the saved tensors it
                # needs exist): the generator is given back whichever way it leaves.
                if saved is not None:
                    generator.set_state(saved)
            return out.rgb, out.opacity, out.depth, out.orientation * origins.shape[0], out.samples_evaluated

        c_rgb, c_op, c_depth, c_orient, c_n = checkpoint(piece, o[i:i + chunk], d[i:i + chunk],
                                                         use_reentrant=False, preserve_rng_state=False)
        rgb.append(c_rgb)
        opacity.append(c_op)
        depth.append(c_depth)
        orient_sum.append(c_orient)
        evaluated += int(c_n)
    image = torch.cat(rgb).view(b, height, width, 3).permute(0, 3, 1, 2)
    alpha = torch.cat(opacity).view(b, 1, height, width)
    depth_map = torch.cat(depth).view(b, 1, height, width)
    orient = torch.stack(orient_sum).sum() / o.shape[0]
    return VolumeImages(image, alpha, depth_map, orient, evaluated)
