"""psr.models: neural networks (beam generators, neural lattice elements). May import sim."""

from .conditional import ConditionalMLPBeam
from .elements import NEURAL_ELEMENT_TYPES, ResidualElement, SectionMap, element_types
from .flow import GaussianBeam, NormalizingFlowBeam, as_particles
from .generator import MLPBeamGenerator

__all__ = ["ConditionalMLPBeam", "GaussianBeam", "MLPBeamGenerator", "NEURAL_ELEMENT_TYPES", "NormalizingFlowBeam", "ResidualElement",
           "SectionMap", "as_particles", "element_types"]
