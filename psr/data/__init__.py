"""Scan files, openPMD particle files, synthetic scans and the LightningDataModule."""

from psr.data.datamodule import ScanDataModule
from psr.data.synthetic import SyntheticBeam, SyntheticInjector

__all__ = ["ScanDataModule", "SyntheticBeam", "SyntheticInjector"]
