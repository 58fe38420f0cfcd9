"""Cameras on a sphere around the object, in the project's one world convention.

World frame: right-handed, Z up, the same as Blender's, so meshes travel to Blender untouched
(GLB export converts to glTF's Y-up). The object sits at the origin inside the cube [-0.5, 0.5]^3
(the papers' bounding box 1.0). Azimuth 0 is the *front* view: the camera stands on -Y and looks
towards +Y (Blender's numpad-1 view); azimuth 90 puts it on +X (Blender's "right" view).
Elevation is measured up from the XY plane. Camera axes follow OpenGL: the camera looks along its
-Z, its +Y is up on the image, +X is right; image row 0 is the top.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..devices import upload
from ..config import setting


@dataclass(frozen=True)
class CameraRanges:
    """Sampling ranges for training views (ProlificDreamer / threestudio practice)."""

    distance: tuple[float, float] = setting((1.0, 1.5), 0.0, 100.0, lo_open=True)
    fovy_deg: tuple[float, float] = setting((40.0, 70.0), 1.0, 179.0)
    elevation_deg: tuple[float, float] = setting((-10.0, 45.0), -90.0, 90.0)
    azimuth_deg: tuple[float, float] = setting((-180.0, 180.0), -360.0, 360.0)


@dataclass
class Cameras:
    """A batch of B cameras looking at the origin. Angles in degrees; tensors of shape (B,)."""

    azimuth_deg: torch.Tensor
    elevation_deg: torch.Tensor
    distance: torch.Tensor
    fovy_deg: torch.Tensor

    def __len__(self) -> int:
        return int(self.azimuth_deg.shape[0])

    @property
    def device(self) -> torch.device:
        """Device of the camera tensors."""
        return self.azimuth_deg.device

    def to(self, device: torch.device | str) -> "Cameras":
        """The same cameras on another device (they remember their CPU copy, see :meth:`host`)."""
        moved = Cameras(*(upload(t, device) for t in (self.azimuth_deg, self.elevation_deg, self.distance, self.fovy_deg)))
        moved._host = self.host() if self.device.type == "cpu" or getattr(self, "_host", None) is not None else None
        return moved

    def host(self) -> "Cameras":
        """These cameras on the CPU: free for cameras drawn there and moved (no device read)."""
        if self.device.type == "cpu":
            return self
        cached = getattr(self, "_host", None)
        return cached if cached is not None else self.to("cpu")

    def __getitem__(self, idx: int | slice | torch.Tensor) -> "Cameras":
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return Cameras(self.azimuth_deg[idx], self.elevation_deg[idx], self.distance[idx], self.fovy_deg[idx])

    @staticmethod
    def make(azimuth_deg, elevation_deg, distance, fovy_deg, device: torch.device | str = "cpu") -> "Cameras":
        """Build a batch from scalars or sequences (broadcast to a common length)."""
        vals = [torch.as_tensor(v, dtype=torch.float32, device=device).reshape(-1) for v in
                (azimuth_deg, elevation_deg, distance, fovy_deg)]
        n = max(v.numel() for v in vals)
        vals = [v.expand(n).clone() if v.numel() == 1 else v for v in vals]
        return Cameras(*vals)

    def positions(self) -> torch.Tensor:
        """Camera centres in world space, (B, 3)."""
        az = torch.deg2rad(self.azimuth_deg)
        el = torch.deg2rad(self.elevation_deg)
        return torch.stack([
            self.distance * torch.cos(el) * torch.sin(az),
            -self.distance * torch.cos(el) * torch.cos(az),
            self.distance * torch.sin(el),
        ], dim=-1)

    def c2w(self) -> torch.Tensor:
        """Camera-to-world matrices (B, 4, 4), OpenGL camera axes (looks along -Z)."""
        eye = self.positions()
        forward = torch.nn.functional.normalize(-eye, dim=-1)
        world_up = torch.zeros_like(forward)
        world_up[:, 2] = 1.0
        right = torch.linalg.cross(forward, world_up, dim=-1)
        # Straight up or down: any horizontal right vector will do; keep it continuous in azimuth.
        degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
        az = torch.deg2rad(self.azimuth_deg)[:, None]
        fallback = torch.cat([torch.cos(az), torch.sin(az), torch.zeros_like(az)], dim=-1)
        right = torch.where(degenerate, fallback, right)
        right = torch.nn.functional.normalize(right, dim=-1)
        up = torch.linalg.cross(right, forward, dim=-1)
        m = torch.zeros(len(self), 4, 4, device=eye.device)
        m[:, :3, 0] = right
        m[:, :3, 1] = up
        m[:, :3, 2] = -forward
        m[:, :3, 3] = eye
        m[:, 3, 3] = 1.0
        return m

    def focal(self, height: int) -> torch.Tensor:
        """Focal length in pixels for an image ``height`` pixels tall, (B,)."""
        return 0.5 * height / torch.tan(torch.deg2rad(self.fovy_deg) * 0.5)

    def rays(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ray origins and unit directions in world space, each (B, H, W, 3); pixel centres."""
        dev = self.device
        j, i = torch.meshgrid(torch.arange(height, device=dev, dtype=torch.float32) + 0.5,
                              torch.arange(width, device=dev, dtype=torch.float32) + 0.5, indexing="ij")
        f = self.focal(height)[:, None, None]
        x = (i - width * 0.5) / f
        y = -(j - height * 0.5) / f
        dirs = torch.stack([x, y, -torch.ones_like(x)], -1)
        c2w = self.c2w()
        d = torch.einsum("bhwk,bjk->bhwj", dirs, c2w[:, :3, :3])
        d = torch.nn.functional.normalize(d, dim=-1)
        o = c2w[:, None, None, :3, 3].expand_as(d)
        return o, d

    def projection(self, near: float = 0.01, far: float = 10.0, aspect: float = 1.0) -> torch.Tensor:
        """OpenGL perspective projection matrices (B, 4, 4)."""
        t = torch.tan(torch.deg2rad(self.fovy_deg) * 0.5)
        p = torch.zeros(len(self), 4, 4, device=self.device)
        p[:, 0, 0] = 1.0 / (t * aspect)
        p[:, 1, 1] = 1.0 / t
        p[:, 2, 2] = -(far + near) / (far - near)
        p[:, 2, 3] = -2.0 * far * near / (far - near)
        p[:, 3, 2] = -1.0
        return p

    def mvp(self, near: float = 0.01, far: float = 10.0, aspect: float = 1.0) -> torch.Tensor:
        """World-to-clip matrices (B, 4, 4) for rasterisation."""
        return self.projection(near, far, aspect) @ self.w2c()

    def w2c(self) -> torch.Tensor:
        """World-to-camera matrices (B, 4, 4): the rigid inverse ``[R^T | -R^T t]``, exact and, unlike
        a general inverse, without a singularity check that reads the device."""
        c2w = self.c2w()
        rot_t = c2w[:, :3, :3].transpose(1, 2)
        m = torch.zeros_like(c2w)
        m[:, :3, :3] = rot_t
        m[:, :3, 3] = -(rot_t @ c2w[:, :3, 3:4])[..., 0]
        m[:, 3, 3] = 1.0
        return m

    def to_matrix_features(self) -> torch.Tensor:
        """Flattened 4x4 camera-to-world matrices (B, 16): the input of a camera-embedding MLP."""
        return self.c2w().reshape(len(self), 16)


