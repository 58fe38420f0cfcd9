"""DreamFlow backend: text to textured 3D with approximate probability flow ODE (APFO)."""

__version__ = "0.1.0"
