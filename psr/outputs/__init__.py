"""What a fit leaves behind: the beam (openPMD), emittance tables, plots, ensemble summaries."""
