"""Differentiable renderers: volume rendering for NeRF, rasterisation for meshes."""
