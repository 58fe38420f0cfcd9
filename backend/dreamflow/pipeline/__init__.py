"""The three DreamFlow stages composed from priors, methods, scene, render and export."""
