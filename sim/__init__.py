"""psr.sim: differentiable beam dynamics (torch only: no ML, no files)."""

from .aperture import Aperture
from .beam import ParticleBeam
from .bends import Dipole
from .cavities import RFCavity, TransverseDeflectingCavity
from .element import Element, LinearElement
from .lattice import ELEMENT_TYPES, Lattice, TrackResult, parse_setting_name
from .magnets import Drift, Quadrupole, Sextupole, Solenoid
from .screen import Screen
from .space_charge import SpaceCharge
from .space_charge_linear import LinearSpaceCharge
from .space_charge_gaussian import GaussianSpaceCharge
from .species import SPECIES, Species, get_species, relativistic_factors

__all__ = [
    "Aperture", "ELEMENT_TYPES", "Dipole", "Drift", "Element", "Lattice", "LinearElement", "ParticleBeam", "Quadrupole",
    "RFCavity", "SPECIES", "Screen", "Sextupole", "Solenoid", "SpaceCharge", "LinearSpaceCharge", "GaussianSpaceCharge", "TransverseDeflectingCavity", "Species", "TrackResult", "get_species", "parse_setting_name",
    "relativistic_factors",
]
