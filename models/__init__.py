"""psr.models: neural networks (beam generators, neural lattice elements). May import sim."""

from .flow import GaussianBeam, NormalizingFlowBeam
from .generator import MLPBeamGenerator

__all__ = ["GaussianBeam", "MLPBeamGenerator", "NormalizingFlowBeam"]