def view_suffix(azimuth_deg: float, elevation_deg: float) -> str:
    """The view-dependent prompt suffix against the multi-face (Janus) problem."""
    if elevation_deg > 60.0:
        return "overhead view"
    a = (azimuth_deg + 180.0) % 360.0 - 180.0
    if abs(a) <= 45.0:
        return "front view"
    if abs(a) >= 135.0:
        return "back view"
    return "side view"


VIEW_SUFFIXES = ("front view", "side view", "back view", "overhead view")


class CameraSampler:
    """Draws random training cameras from :class:`CameraRanges` with its own seeded generator."""

    def __init__(self, ranges: CameraRanges = CameraRanges(), seed: int = 0, device: torch.device | str = "cpu"):
        self.ranges = ranges
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)

    def _uniform(self, lo_hi: tuple[float, float], n: int) -> torch.Tensor:
        lo, hi = lo_hi
        return lo + (hi - lo) * torch.rand(n, generator=self.generator)

    def sample(self, n: int) -> Cameras:
        """n random cameras."""
        r = self.ranges
        return Cameras(self._uniform(r.azimuth_deg, n), self._uniform(r.elevation_deg, n),
                       self._uniform(r.distance, n), self._uniform(r.fovy_deg, n)).to(self.device)

    def state_dict(self) -> dict:
        """Generator state, so a resumed job draws the same cameras."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the generator state."""
        self.generator.set_state(state["generator"])


def orbit(n: int, elevation_deg: float = 15.0, distance: float = 1.2, fovy_deg: float = 50.0,
          device: torch.device | str = "cpu") -> Cameras:
    """n evenly spaced azimuths at one elevation (evaluation turntables: 120 views at 15 deg, 1.2)."""
    az = torch.arange(n, dtype=torch.float32) * (360.0 / n)
    az = (az + 180.0) % 360.0 - 180.0
    return Cameras.make(az, elevation_deg, distance, fovy_deg, device=device)
