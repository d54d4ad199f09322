"""Subsample fits' reconstructed beams (beam.h5) into small openPMD files: input beams for `psr simulate-pairs
--beam_files` (surrogate training data from the beams fits visit; data/sc_section.visited.pairs.yaml).

    python scripts/visited_beams.py OUT_FOLDER NAME=RUN_FOLDER_OR_BEAM_FILE ... [--particles 4000] [--seed 0] [--p0c 5e6]

Each beam keeps `--particles` of its particles (drawn without replacement, seeded), the bunch charge and p0c,
and is written to OUT_FOLDER/NAME.h5.
"""

import argparse
from pathlib import Path

import numpy as np

from psr.data.openpmd import read_openpmd, write_openpmd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("beams", nargs="+", help="NAME=path of a run folder (its beam.h5) or of a beam file")
    parser.add_argument("--particles", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--p0c", type=float, default=None, help="reference momentum [eV] (default: the beam's mean)")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for entry in args.beams:
        name, _, path = entry.partition("=")
        path = Path(path) / "beam.h5" if Path(path).is_dir() else Path(path)
        beam = read_openpmd(path, p0c=args.p0c)
        keep = rng.choice(len(beam.particles), min(args.particles, len(beam.particles)), replace=False)
        write_openpmd(args.out / f"{name}.h5", beam.particles[np.sort(keep)], p0c=beam.p0c, species=beam.species,
                      charge=beam.charge)
        print(f"{args.out / name}.h5: {len(keep)} of {len(beam.particles)} particles of {path}")


if __name__ == "__main__":
    main()
