"""Writing and reading the final asset: GLB with a PBR material (trimesh), OBJ + MTL + PNG.

The project's world is Z-up (Blender's); glTF is Y-up, so the GLB stores ``(x, z, -y)``, which
Blender's glTF importer turns back into ``(x, y, z)``. UVs are passed to trimesh with their origin
at the bottom-left (MeshData's convention); trimesh flips V for glTF on export and back on load.
Files are written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..safe_files import atomic_write
from .mesh import MeshData, MeshError


def z_up_to_y_up(v: np.ndarray) -> np.ndarray:
    """Project frame (Z up) -> glTF frame (Y up)."""
    return np.stack([v[:, 0], v[:, 2], -v[:, 1]], axis=1)


def y_up_to_z_up(v: np.ndarray) -> np.ndarray:
    """glTF frame (Y up) -> project frame (Z up)."""
    return np.stack([v[:, 0], -v[:, 2], v[:, 1]], axis=1)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)


def to_trimesh(mesh: MeshData):
    """A Y-up trimesh.Trimesh with a PBR material carrying the texture (when the mesh has one)."""
    import trimesh
    from PIL import Image

    mesh.validate()
    kwargs = {}
    if mesh.normals is not None:
        kwargs["vertex_normals"] = z_up_to_y_up(mesh.normals)
    tm = trimesh.Trimesh(z_up_to_y_up(mesh.vertices), mesh.faces, process=False, **kwargs)
    if mesh.uvs is not None and mesh.texture is not None:
        material = trimesh.visual.material.PBRMaterial(
            name="dreamflow", baseColorTexture=Image.fromarray(mesh.texture[..., :3]),
            metallicFactor=0.0, roughnessFactor=1.0, doubleSided=False)
        tm.visual = trimesh.visual.TextureVisuals(uv=mesh.uvs, material=material)
    return tm


def write_glb(mesh: MeshData, path: str | Path) -> Path:
    """Write ``mesh`` as a binary glTF with its texture embedded; returns the path."""
    path = Path(path)
    data = to_trimesh(mesh).export(file_type="glb")
    _atomic_write(path, data)
    return path


def read_glb(path: str | Path) -> MeshData:
    """Load a GLB written by write_glb back into the project's frame (vertices, faces, UVs, texture)."""
    import trimesh

    loaded = trimesh.load(str(path), force="mesh", process=False)
    if not isinstance(loaded, trimesh.Trimesh):
        raise MeshError(f"{path} holds no single mesh")
    uvs = tex = None
    visual = loaded.visual
    if getattr(visual, "kind", None) == "texture" and visual.uv is not None:
        uvs = np.asarray(visual.uv, dtype=np.float32)
        image = getattr(visual.material, "baseColorTexture", None)
        if image is not None:
            tex = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return MeshData(y_up_to_z_up(np.asarray(loaded.vertices)).astype(np.float32),
                    np.asarray(loaded.faces, dtype=np.int32), None, uvs, tex)


def write_obj(mesh: MeshData, path: str | Path) -> list[Path]:
    """Write OBJ + MTL + PNG texture (Z-up kept as is, like Blender's "Z up" OBJ option); returns the paths."""
    from PIL import Image

    mesh.validate()
    path = Path(path)
    stem = path.stem
    mtl, png = path.with_suffix(".mtl"), path.with_name(stem + "_albedo.png")
    lines = [f"# DreamFlow mesh: {len(mesh.vertices)} vertices, {len(mesh.faces)} faces", f"mtllib {mtl.name}"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in mesh.vertices]
    has_uv = mesh.uvs is not None
    if has_uv:
        lines += [f"vt {u:.6f} {v:.6f}" for u, v in mesh.uvs]
    if mesh.normals is not None:
        lines += [f"vn {x:.6f} {y:.6f} {z:.6f}" for x, y, z in mesh.normals]
    lines.append("usemtl dreamflow")
    f1 = mesh.faces + 1
    if has_uv and mesh.normals is not None:
        lines += [f"f {a}/{a}/{a} {b}/{b}/{b} {c}/{c}/{c}" for a, b, c in f1]
    elif has_uv:
        lines += [f"f {a}/{a} {b}/{b} {c}/{c}" for a, b, c in f1]
    else:
        lines += [f"f {a} {b} {c}" for a, b, c in f1]
    written = [path, mtl]
    mtl_lines = ["newmtl dreamflow", "Ka 0 0 0", "Kd 1 1 1", "Ks 0 0 0", "d 1", "illum 1"]
    if mesh.texture is not None:
        buf = io.BytesIO()
        Image.fromarray(mesh.texture[..., :3]).save(buf, format="PNG")
        _atomic_write(png, buf.getvalue())
        mtl_lines.append(f"map_Kd {png.name}")
        written.append(png)
    _atomic_write(mtl, ("\n".join(mtl_lines) + "\n").encode())
    _atomic_write(path, ("\n".join(lines) + "\n").encode())
    return written


def write_png(image: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, 3|4) uint8 image as PNG atomically."""
    from PIL import Image

    path = Path(path)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    _atomic_write(path, buf.getvalue())
    return path
