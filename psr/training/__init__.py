"""Training: the reconstruction LightningModule, its callbacks, ensembles of fits."""

from psr.training.callbacks import PenaltySchedule
from psr.training.reconstruction import PhaseSpaceReconstruction

__all__ = ["PenaltySchedule", "PhaseSpaceReconstruction"]
