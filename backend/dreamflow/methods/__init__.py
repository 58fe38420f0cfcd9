"""Distillation methods (APFO, VSD, SDS, FSD) as small target rules over one optimisation loop."""
