"""The catalogue of bad inputs: every entry ends `psr fit`, `psr simulate` or `psr ensemble` with exit code 2
and one line `psr <command>: error: <what is wrong, where>`, no traceback, no banner, and no run folder or
output file left behind. One test per entry."""

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from psr.cli import main
from psr.data.simulate import simulate
from psr.data.synthetic import SyntheticBeam

LATTICE = """- {type: Quadrupole, name: Q1, length: 0.1, k1: 0.0}
- {type: Drift, name: D1, length: 2.0}
- {type: Screen, name: YAG, resolution: [24, 24], pixel_size: [3.0e-4, 3.0e-4]}
"""
BEAM = "--beam=psr.data.SyntheticBeam"
MEMBERS = ["--members", "2"]


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scan")
    (folder / "lattice.yaml").write_text(LATTICE)
    return simulate(str(folder / "scan.h5"), str(folder / "lattice.yaml"), {"Q1.k1": [-6.0, -2.0, 2.0, 6.0]},
                    p0c=60e6, beam=SyntheticBeam(), n_particles=2000, seed=0)


def edited(tmp, scan, edit) -> Path:
    """A copy of the valid scan file changed by edit(h5py.File)."""
    path = tmp / "bad.h5"
    shutil.copy(scan, path)
    with h5py.File(path, "r+") as handle:
        edit(handle)
    return path


def set_image(value, index=(1, 5, 5)):
    def edit(handle):
        images = handle["screens/YAG/images"][...]
        if index is None:
            images[1] = value
        else:
            images[index] = value
        handle["screens/YAG/images"][...] = images
    return edit


def set_lattice(index, key, value):
    def edit(handle):
        items = yaml.safe_load(handle["lattice"].attrs["yaml"])
        items[index][key] = value
        handle["lattice"].attrs["yaml"] = yaml.safe_dump(items)
    return edit


