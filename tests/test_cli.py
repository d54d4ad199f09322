"""The `psr` command line: help for every subcommand, config printing, clear errors."""

import subprocess
import sys

import pytest

from psr.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "psr.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [["--help"], ["fit", "--help"], ["simulate", "--help"]])
def test_help(args):
    result = run(*args)
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()


def test_print_config_resolves_generator():
    result = run("fit", "--config", "configs/quad_scan_4d.yaml", "--print_config")
    assert result.returncode == 0, result.stderr
    assert "MLPBeamGenerator" in result.stdout
    assert "data/quad_scan_4d.h5" in result.stdout


def test_unknown_option_is_rejected():
    result = run("fit", "--config", "configs/quad_scan_4d.yaml", "--model.no_such_option=1")
    assert result.returncode != 0
    assert "no_such_option" in result.stderr


def test_simulate_rejects_unequal_setting_lists(tmp_path, capsys):
    lattice = tmp_path / "lat.yaml"
    lattice.write_text("- {type: Quadrupole, name: Q1, length: 0.1}\n- {type: Screen, name: S}\n")
    with pytest.raises(ValueError, match="different lengths"):
        main(["simulate", f"--output={tmp_path / 'x.h5'}", f"--lattice={lattice}", "--p0c=1e7",
              "--settings", '{"Q1.k1": [1, 2], "Q1.tilt": [0]}',
              "--beam=psr.synthetic.SyntheticBeam"])
    assert not (tmp_path / "x.h5").exists()
