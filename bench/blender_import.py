"""Main-thread time to bring a 200,000-face textured mesh into Blender: the add-on's in-place apply
against ``bpy.ops.import_scene.gltf`` of the same mesh as a GLB (what other add-ons do).

    .venv/bin/python bench/blender_import.py [--faces 200000] [--texture 1024] [--repeat 5]

The mesh is a torus grid with UV seams (per-vertex UVs, split at the seams as xatlas does),
per-vertex normals, its faces once in grid order and once in random order; the texture is
random RGB noise (no compression advantage for the PNG in the GLB). Both paths start from what
arrives: numpy arrays from the protocol for the add-on, a GLB file for the importer (written once
with trimesh, not timed). Reported: the median over ``--repeat`` runs. The add-on's main-thread time is what Blender's UI waits for: the numpy
half of the import (checks, edges, per-corner UVs, float pixels) runs on the session's
preparation thread as the message arrives, and is also reported on its own and with everything
on the main thread. The add-on is timed in steady state (the job's Object, material and image
exist, as for every update after the first) and on first arrival.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def torus(faces: int, texture: int, seed: int = 0, shuffle: bool = True) -> dict[str, np.ndarray]:
    """A UV-mapped torus with about ``faces`` triangles and a ``texture``-sized RGB image."""
    nu = int(round(np.sqrt(faces / 2 * 2.5)))
    nv = max(3, int(round(faces / 2 / nu)))
    u = np.linspace(0, 2 * np.pi, nu + 1, dtype=np.float64)
    v = np.linspace(0, 2 * np.pi, nv + 1, dtype=np.float64)
    uu, vv = np.meshgrid(u, v, indexing="ij")
    R, r = 1.0, 0.35
    x = (R + r * np.cos(vv)) * np.cos(uu)
    y = (R + r * np.cos(vv)) * np.sin(uu)
    z = r * np.sin(vv)
    vertices = np.stack([x, y, z], -1).reshape(-1, 3).astype(np.float32)
    nx, ny, nz = np.cos(vv) * np.cos(uu), np.cos(vv) * np.sin(uu), np.sin(vv)
    normals = np.stack([nx, ny, nz], -1).reshape(-1, 3).astype(np.float32)
    uvs = np.stack([uu / (2 * np.pi), vv / (2 * np.pi)], -1).reshape(-1, 2).astype(np.float32)
    idx = np.arange((nu + 1) * (nv + 1), dtype=np.int32).reshape(nu + 1, nv + 1)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel(), idx[:-1, 1:].ravel()
    tris = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)]).astype(np.int32)
    rng = np.random.default_rng(seed)
    if shuffle:
        # Faces in random order, as a worst case for memory locality (both importers pay it).
        tris = tris[rng.permutation(len(tris))]
    image = rng.integers(0, 256, (texture, texture, 3), dtype=np.uint8)
    return {"vertices": vertices, "faces": tris, "normals": normals, "uvs": uvs, "texture": image}


def write_glb(arrays: dict[str, np.ndarray], path: Path) -> None:
    """The same mesh as a GLB with an embedded PNG texture (trimesh; glTF's V origin is at the top)."""
    import trimesh
    from PIL import Image

    uv = arrays["uvs"].copy()
    visual = trimesh.visual.TextureVisuals(uv=uv, image=Image.fromarray(arrays["texture"]))
    mesh = trimesh.Trimesh(arrays["vertices"], arrays["faces"], vertex_normals=arrays["normals"], visual=visual,
                           process=False)
    mesh.export(path, file_type="glb")


def measure(arrays: dict[str, np.ndarray], repeat: int, label: str) -> None:
    """Time both paths on one mesh and print the figures."""
    import bpy

    from blender_addon import importer

    n_faces = len(arrays["faces"])
    glb = Path(tempfile.mkdtemp(prefix="dreamflow-bench-")) / "mesh.glb"
    write_glb(arrays, glb)
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene

    from blender_addon import meshprep

    first, steady, prep, whole = [], [], [], []
    for rep in range(repeat):
        job = f"{rep:032x}"
        t0 = time.perf_counter()
        prepared = meshprep.prepare_mesh(arrays)          # the session's preparation thread does this
        prep.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        importer.apply_mesh(scene, job, prepared)
        first.append(time.perf_counter() - t0)
        prepared = meshprep.prepare_mesh(arrays)
        t0 = time.perf_counter()
        importer.apply_mesh(scene, job, prepared)
        steady.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        importer.apply_mesh(scene, job, arrays)           # preparation on the main thread too
        whole.append(time.perf_counter() - t0)

    gltf, gltf_decoded = [], []
    for _ in range(repeat):
        bpy.ops.wm.read_factory_settings(use_empty=True)
        t0 = time.perf_counter()
        bpy.ops.import_scene.gltf(filepath=str(glb))
        gltf.append(time.perf_counter() - t0)
        # The importer leaves the PNG encoded; Blender decodes it on the main thread when the
        # texture is first drawn. Reading one pixel forces that decode here.
        for image in bpy.data.images:
            image.pixels[0]
        gltf_decoded.append(time.perf_counter() - t0)
        imported = [o for o in bpy.data.objects if o.type == "MESH"]
        assert len(imported) == 1 and len(imported[0].data.polygons) == n_faces, "glTF import lost faces"

    med = statistics.median
    tex = arrays["texture"].shape
    print(f"\n{label}: {n_faces} triangles, {len(arrays['vertices'])} vertices, texture {tex[1]}x{tex[0]} RGB; "
          f"median of {repeat} runs, Blender {bpy.app.version_string}")
    print(f"  add-on, main thread, update in place:   {med(steady):.3f} s  (min {min(steady):.3f})")
    print(f"  add-on, main thread, first arrival:     {med(first):.3f} s  (min {min(first):.3f})")
    print(f"  add-on, preparation (its own thread):   {med(prep):.3f} s  (min {min(prep):.3f})")
    print(f"  add-on, both on the main thread:        {med(whole):.3f} s  (min {min(whole):.3f})")
    size_mb = glb.stat().st_size / 1e6
    print(f"  bpy.ops.import_scene.gltf ({size_mb:.1f} MB GLB): {med(gltf):.3f} s  (min {min(gltf):.3f})")
    print(f"    ... plus decoding its texture:        {med(gltf_decoded):.3f} s  (min {min(gltf_decoded):.3f})")
    print(f"  speed-up, main thread (update vs glTF): {med(gltf) / med(steady):.1f}x "
          f"({med(gltf_decoded) / med(steady):.1f}x counting the texture decode)")
    print(f"  speed-up, all work on the main thread:  {med(gltf) / med(whole):.1f}x "
          f"({med(gltf_decoded) / med(whole):.1f}x counting the texture decode)")
    ok = med(gltf) / med(steady) >= 5 and med(steady) < 0.3
    print(f"  target >= 5x and < 0.3 s:               {'met' if ok else 'NOT met'}")


def main() -> None:
    """Run the benchmark on both face orders and print the figures."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faces", type=int, default=200_000)
    p.add_argument("--texture", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    for shuffle, label in ((False, "faces in grid order"), (True, "faces in random order")):
        measure(torus(args.faces, args.texture, shuffle=shuffle), args.repeat, label)


if __name__ == "__main__":
    main()
