"""Live import in place: raw mesh/texture arrays -> Blender datablocks, and the reverse for refinement.

Everything here runs on Blender's main thread (it touches ``bpy``). A received mesh becomes a NEW
Mesh datablock, built fully from numpy arrays with ``foreach_set`` and validated before it is
swapped into the job's Object; only then is the old datablock removed. A failure at any point
removes the half-built datablock and leaves the scene as it was, so an artist never sees a broken
mesh. The texture image is one datablock per job, overwritten while the job previews, packed into
the .blend at each stage's final mesh and at the job's end, and packed again before every save
when its pixels changed since: a saved file holds the texture shown.

The numpy half of an import (checks, edges, per-corner UVs, pixel conversion) lives in
``meshprep.py`` and normally runs on the session's preparation thread; what is here only copies
prepared buffers into Blender. Every function also accepts raw message arrays (prepared here).
"""

from __future__ import annotations

from typing import Any, Mapping

import bpy
import numpy as np

from .meshprep import ImportError_, PreparedImage, PreparedMesh, prepare_image, prepare_mesh

JOB_KEY = "dreamflow_job"            # custom property on the Object: the job it shows
OBJECT_ID_KEY = "dreamflow_object_id"  # custom property on the Object: its stable id for refinement
def build_mesh(name: str, prepared: PreparedMesh, custom_normals: bool = False) -> bpy.types.Mesh:
    """A new Mesh datablock from a prepared mesh, built with ``foreach_set`` and validated.

    Positions, corner vertices, edges and corner edges go straight into Blender's generic
    attributes (one memory copy each); faces are smooth-shaded (no ``sharp_face`` attribute), so
    Blender's own vertex normals, which match the backend's for a closed surface, are used.
    ``custom_normals`` additionally stores the received normals as custom normals (costs about
    as much as the rest of the build). On any failure the half-built datablock is removed and
    the error re-raised.
    """
    p = prepared
    mesh = bpy.data.meshes.new(name)
    try:
        n_v, n_e, n_f = len(p.vertices), len(p.edge_verts), len(p.faces)
        mesh.vertices.add(n_v)
        mesh.edges.add(n_e)
        mesh.loops.add(3 * n_f)
        mesh.polygons.add(n_f)
        attrs = mesh.attributes
        attrs["position"].data.foreach_set("vector", p.vertices.ravel())
        attrs[".edge_verts"].data.foreach_set("value", p.edge_verts.ravel())
        attrs[".corner_vert"].data.foreach_set("value", p.faces.ravel())
        attrs[".corner_edge"].data.foreach_set("value", p.corner_edge)
        mesh.polygons.foreach_set("loop_start", p.loop_start)
        if p.corner_uvs is not None:
            mesh.uv_layers.new(name="UVMap").uv.foreach_set("vector", p.corner_uvs)
        mesh.update()
        if (len(mesh.vertices), len(mesh.edges), len(mesh.polygons), len(mesh.loops)) != (n_v, n_e, n_f, 3 * n_f):
            raise ImportError_("Blender rejected the mesh data (element counts changed while building)")
        if p.normals is not None and custom_normals:
            mesh.normals_split_custom_set_from_vertices(p.normals)
        return mesh
    except Exception:
        bpy.data.meshes.remove(mesh)
        raise


def swap_mesh(obj: bpy.types.Object, new_mesh: bpy.types.Mesh) -> None:
    """Put ``new_mesh`` into ``obj`` keeping its materials; remove the old mesh if nothing else uses it."""
    old = obj.data
    if old is not None and not new_mesh.materials:
        for mat in old.materials:
            new_mesh.materials.append(mat)
    obj.data = new_mesh
    if old is not None and old.users == 0:
        bpy.data.meshes.remove(old)


def find_job_object(job_id: str) -> bpy.types.Object | None:
    """The Object that shows job ``job_id``, if any."""
    for obj in bpy.data.objects:
        if obj.get(JOB_KEY) == job_id:
            return obj
    return None


def find_object_by_id(object_id: str) -> bpy.types.Object | None:
    """The Object whose stable DreamFlow id is ``object_id`` (survives renames), else by name."""
    if not object_id:
        return None
    for obj in bpy.data.objects:
        if obj.get(OBJECT_ID_KEY) == object_id:
            return obj
    return bpy.data.objects.get(object_id)


