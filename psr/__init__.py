"""psr: phase-space reconstruction. Data flows data/ (scan files, openPMD, simulation, the data
module) -> training/ (Lightning module, callbacks, ensembles) -> outputs/ (reports, plots) -> cli."""
