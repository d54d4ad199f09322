"""psr.models: neural networks (beam generators, neural lattice elements). May import sim."""

from .generator import MLPBeamGenerator

__all__ = ["MLPBeamGenerator"]