def ensure_object_id(obj: bpy.types.Object) -> str:
    """The Object's stable DreamFlow id, created on first use."""
    import uuid

    value = obj.get(OBJECT_ID_KEY)
    if not isinstance(value, str) or not value:
        value = uuid.uuid4().hex
        obj[OBJECT_ID_KEY] = value
    return value


def create_job_object(scene: bpy.types.Scene, job_id: str, name: str, mesh: bpy.types.Mesh) -> bpy.types.Object:
    """A new Object for a job, linked to the scene's collection, carrying ``mesh``."""
    obj = bpy.data.objects.new(name or f"DreamFlow {job_id[:8]}", mesh)
    obj[JOB_KEY] = job_id
    ensure_object_id(obj)
    scene.collection.objects.link(obj)
    return obj


def pixels_to_texture(image: bpy.types.Image) -> np.ndarray:
    """An image's pixels as uint8 (H, W, 4), row 0 on top (the inverse of ``meshprep.texture_to_pixels``)."""
    w, h = image.size
    buf = np.empty(w * h * image.channels, dtype=np.float32)
    image.pixels.foreach_get(buf)
    arr = buf.reshape(h, w, image.channels)[::-1]
    if image.channels == 3:
        arr = np.concatenate([arr, np.ones((h, w, 1), np.float32)], axis=2)
    return np.ascontiguousarray((np.clip(arr[:, :, :4], 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def write_image(name: str, texture: np.ndarray | PreparedImage,
                image: bpy.types.Image | None = None) -> bpy.types.Image:
    """Write ``texture`` into ``image`` (reused, resized if needed) or into a new image datablock."""
    prepared = texture if isinstance(texture, PreparedImage) else prepare_image(texture)
    w, h = prepared.width, prepared.height
    if image is None:
        image = bpy.data.images.new(name, w, h, alpha=True)
    elif tuple(image.size) != (w, h):
        if image.packed_file is not None:
            image.unpack(method="REMOVE")
        image.scale(w, h)
    image.pixels.foreach_set(prepared.pixels)
    image.update()
    return image


def job_material(obj: bpy.types.Object, name: str) -> bpy.types.Material:
    """The object's first material, created as Principled BSDF + Image Texture if it has none."""
    mesh = obj.data
    if mesh.materials and mesh.materials[0] is not None:
        return mesh.materials[0]
    mat = bpy.data.materials.new(name)
    if bpy.app.version < (5, 0, 0):
        mat.use_nodes = True  # always on from Blender 5.0 (the property is deprecated there)
    nodes = mat.node_tree.nodes
    bsdf = next((n for n in nodes if n.type == "BSDF_PRINCIPLED"), None) or nodes.new("ShaderNodeBsdfPrincipled")
    tex = nodes.new("ShaderNodeTexImage")
    tex.location = (bsdf.location.x - 320, bsdf.location.y)
    mat.node_tree.links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
    mesh.materials.append(mat)
    return mat


def material_image_node(mat: bpy.types.Material) -> bpy.types.ShaderNode | None:
    """The first Image Texture node of a node material, if any."""
    if mat is None or mat.node_tree is None:
        return None
    return next((n for n in mat.node_tree.nodes if n.type == "TEX_IMAGE"), None)


def apply_texture(obj: bpy.types.Object, texture: np.ndarray | PreparedImage, job_id: str) -> bpy.types.Image:
    """Show ``texture`` on the object's material, reusing the image datablock the job already has."""
    mat = job_material(obj, f"DreamFlow {job_id[:8]}")
    node = material_image_node(mat)
    if node is None:
        node = mat.node_tree.nodes.new("ShaderNodeTexImage")
        bsdf = next((n for n in mat.node_tree.nodes if n.type == "BSDF_PRINCIPLED"), None)
        if bsdf is not None:
            mat.node_tree.links.new(node.outputs["Color"], bsdf.inputs["Base Color"])
    node.image = write_image(f"DreamFlow {job_id[:8]}", texture, node.image)
    return node.image


def apply_mesh(scene: bpy.types.Scene, job_id: str, arrays: Mapping[str, Any] | PreparedMesh, object_name: str = "",
               object_id: str = "", stage: str = "", step: int = -1, final: bool = False,
               custom_normals: bool = False) -> bpy.types.Object:
    """Apply one mesh message in place: the job's Object gets a freshly built Mesh (and texture).

    ``arrays`` is a :class:`PreparedMesh` (prepared off the main thread) or the message's raw
    arrays. The Object is found by ``object_id`` (a refinement of an artist's object), else by
    job id, else created. Transforms, modifiers, selection and materials of an existing Object
    survive. ``custom_normals`` stores the received normals as custom normals.
    """
    prepared = arrays if isinstance(arrays, PreparedMesh) else prepare_mesh(arrays)
    obj = find_object_by_id(object_id) if object_id else None
    if obj is None:
        obj = find_job_object(job_id)
    if obj is not None and obj.type != "MESH":
        raise ImportError_(f"object {obj.name!r} is not a mesh object")
    mesh = build_mesh(f"DreamFlow {job_id[:8]}", prepared, custom_normals)
    mesh["dreamflow_stage"] = stage
    mesh["dreamflow_step"] = int(step)
    mesh["dreamflow_final"] = bool(final)
    try:
        if obj is None:
            obj = create_job_object(scene, job_id, object_name, mesh)
        else:
            swap_mesh(obj, mesh)
            obj[JOB_KEY] = job_id
    except Exception:
        if mesh.users == 0:
            bpy.data.meshes.remove(mesh)
        raise
    if prepared.texture is not None:
        apply_texture(obj, prepared.texture, job_id)
    return obj


def pack_job_images(obj: bpy.types.Object) -> int:
    """Pack the object's material images into the .blend as they are now; return how many were (re)packed.

    An image packed earlier whose pixels changed since (a later stage, a refinement) is dirty and
    is packed again from its pixels: a packed image is saved from its packed data, never from
    what is shown. A clean packed image is left alone (packing it again would reload it from a
    file it does not have).
    """
    packed = 0
    for mat in getattr(obj.data, "materials", []):
        node = material_image_node(mat)
        image = node.image if node is not None else None
        if image is not None and (image.packed_file is None or image.is_dirty):
            image.pack()
            packed += 1
    return packed


def pack_all_job_images() -> int:
    """(Re)pack the images of every object a DreamFlow job made or updated; how many were packed."""
    return sum(pack_job_images(obj) for obj in bpy.data.objects if obj.get(JOB_KEY) and obj.type == "MESH")


def extract_refine_input(obj: bpy.types.Object, depsgraph: bpy.types.Depsgraph) -> dict[str, np.ndarray]:
    """The object's evaluated mesh (modifiers applied) in object space as protocol mesh arrays.

    Triangulated via loop triangles; per-corner UVs become per-vertex UVs by splitting vertices
    where corners of one vertex disagree; the first material's image texture is included if any.
    """
    if obj.type != "MESH":
        raise ImportError_(f"{obj.name!r} is not a mesh object")
    evaluated = obj.evaluated_get(depsgraph)
    mesh = evaluated.to_mesh()
    try:
        mesh.calc_loop_triangles()
        n_tri, n_loop, n_vert = len(mesh.loop_triangles), len(mesh.loops), len(mesh.vertices)
        if n_tri == 0:
            raise ImportError_(f"{obj.name!r} has no faces to refine")
        tri_loops = np.empty(3 * n_tri, dtype=np.int32)
        mesh.loop_triangles.foreach_get("loops", tri_loops)
        loop_vert = np.empty(n_loop, dtype=np.int32)
        mesh.loops.foreach_get("vertex_index", loop_vert)
        co = np.empty(3 * n_vert, dtype=np.float32)
        mesh.vertices.foreach_get("co", co)
        co = co.reshape(-1, 3)
        layer = mesh.uv_layers.active
        if layer is None:
            used, faces = np.unique(loop_vert[tri_loops], return_inverse=True)
            out = {"vertices": co[used], "faces": faces.reshape(-1, 3).astype(np.int32)}
        else:
            uv = np.empty(2 * n_loop, dtype=np.float32)
            layer.uv.foreach_get("vector", uv)
            uv = uv.reshape(-1, 2)
            corners = tri_loops
            # A vertex is split wherever its corners carry different UVs (a seam); exact bit
            # equality keeps the split deterministic.
            key = np.empty((len(corners), 3), dtype=np.int64)
            key[:, 0] = loop_vert[corners]
            key[:, 1:] = uv[corners].view(np.int32)
            uniq, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
            out = {"vertices": co[uniq[:, 0]], "faces": inverse.reshape(-1, 3).astype(np.int32),
                   "uvs": np.ascontiguousarray(uv[corners[first]])}
        for mat in mesh.materials:
            node = material_image_node(mat)
            if node is not None and node.image is not None and node.image.size[0] > 0:
                out["texture"] = pixels_to_texture(node.image)
                break
        return out
    finally:
        evaluated.to_mesh_clear()
