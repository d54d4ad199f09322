"""Particle species: rest energy [eV] and charge [e]."""

from dataclasses import dataclass

SPEED_OF_LIGHT = 299_792_458.0  # m/s
ELEMENTARY_CHARGE = 1.602176634e-19  # C


@dataclass(frozen=True)
class Species:
    """A particle species with rest energy `mass_eV` [eV] and charge `charge_e` [e]."""

    name: str
    mass_eV: float
    charge_e: int


SPECIES = {
    "electron": Species("electron", 510_998.95, -1),
    "positron": Species("positron", 510_998.95, +1),
    "proton": Species("proton", 938_272_088.16, +1),
}


def get_species(species: "str | Species") -> Species:
    """Look a species up by name; raises ValueError naming the known species."""
    if isinstance(species, Species):
        return species
    try:
        return SPECIES[str(species).lower()]
    except KeyError:
        raise ValueError(
            f"unknown species {species!r}; known species: {', '.join(SPECIES)}"
        ) from None


def relativistic_factors(p0c: float, species: "str | Species") -> tuple[float, float]:
    """(gamma, beta) of the reference particle with momentum `p0c` [eV] (a number or a tensor)."""
    mass = get_species(species).mass_eV
    energy = (p0c**2 + mass**2) ** 0.5
    return energy / mass, p0c / energy
