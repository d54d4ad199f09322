"""The import config (`<name>.import.yaml`, DESIGN.md "Measured images") and its settings table, checked.

Paths in the config are relative to the config file's folder. Image files named in the table are
relative to the table's folder, or to `images` when the config gives that folder (an extension).
"""

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

import sim
from psr.data.checks import InputError
from psr.data.preprocess import FLIPS, ROTATIONS
from sim.lattice import _yaml_loader, load_lattice_text

REQUIRED = ("output", "lattice", "p0c", "table", "screens")
OPTIONAL = {"species": "electron", "charge": 0.0, "calibration": None, "preprocess": None, "images": None}
SCREEN_KEYS = {"pixel_size", "rotate", "flip", "dark", "full_scale"}
PREPROCESS = {"median": 0, "threshold": 0, "crop": "auto", "margin": 0.15, "pool": "auto", "max_pixels": 200,
              "saturation": "warn", "align": "none"}
RESERVED_COLUMNS = ("file", "screen", "shot")


def _mapping(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise InputError(f"{where} must be a mapping of keys, got {type(value).__name__}")
    return value


def _unknown(keys, allowed, where: str) -> None:
    unknown = sorted(set(keys) - set(allowed))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _number(value, where: str, positive=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or (positive and value <= 0):
        raise InputError(f"{where} must be a {'positive ' if positive else ''}number, got {value!r}")
    return float(value)


def _screen(name, entry, folder: Path, where: str) -> dict:
    entry = _mapping(entry, f"{where}: screens.{name}")
    _unknown(entry, SCREEN_KEYS, f"{where}: screens.{name}")
    if "pixel_size" not in entry:
        raise InputError(f"{where}: screens.{name}.pixel_size is missing (m per raw camera pixel, [dx, dy])")
    size = entry["pixel_size"]
    size = [size, size] if isinstance(size, (int, float)) else size
    if not isinstance(size, list) or len(size) != 2:
        raise InputError(f"{where}: screens.{name}.pixel_size must be [dx, dy] in metres, got {entry['pixel_size']!r}")
    rotate, flip = entry.get("rotate", 0), entry.get("flip", "none")
    if rotate not in ROTATIONS or isinstance(rotate, bool):
        raise InputError(f"{where}: screens.{name}.rotate must be one of {list(ROTATIONS)}, got {rotate!r}")
    flip = "none" if flip is None else flip
    if flip not in FLIPS:
        raise InputError(f"{where}: screens.{name}.flip must be one of {list(FLIPS)}, got {flip!r}")
    dark = entry.get("dark") or []
    dark = [dark] if isinstance(dark, str) else dark
    if not isinstance(dark, list) or not all(isinstance(d, str) for d in dark):
        raise InputError(f"{where}: screens.{name}.dark must be a list of image files, got {entry.get('dark')!r}")
    full_scale = entry.get("full_scale")
    return {"pixel_size": [_number(v, f"{where}: screens.{name}.pixel_size", positive=True) for v in size],
            "rotate": int(rotate), "flip": flip, "dark": [folder / d for d in dark],
            "full_scale": None if full_scale is None else _number(full_scale, f"{where}: screens.{name}.full_scale", True)}


def _preprocess(entry, where: str) -> dict:
    pre = dict(PREPROCESS)
    entry = _mapping(entry or {}, f"{where}: preprocess")
    _unknown(entry, PREPROCESS, f"{where}: preprocess")
    pre.update(entry)
    w = f"{where}: preprocess"
    if isinstance(pre["median"], bool) or not isinstance(pre["median"], int) or pre["median"] < 0:
        raise InputError(f"{w}.median must be a filter size in pixels (0 = off), got {pre['median']!r}")
    t = pre["threshold"]
    if not (t in ("triangle", "otsu", "noise") or (isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t < 1)):
        raise InputError(f"{w}.threshold must be triangle, otsu, noise, a fraction of the maximum in (0, 1) or 0 (off), "
                         f"got {t!r}")
    c = pre["crop"]
    if c != "auto" and not (isinstance(c, list) and len(c) == 4 and all(isinstance(v, int) and v >= 0 for v in c)):
        raise InputError(f"{w}.crop must be auto or [x0, x1, y0, y1] (pixels, after rotation), got {c!r}")
    _number(pre["margin"], f"{w}.margin")
    if pre["margin"] < 0:
        raise InputError(f"{w}.margin must be >= 0, got {pre['margin']!r}")
    if pre["pool"] != "auto" and (isinstance(pre["pool"], bool) or not isinstance(pre["pool"], int) or pre["pool"] < 1):
        raise InputError(f"{w}.pool must be auto or an integer factor >= 1, got {pre['pool']!r}")
    if isinstance(pre["max_pixels"], bool) or not isinstance(pre["max_pixels"], int) or pre["max_pixels"] < 1:
        raise InputError(f"{w}.max_pixels must be a positive integer, got {pre['max_pixels']!r}")
    if pre["saturation"] not in ("warn", "error"):
        raise InputError(f"{w}.saturation must be warn or error, got {pre['saturation']!r}")
    if pre["align"] not in ("none", "shots", "settings"):
        raise InputError(f"{w}.align must be none, shots or settings, got {pre['align']!r}")
    return pre


def load_import_config(path) -> dict:
    """The checked config: paths resolved against its folder, screens and preprocess with defaults filled in,
    `text` (the file's text), `lattice_items` and `lattice` (a sim.Lattice)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config {path}: no such file")
    text = path.read_text()
    try:
        config = yaml.load(text, Loader=_yaml_loader())  # YAML with 1.0e6-style floats read as numbers
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    config = _mapping(config, f"{path}")
    _unknown(config, set(REQUIRED) | set(OPTIONAL), str(path))
    missing = [key for key in REQUIRED if key not in config]
    if missing:
        raise InputError(f"{path}: missing key(s) {missing}")
    folder = path.parent
    config = {**OPTIONAL, **config, "text": text, "source": str(path)}
    for key in ("output", "lattice", "table") + (("images",) if config["images"] else ()):
        if not isinstance(config[key], str):
            raise InputError(f"{path}: {key} must be a path, got {config[key]!r}")
        config[key] = folder / config[key]
    config["p0c"] = _number(config["p0c"], f"{path}: p0c (eV)", positive=True)
    config["charge"] = _number(config["charge"], f"{path}: charge (C)")
    if not config["lattice"].is_file():
        raise InputError(f"{path}: lattice {config['lattice']}: no such file")
    config["lattice_items"] = load_lattice_text(config["lattice"].read_text(), str(config["lattice"]))
    try:
        config["lattice_obj"] = sim.Lattice.from_list(config["lattice_items"])
    except (ValueError, TypeError, KeyError) as err:
        raise InputError(f"{config['lattice']}: {err}") from None
    screens = _mapping(config["screens"], f"{path}: screens")
    if not screens:
        raise InputError(f"{path}: screens names no screen")
    known = config["lattice_obj"].screens
    for name in screens:
        if name not in known:
            raise InputError(f"{path}: screens.{name}: the lattice {config['lattice']} has no Screen named {name!r}; "
                             f"its screens: {sorted(known)}")
    config["screens"] = {str(name): _screen(name, entry, folder, str(path)) for name, entry in screens.items()}
    config["preprocess"] = _preprocess(config["preprocess"], str(path))
    config["calibration"] = _mapping(config["calibration"] or {}, f"{path}: calibration")
    return config


@dataclass
class Row:
    """One table row: its line in the file, image path, screen, shot (None if no column) and setting index."""

    line: int
    where: str
    path: Path
    screen: str
    shot: float | None
    setting: int = -1


@dataclass
class Table:
    """The table's rows and the distinct settings (K, P) with their names."""

    rows: list[Row]
    settings: np.ndarray
    names: list[str]


def _setting_columns(header, config) -> dict[str, tuple[str, float, float]]:
    """Setting name -> (column, scale, offset): setting columns ("Q1.k1") as they are, calibrated ones scaled."""
    table, lattice = config["table"], config["lattice_obj"]
    columns = {c: (c, 1.0, 0.0) for c in header if c not in RESERVED_COLUMNS and "." in c}
    for name, entry in config["calibration"].items():
        where = f"{config['source']}: calibration.{name}"
        entry = _mapping(entry, where)
        _unknown(entry, {"column", "scale", "offset"}, where)
        if "column" not in entry:
            raise InputError(f"{where}: missing key 'column' (the table column it is computed from)")
        if entry["column"] not in header:
            raise InputError(f"{where}: column {entry['column']!r} is not in the table {table}; its columns: {header}")
        if name in columns:
            raise InputError(f"{where}: {name} is both a column of {table} and calibrated; keep one")
        columns[name] = (entry["column"], _number(entry.get("scale", 1.0), f"{where}.scale"),
                         _number(entry.get("offset", 0.0), f"{where}.offset"))
    if not columns:
        raise InputError(f"{table}: no settings: the table has no setting column like 'Q1.k1' and the config no calibration")
    for name in columns:
        try:
            lattice.split_settings({name: 0.0})
        except (KeyError, ValueError) as err:
            message = err.args[0] if err.args else err
            raise InputError(f"{table}: {message} (lattice {config['lattice']})") from None
    return columns


def read_table(config) -> Table:
    """Rows of the settings table (CSV with a header): a column `file`, optional `screen` and `shot`, setting
    columns or raw readings used by the calibration. Rows with equal settings are shots of one setting."""
    table = config["table"]
    if not table.is_file():
        raise InputError(f"{config['source']}: table {table}: no such file")
    with open(table, newline="") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in reader.fieldnames or []]
        records = [{k.strip(): (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
    if "file" not in header:
        raise InputError(f"{table}: the table needs a column 'file' (one image file per row); its columns: {header}")
    if not records:
        raise InputError(f"{table}: the table has no rows")
    columns = _setting_columns(header, config)
    names = list(columns)
    folder = config["images"] or table.parent
    screens = list(config["screens"])
    if "screen" not in header and len(screens) > 1:
        raise InputError(f"{table}: no column 'screen', but the config names several screens {screens}")
    rows, values, keys = [], [], {}
    for n, record in enumerate(records):
        where = f"{table} line {n + 2}"
        if not record.get("file"):
            raise InputError(f"{where}: the file column is empty")
        path = folder / record["file"]
        where += f" ({record['file']})"
        if not path.is_file():
            raise InputError(f"{where}: image file {path} does not exist")
        screen = record.get("screen") or screens[0]
        if screen not in config["screens"]:
            raise InputError(f"{where}: screen {screen!r} is not in the config's screens {screens}")
        shot = None
        if record.get("shot"):
            shot = _cell(record["shot"], "shot", where)
        setting = []
        for name in names:
            column, scale, offset = columns[name]
            setting.append(scale * _cell(record.get(column, ""), column, where) + offset)
        key = tuple(setting)
        if key not in keys:
            keys[key] = len(keys)
            values.append(setting)
        rows.append(Row(line=n + 2, where=where, path=path, screen=screen, shot=shot, setting=keys[key]))
    seen = set()
    for row in rows:
        if row.shot is not None and (row.setting, row.screen, row.shot) in seen:
            raise InputError(f"{row.where}: shot {row.shot:g} of screen {row.screen} repeats at the same setting")
        seen.add((row.setting, row.screen, row.shot))
    return Table(rows=rows, settings=np.asarray(values, dtype=np.float64), names=names)


def _cell(text: str, column: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{where}: column {column} must be a number, got {text!r}") from None
    if not np.isfinite(value):
        raise InputError(f"{where}: column {column} must be finite, got {text!r}")
    return value
