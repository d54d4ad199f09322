"""psr.models: neural networks (beam generators, neural lattice elements). May import sim."""

from .flow import GaussianBeam, NormalizingFlowBeam, as_particles
from .generator import MLPBeamGenerator

__all__ = ["GaussianBeam", "MLPBeamGenerator", "NormalizingFlowBeam", "as_particles"]
