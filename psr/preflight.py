"""Checks made before a command builds or writes anything: config files, run length, scan file, output
folder and the memory the particles need. Each failure is one `InputError` line naming what and where."""

import os
import re
from pathlib import Path

import yaml

from psr.data.checks import FIT_BYTES_PER_PARTICLE_SETTING, InputError, check_memory, check_output_folder
from psr.data.scanfile import read_scan

def one_line(message: str, limit: int = 400) -> str:
    """A parser's multi-line message condensed to one line (repeats and type listings dropped)."""
    noise = ("Subtypes:", "Errors:", "Given value type:", "Does not validate against any of the Union subtypes")
    parts: list[str] = []
    message = re.sub(r'Parser key "([^"]+)":', r"\1:", str(message))
    message = message.replace("Problem with given class_path", "class_path")
    for line in message.splitlines():
        line = line.strip().lstrip("-").strip()
        if not line or line.startswith(noise) or line in parts:
            continue
        parts.append(line)
    text = ""
    for part in parts:
        text += part if not text else (" " if text.endswith(":") else "; ") + part
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_config_files(argv: list[str]) -> None:
    """Every `--config FILE` exists and is valid YAML (else one line with the file, line and column)."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            continue
        file = Path(path)
        if not file.exists():
            raise InputError(f"--config {path}: no such file")
        if not file.is_file():
            raise InputError(f"--config {path}: is a folder, not a config file")
        try:
            content = yaml.safe_load(file.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise InputError(f"--config {path}: YAML syntax error{where}: {getattr(err, 'problem', None) or err}") from None
        if content is not None and not isinstance(content, dict):
            raise InputError(f"--config {path}: a config must be a mapping of keys, got {type(content).__name__}")


def _get(namespace, dotted: str, default=None):
    value = namespace
    for key in dotted.split("."):
        if value is None:
            return default
        value = value.get(key) if hasattr(value, "get") else getattr(value, key, None)
    return default if value is None else value


def _log_dirs(trainer) -> list[str]:
    """The folders a fit would write into: the logger's save_dir or the trainer's default_root_dir."""
    logger = _get(trainer, "logger")
    loggers = logger if isinstance(logger, list) else [logger]
    folders = [_get(item, "init_args.save_dir") for item in loggers if item not in (None, False, True)]
    folders = [f for f in folders if f]
    return folders or [_get(trainer, "default_root_dir") or os.getcwd()]


def check_fit_config(config):
    """A `psr fit` config (the parsed namespace of the fit subcommand), checked before anything is built:
    a fit of at least one step, a writable output folder, a readable, valid scan file and
    memory for the particles. Returns the scan (`psr.data.scanfile.ScanData`) or None without a path."""
    trainer = _get(config, "trainer")
    max_steps, max_epochs = _get(trainer, "max_steps", -1), _get(trainer, "max_epochs")
    if max_steps == 0 or (max_steps < 0 and max_epochs is not None and max_epochs == 0):
        raise InputError("trainer.max_epochs/max_steps is 0: a fit of no steps would report an untrained beam")
    if max_steps < -1:
        raise InputError(f"trainer.max_steps must be positive (or -1: no limit), got {max_steps}")
    if max_epochs is not None and max_epochs < -1:
        raise InputError(f"trainer.max_epochs must be positive (or -1: no limit), got {max_epochs}")
    for folder in _log_dirs(trainer):
        check_output_folder(folder, "trainer.logger save_dir")
    path = _get(config, "data.init_args.path") or _get(config, "data.path")
    if path is None:
        return None
    scan = read_scan(path)  # its images are prepared (and checked) by the data module before the run folder exists
    val_every = _get(config, "data.init_args.val_every") or _get(config, "data.val_every") or 0
    n_settings = scan.settings.shape[0]
    n_train = n_settings - (len(range(1, n_settings, val_every)) if val_every and val_every > 1 else 0)
    generator = _get(config, "model.generator.init_args")
    n_particles = _get(generator, "n_particles", 10_000)
    if isinstance(n_particles, (int, float)) and n_particles > 0:
        device = "cuda" if _get(trainer, "accelerator") in ("gpu", "cuda") else "cpu"
        need = FIT_BYTES_PER_PARTICLE_SETTING * float(n_particles) * max(n_train, 1)
        check_memory(need, f"model.generator.init_args.n_particles={n_particles:g} with {max(n_train, 1)} "
                           f"training setting(s)", device)
    return scan