def truncated(tmp, scan):
    data = Path(scan).read_bytes()
    (tmp / "cut.h5").write_bytes(data[: len(data) // 2])
    return tmp / "cut.h5"


def fit(tmp, path, *extra):
    return ["fit", "--config", "configs/quad_scan_4d.yaml", f"--data.path={path}",
            f"--trainer.logger.init_args.save_dir={tmp / 'runs'}", "--model.generator.init_args.n_particles=500",
            "--trainer.max_epochs=1", "--data.steps_per_epoch=2", *extra]


def lattice_file(tmp, text):
    (tmp / "bad.lattice.yaml").write_text(text)
    return tmp / "bad.lattice.yaml"


def simulate_args(tmp, lattice, *extra, settings='{"Q1.k1": [1.0, 2.0]}'):
    return ["simulate", f"--output={tmp / 'out' / 'sim.h5'}", f"--lattice={lattice}", "--p0c=6e7",
            f"--settings={settings}", "--n_particles=500", BEAM, *extra]


def config_file(tmp, text):
    (tmp / "bad.yaml").write_text(text)
    return tmp / "bad.yaml"


# (id, command, arguments made from (tmp folder, valid scan), words the error line must contain)
CATALOGUE = [
    # scan files
    ("scan-missing", lambda t, s: fit(t, t / "nope.h5"), ["nope.h5", "no such file"]),
    ("scan-is-folder", lambda t, s: fit(t, t), ["is a folder"]),
    ("scan-not-hdf5", lambda t, s: (t / "x.h5").write_text("hello") and fit(t, t / "x.h5"), ["x.h5", "not an HDF5"]),
    ("scan-truncated", lambda t, s: fit(t, truncated(t, s)), ["cut.h5", "not an HDF5"]),
    ("scan-wrong-format", lambda t, s: fit(t, edited(t, s, lambda h: h.attrs.modify("psr_format", "pairs"))),
     ["bad.h5", "psr_format"]),
    ("scan-wrong-version", lambda t, s: fit(t, edited(t, s, lambda h: h.attrs.modify("psr_version", 7))),
     ["bad.h5", "psr_version 7"]),
    ("scan-no-settings", lambda t, s: fit(t, edited(t, s, lambda h: h.__delitem__("settings"))), ["/settings missing"]),
    ("scan-no-lattice", lambda t, s: fit(t, edited(t, s, lambda h: h.__delitem__("lattice"))), ["/lattice missing"]),
    ("scan-no-p0c", lambda t, s: fit(t, edited(t, s, lambda h: h.attrs.__delitem__("p0c"))), ["p0c", "missing"]),
    ("scan-settings-count", lambda t, s: fit(t, edited(t, s, lambda h: (
        h.__delitem__("settings"), h.create_dataset("settings", data=np.zeros((3, 1))),
        h["settings"].attrs.create("names", ["Q1.k1"])))), ["/screens/YAG/images", "3"]),
    ("scan-unknown-setting", lambda t, s: fit(t, edited(t, s, lambda h: h["settings"].attrs.modify("names", ["Q7.k1"]))),
     ["Q7"]),
    ("image-nan", lambda t, s: fit(t, edited(t, s, set_image(np.nan))), ["/screens/YAG/images", "NaN", "[1]"]),
    ("image-inf", lambda t, s: fit(t, edited(t, s, set_image(np.inf))), ["/screens/YAG/images", "infinite"]),
    ("image-negative", lambda t, s: fit(t, edited(t, s, set_image(-1.0))), ["/screens/YAG/images", "negative"]),
    ("image-all-zero", lambda t, s: fit(t, edited(t, s, set_image(0.0, None))), ["bad.h5", "screen YAG", "[1]", "empty"]),
    ("screen-resolution", lambda t, s: fit(t, edited(t, s, set_lattice(2, "resolution", [24, 20]))),
     ["YAG", "resolution"]),
    ("screen-pixel-size", lambda t, s: fit(t, edited(t, s, lambda h: h["screens/YAG"].attrs.modify(
        "pixel_size", [4e-4, 3e-4]))), ["YAG", "pixel_size"]),
    # lattices
    ("lattice-unknown-type", lambda t, s: simulate_args(t, lattice_file(t, LATTICE.replace("Drift", "Drfit"))),
     ["bad.lattice.yaml", "Drfit"]),
    ("lattice-negative-length", lambda t, s: simulate_args(t, lattice_file(t, LATTICE.replace("2.0", "-2.0"))),
     ["D1", "length", ">= 0"]),
    ("lattice-non-numeric", lambda t, s: simulate_args(t, lattice_file(t, LATTICE.replace("k1: 0.0", "k1: strong"))),
     ["Q1", "k1", "number"]),
    ("lattice-duplicate-names", lambda t, s: simulate_args(t, lattice_file(t, LATTICE.replace("D1", "Q1"))),
     ["unique", "Q1"]),
    ("lattice-empty", lambda t, s: simulate_args(t, lattice_file(t, "[]\n")), ["bad.lattice.yaml", "empty"]),
    ("lattice-yaml-syntax", lambda t, s: simulate_args(t, lattice_file(t, LATTICE.replace("k1: 0.0}", "k1: 0.0"))),
     ["bad.lattice.yaml", "line"]),
    ("lattice-missing-file", lambda t, s: simulate_args(t, t / "none.yaml"), ["none.yaml", "no such file"]),
    ("lattice-in-scan-unknown-type", lambda t, s: fit(t, edited(t, s, set_lattice(1, "type", "Drfit"))),
     ["bad.h5", "Drfit"]),
    # configs
    ("config-missing", lambda t, s: ["fit", "--config", str(t / "none.yaml")], ["none.yaml", "no such file"]),
    ("config-yaml-syntax", lambda t, s: ["fit", "--config", str(config_file(t, "model:\n  lr: [1, 2\n  loss: l1\n"))],
     ["bad.yaml", "line 3"]),
    ("config-not-mapping", lambda t, s: ["fit", "--config", str(config_file(t, "- 1\n- 2\n"))], ["bad.yaml", "mapping"]),
    ("config-unknown-key", lambda t, s: fit(t, s, "--model.learning_rate=0.1"), ["learning_rate"]),
    ("config-unknown-key-in-file", lambda t, s: fit(t, s, "--config", str(config_file(t, "model:\n  colour: red\n"))),
     ["colour"]),
    ("particles-zero", lambda t, s: fit(t, s, "--model.generator.init_args.n_particles=0"), ["n_particles", "0"]),
    ("particles-negative", lambda t, s: fit(t, s, "--model.generator.init_args.n_particles=-5"), ["n_particles", "-5"]),
    ("particles-not-integer", lambda t, s: fit(t, s, "--model.generator.init_args.n_particles=many"),
     ["n_particles", "many"]),
    ("particles-too-many", lambda t, s: fit(t, s, "--model.generator.init_args.n_particles=100000000000"),
     ["n_particles", "GiB"]),
    ("epochs-zero", lambda t, s: fit(t, s, "--trainer.max_epochs=0"), ["max_epochs", "0"]),
    ("steps-negative", lambda t, s: fit(t, s, "--trainer.max_steps=-4"), ["max_steps", "-4"]),
    ("steps-per-epoch-zero", lambda t, s: fit(t, s, "--data.steps_per_epoch=0"), ["steps_per_epoch", "0"]),
    ("lr-zero", lambda t, s: fit(t, s, "--model.lr=0"), ["lr", "positive"]),
    ("lr-negative", lambda t, s: fit(t, s, "--model.lr=-0.01"), ["lr", "positive"]),
    ("loss-unknown", lambda t, s: fit(t, s, "--model.loss=l3"), ["l3"]),
    ("class-path-unknown", lambda t, s: fit(t, s, "--model.generator.class_path=models.NoSuchBeam"),
     ["models.NoSuchBeam"]),
    ("tracking-unknown-element", lambda t, s: fit(t, s, "--model.tracking={Q9: chromatic}"), ["Q9"]),
    ("space-charge-without-charge", lambda t, s: fit(t, edited(t, s, lambda h: h.attrs.modify("charge", 0.0)),
                                                     "--model.space_charge={grid_shape: [8, 8, 8], max_step: 0.5}"),
     ["space_charge", "charge"]),
    # model.calibrate (DESIGN.md "Calibration")
    ("calibrate-unknown-element", lambda t, s: fit(t, s, "--model.calibrate={Q9.k1: {kind: scale}}"),
     ["model.calibrate", "Q9.k1", "no element named 'Q9'"]),
    ("calibrate-unknown-parameter", lambda t, s: fit(t, s, "--model.calibrate={Q1.k7: {kind: scale}}"),
     ["model.calibrate", "Q1.k7", "no parameter 'k7'"]),
    ("calibrate-unknown-kind", lambda t, s: fit(t, s, "--model.calibrate={Q1.k1: {kind: stretch}}"),
     ["Q1.k1", "unknown kind 'stretch'", "scale"]),
    ("calibrate-shape", lambda t, s: fit(t, s, "--model.calibrate={YAG.center: {kind: offset, init: [0, 0, 0]}}"),
     ["YAG.center", "shape (3,)", "(2,)"]),
    ("calibrate-scanned-shape", lambda t, s: fit(t, s, "--model.calibrate={Q1.k1: {kind: scale, init: [1, 1]}}"),
     ["Q1.k1", "shape (2,)", "one value per setting"]),
    ("calibrate-prior-sigma", lambda t, s: fit(t, s, "--model.calibrate={Q1.k1: {kind: scale, prior_sigma: -1}}"),
     ["Q1.k1", "prior_sigma", "positive"]),
    ("simulate-machine-unknown-parameter", lambda t, s: simulate_args(
        t, lattice_file(t, LATTICE), '--machine={Q1.x_off: {kind: offset, value: 1.0e-3}}'), ["machine", "Q1.x_off"]),
    ("output-under-a-file", lambda t, s: (t / "afile").write_text("x") and fit(
        t, s, f"--trainer.logger.init_args.save_dir={t / 'afile' / 'runs'}"), ["afile", "is a file"]),
    ("output-unwritable", lambda t, s: fit(t, s, "--trainer.logger.init_args.save_dir=/proc/psr-runs"),
     ["/proc/psr-runs", "cannot"]),
    # psr simulate
    ("simulate-unknown-setting", lambda t, s: simulate_args(t, lattice_file(t, LATTICE), settings='{"Q9.k1": [1.0]}'),
     ["Q9"]),
    ("simulate-zero-particles", lambda t, s: simulate_args(t, lattice_file(t, LATTICE), "--n_particles=0"),
     ["n_particles"]),
    ("simulate-missing-beam-file", lambda t, s: ["simulate", f"--output={t / 'out' / 'sim.h5'}",
                                                 f"--lattice={lattice_file(t, LATTICE)}", "--p0c=6e7",
                                                 '--settings={"Q1.k1": [1.0]}', f"--beam_file={t / 'beam.h5'}"],
     ["beam.h5", "no such file"]),
    ("simulate-negative-p0c", lambda t, s: simulate_args(t, lattice_file(t, LATTICE), "--p0c=-1"), ["p0c"]),
    ("simulate-unwritable-output", lambda t, s: ["simulate", "--output=/proc/psr/sim.h5",
                                                 f"--lattice={lattice_file(t, LATTICE)}", "--p0c=6e7",
                                                 '--settings={"Q1.k1": [1.0]}', BEAM], ["/proc/psr", "cannot"]),
    # psr ensemble
    ("ensemble-one-member", lambda t, s: ["ensemble", "--members", "1", *fit(t, s)[1:]], ["at least 2"]),
    ("ensemble-bad-scan", lambda t, s: ["ensemble", *MEMBERS, *fit(t, t / "nope.h5")[1:]], ["nope.h5", "no such file"]),
    ("ensemble-missing-config", lambda t, s: ["ensemble", *MEMBERS, "--config", str(t / "none.yaml")],
     ["none.yaml", "no such file"]),
    ("ensemble-bad-option", lambda t, s: ["ensemble", *MEMBERS, *fit(t, s, "--model.generator.init_args.n_particles=0")[1:]],
     ["n_particles"]),
]


@pytest.mark.parametrize("case", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input(case, scan, tmp_path, capfd):
    name, make_args, words = case
    args = make_args(tmp_path, scan)
    before = {p for p in tmp_path.rglob("*")}
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capfd.readouterr()
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert exit_info.value.code == 2, (out, err)
    assert len(lines) == 1, lines
    command = args[0]
    assert lines[0].startswith(f"psr {command}: error: "), lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in err
    left = {p for p in tmp_path.rglob("*")} - before
    assert not left, f"left behind: {sorted(map(str, left))}"
