#!/usr/bin/env bash
# Download into .whl/ the wheels the lent GPU machine lacks, for its Python 3.12 on Linux x86-64.
#
# Run it HERE (a CPU machine with PyPI), before a device call of scripts/gpu_check.sh; that call names
# ".whl" in `carry`, and gpu_check.sh installs them with `pip install --target /tmp/site` (the device
# has no package registry). .whl/ is ignored by git: never commit the wheels.
#
# The list (name==version) lives in scripts/gpu_check.py (WHEELS): librosa and soundfile and those of
# their requirements that are not in the device's package list (the device library's KINDS.md), pinned
# to the versions the CPU machines run. After downloading, every wheel's Requires-Dist (markers
# evaluated for Python 3.12 on Linux, extras off) is checked against the wheels plus the device's
# packages, and the size of the working tree plus the wheels against the 64 MiB the device tool carries.
#
#   bash scripts/gpu_wheels.sh            # PYTHON=... to use another interpreter for pip
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
DEST=.whl
mkdir -p "$DEST"

mapfile -t SPECS < <("$PY" scripts/gpu_check.py --wheel-specs)
[ "${#SPECS[@]}" -gt 0 ] || { echo "gpu_wheels.sh: no wheel list from scripts/gpu_check.py" >&2; exit 1; }

# one version of each: drop wheels that are not in the list (an older pin, say)
for f in "$DEST"/*.whl; do
  [ -e "$f" ] || continue
  base=$(basename "$f")
  keep=0
  for spec in "${SPECS[@]}"; do
    name=${spec%%==*}; ver=${spec#*==}
    # wheel file names use the normalised name with '_' (PEP 427)
    case "$base" in "${name//-/_}-${ver}-"*) keep=1 ;; esac
  done
  [ "$keep" = 1 ] || { echo "removing $base (not in the list)"; rm -f "$f"; }
done

# pip matches manylinux_2_N exactly: name the usual N (the device's glibc is newer than all of them)
PLATFORMS=()
for p in manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done

"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${SPECS[@]}"

"$PY" scripts/gpu_check.py --check-wheels "$DEST"

# what the device tool will carry: tracked + untracked-not-ignored files, plus the carried .whl/
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null \
       | awk '{s += $1} END {print s + 0}')
wheels=$(cat "$DEST"/*.whl | wc -c)
echo
printf '%-60s %10s\n' wheel bytes
for f in "$DEST"/*.whl; do printf '%-60s %10d\n' "$(basename "$f")" "$(stat -c %s "$f")"; done
printf '%-60s %10d  (%.2f MiB)\n' "total of ${#SPECS[@]} wheels" "$wheels" "$(echo "$wheels / 1048576" | bc -l)"
printf '%-60s %10d  (%.2f MiB)\n' "working tree (tracked + untracked, not ignored)" "$tree" \
       "$(echo "$tree / 1048576" | bc -l)"
all=$((tree + wheels))
limit=$((64 * 1024 * 1024))
if [ "$all" -ge "$limit" ]; then
  echo "gpu_wheels.sh: tree + wheels = $all bytes, over the device tool's 64 MiB" >&2
  exit 1
fi
printf 'tree + wheels = %.2f MiB of 64 MiB: carry [".whl"] in the device call (see scripts/gpu_check.sh)\n' \
       "$(echo "$all / 1048576" | bc -l)"
