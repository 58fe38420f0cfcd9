"""Diffusion priors (denoisers in EDM form) and score models of rendered images."""
