"""`psr predict`: a trained run's beams and images at new settings (upstream and lattice) from a table."""

import csv
from pathlib import Path

import h5py
import numpy as np
import torch

from psr.data.atomic import atomic_target
from psr.data.checks import check_output_folder
from psr.outputs.report import write_beam
from psr.training.trained import load_trained


def read_settings_table(path) -> tuple[list[str], np.ndarray]:
    """(column names, (R, C) values) of a CSV table with a header of setting names and one row per prediction."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"settings table {path}: " + ("is a folder" if path.is_dir() else "no such file"))
    with path.open(newline="") as handle:
        rows = [row for row in csv.reader(handle) if any(cell.strip() for cell in row)]
    if len(rows) < 2:
        raise ValueError(f"settings table {path}: needs a header of setting names and at least one row")
    names = [cell.strip() for cell in rows[0]]
    if len(set(names)) != len(names) or "" in names:
        raise ValueError(f"settings table {path}: the header must name each column once, got {names}")
    values = np.empty((len(rows) - 1, len(names)))
    for i, row in enumerate(rows[1:]):
        if len(row) != len(names):
            raise ValueError(f"settings table {path}: row {i} has {len(row)} value(s), the header {len(names)}")
        for j, cell in enumerate(row):
            try:
                values[i, j] = float(cell)
            except ValueError:
                raise ValueError(f"settings table {path}: row {i}, column {names[j]}: {cell!r} is not a number") from None
            if not np.isfinite(values[i, j]):
                raise ValueError(f"settings table {path}: row {i}, column {names[j]} is not finite")
    return names, values


def check_columns(model, names: list[str], path) -> None:
    """Every column must be an upstream setting of the model or a parameter of its lattice; every upstream
    setting must be given."""
    lattice_names = [n for n in names if n not in model.upstream]
    for name in lattice_names:
        routed = model.setting_routes.get(name, name)
        try:
            model.lattice.split_settings({routed: 0.0})
        except (KeyError, ValueError) as err:
            known = ", ".join(model.setting_names)
            raise ValueError(f"settings table {path}: column {name!r} is not a setting this model knows "
                             f"({err.args[0]}); its scan's settings: {known}") from None
    missing = [n for n in model.upstream if n not in names]
    if missing:
        raise ValueError(f"settings table {path}: the model's beam depends on the upstream setting(s) {missing}: "
                         "give a column for each")


def range_warnings(model, names: list[str], values: np.ndarray) -> list[str]:
    """A warning for each upstream setting with values outside the range the model was trained on."""
    warnings = []
    for name in model.upstream:
        index = model.setting_names.index(name)
        low, high = model.scan_summary["low"][index], model.scan_summary["high"][index]
        column = values[:, names.index(name)]
        outside = np.flatnonzero((column < low - 1e-12 * abs(low)) | (column > high + 1e-12 * abs(high)))
        if outside.size:
            warnings.append(f"{name} = {', '.join(f'{column[i]:g}' for i in outside[:5])} (row(s) {outside[:5].tolist()}) "
                            f"lies outside the training range [{low:g}, {high:g}]: the prediction extrapolates")
    return warnings


def predict(run: str, settings: str, output: str, n_particles: int | None = None) -> tuple[Path, list[str]]:
    """Write <output>/row_<i>.h5 (openPMD beam at row i) and <output>/images.h5 (per screen (R, H, W) unit-sum
    images, with the settings table) for every row of the settings table. Returns the folder and the warnings.
    n_particles None: the beam its report's emittances are of (the fit's own samples, or a draw of
    `model.report_particles`); another count draws fresh base samples, whose tails a fit on fixed samples never saw
    (4D strong S: rms x of fresh 20k draws up to 5 % off the fit's)."""
    model, checkpoint = load_trained(run)
    names, values = read_settings_table(settings)
    check_columns(model, names, settings)
    warnings = range_warnings(model, names, values)
    out = Path(output)
    check_output_folder(out, "--output")
    columns = {name: torch.as_tensor(values[:, i], dtype=torch.float32) for i, name in enumerate(names)}
    beam, images = model.predict_at(columns, n_particles or model.hparams.get("report_particles"))
    particles = beam.particles.double().cpu().numpy()
    out.mkdir(parents=True, exist_ok=True)
    scan = type("Reference", (), {"p0c": model.p0c, "species": model.species, "charge": model.charge})()
    for i in range(len(values)):
        write_beam(out / f"row_{i}.h5", particles[i] if particles.ndim == 3 else particles, scan)
    with atomic_target(out / "images.h5") as tmp, h5py.File(tmp, "w-") as handle:
        table = handle.create_dataset("settings", data=values)
        table.attrs["names"] = np.array(names, dtype=h5py.string_dtype())
        table.attrs["upstream"] = np.array(model.upstream, dtype=h5py.string_dtype())
        handle.attrs["run"] = str(Path(run).resolve())
        handle.attrs["checkpoint"] = str(checkpoint.resolve())
        for name, stack in images.items():
            handle.create_dataset(f"screens/{name}", data=stack.float().cpu().numpy(), compression="gzip")
    return out, warnings
