#!/usr/bin/env bash
# A plain `pip install .` (no extras) into a fresh virtual environment runs every shipped config:
# a 2-step fit of each configs/*.yaml, `psr import` of each data/*.import.yaml, and for each
# configs/*.surrogate.yaml a small `psr simulate-pairs` of each of its data/<name>[.<set>].pairs.yaml and 2
# training steps on them,
# run from the installed package (not this source tree).
# Usage: bash scripts/check_plain_install.sh   (exit code 0 when every config ran)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PYTHON=${PYTHON:-python3}
"$PYTHON" -m venv "$WORK/venv"
. "$WORK/venv/bin/activate"
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true  # the CPU build first
python -m pip install -q . 2>&1 | grep -v "^WARNING: Location" || true
(cd "$WORK" && python -c "import psr, sim, models; print(psr.__file__)") | grep -q "$WORK/venv" \
  || { echo "psr is not imported from the fresh install"; exit 1; }
for extra in cheetah pmd_beamphysics pytest; do
  if (cd "$WORK" && python -c "import $extra" 2>/dev/null); then echo "plain install unexpectedly has $extra"; exit 1; fi
done
status=0
needs_missing_shared() {  # configs that read ../shared/data run where shared/ lies beside the checkout (as in CI)
  grep -v "^[[:space:]]*#" "$1" | grep -q "shared/data" && [ ! -d ../shared/data ]
}
for config in configs/*.yaml; do
  case "$config" in *.surrogate.yaml) continue ;; esac
  if needs_missing_shared "$config"; then echo "skipped $config (no ../shared/data beside this checkout)"; continue; fi
  if "$WORK/venv/bin/psr" fit --config "$config" --trainer.max_steps=2 --data.steps_per_epoch=2 \
       --trainer.enable_progress_bar=false --trainer.logger.init_args.save_dir="$WORK/runs" \
       >"$WORK/log.txt" 2>&1; then
    echo "ok      $config"
  else
    echo "FAILED  $config"; tail -5 "$WORK/log.txt"; status=1
  fi
done
for config in data/*.import.yaml; do  # psr import's image libraries come with the plain install
  if needs_missing_shared "$config"; then echo "skipped $config (no ../shared/data beside this checkout)"; continue; fi
  if "$WORK/venv/bin/psr" import --config "$config" --output "$WORK/imported.h5" >"$WORK/log.txt" 2>&1; then
    echo "ok      $config"
  else
    echo "FAILED  $config"; tail -5 "$WORK/log.txt"; status=1
  fi
done
for config in configs/*.surrogate.yaml; do  # pairs files are large and not shipped: small ones are made
  name=$(basename "$config" .surrogate.yaml)
  made=() && : >"$WORK/log.txt"
  for pairs in data/"$name".pairs.yaml data/"$name".*.pairs.yaml; do  # its data/<name>[.<set>].pairs.yaml
    [ -f "$pairs" ] || continue
    out="$WORK/$(basename "$pairs" .yaml).h5"
    "$WORK/venv/bin/psr" simulate-pairs --config "$pairs" --n_beams 5 --n_particles 400 --output "$out" \
      >>"$WORK/log.txt" 2>&1 && made+=("$out") || made+=("FAILED")
  done
  list=$(IFS=,; echo "[${made[*]}]")
  if [[ "$list" != *FAILED* ]] && "$WORK/venv/bin/psr" surrogate --config "$config" --data.path "$list" \
       --model.weights "$WORK/w.pt" --trainer.max_steps=2 --data.steps_per_epoch=2 --trainer.enable_progress_bar=false \
       --trainer.logger.init_args.save_dir="$WORK/runs" >>"$WORK/log.txt" 2>&1; then
    echo "ok      $config (${#made[@]} pairs configs)"
  else
    echo "FAILED  $config"; tail -5 "$WORK/log.txt"; status=1
  fi
done
exit $status
