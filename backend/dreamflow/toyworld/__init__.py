"""The toy world: 36 coloured primitives with known 3D answers, their captioned renders, and a
small text-to-image diffusion model trained on them that ships with the package (weights/)."""

from pathlib import Path

#: The shipped generator: a diffusers StableDiffusionPipeline folder (``prior.model`` of the toy preset).
GENERATOR_FOLDER = Path(__file__).resolve().parent / "weights" / "generator"
