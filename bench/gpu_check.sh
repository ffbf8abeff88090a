#!/usr/bin/env bash
# The GPU check: what a session with a lent GPU runs, whole, in under 8 minutes (docs/gpu.md).
#
#   bash bench/gpu_check.sh --fetch-wheels   here, once (needs pip's index): kvikio's wheels for
#                                            the device's Python 3.12 into .wheels/ (git-ignored)
#   bash bench/gpu_check.sh                  on the device:
#       run(command="bash bench/gpu_check.sh", carry=[".wheels"], timeout_s=540)
#   bash bench/gpu_check.sh --dry-run        on a CPU machine: the same steps up to the GPU
#
# Steps: build the wheel (not editable) from a copy of the package sources; install it and the
# carried kvikio wheels into a private target on the device's Python; from a scratch copy of
# tests/ and bench/ (so that everything imports the installed package, never the checkout) check
# where the kernel sources are found, run `pytest -m gpu`, run `python -m bench.gpu_path` (which
# measures 2 MiB and 32 MiB chunk reads, warm and cold) and say whether cuFile sees GDS. Every
# table and log lands in $OUT (the device tool's output folder), or bench/results/gpu_check/.
set -euo pipefail

mode=run
case "${1:-}" in
  "") ;;
  --dry-run) mode=dry ;;
  --fetch-wheels) mode=fetch ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry-run | --fetch-wheels]" >&2; exit 2 ;;
esac

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Absolute (the steps below change directory), symlinks kept (a venv's python is one).
python=$(realpath -s "$(command -v "${PYTHON:-python3}")")
wheels=$repo/.wheels
# kvikio for CUDA 13 (the device's torch is cu130) and what it needs beyond the device's packages.
kvikio_wheels=("kvikio-cu13==26.10.*" "libkvikio-cu13==26.10.*" "rapids-logger==0.3.*")

if [[ $mode == fetch ]]; then
  mkdir -p "$wheels"
  for wheel in "${kvikio_wheels[@]}"; do
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$wheels" "$wheel"
  done
  ls -l "$wheels"
  exit 0
fi

out=${OUT:-$repo/bench/results/gpu_check}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log() { printf '[gpu_check %s] %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$out/gpu_check.log"; }
started=$SECONDS

log "mode $mode, python $("$python" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)')"

# 1. The wheel, built from a copy (no build/ or egg-info left in the checkout).
mkdir -p "$work/src"
cp -r "$repo/pyproject.toml" "$repo/README.md" "$repo/lmcache_fs" "$repo/connector" "$repo/cuda" "$work/src/"
# With setuptools at hand (the device has it, and no network) the build uses it; else pip fetches it.
isolation=(--no-build-isolation --no-index)
"$python" -c "import setuptools" 2> /dev/null || isolation=()
"$python" -m pip wheel -q --no-deps "${isolation[@]}" -w "$work/dist" "$work/src" 2>> "$out/gpu_check.log"
wheel=$(ls "$work"/dist/lmcache_fs-*.whl)
log "built $(basename "$wheel")"

# 2. Installed (not editable) into a private target: the device image's own packages stay as
#    they are, and nothing is fetched (the device has no network).
site=$work/site
"$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheel"
if [[ $mode == run ]]; then
  if ! compgen -G "$wheels/kvikio_cu13-*.whl" > /dev/null; then
    log "no kvikio wheels in .wheels/: run 'bash bench/gpu_check.sh --fetch-wheels' here, then carry .wheels"
    exit 1
  fi
  "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
fi
export PYTHONPATH=$site
export LMCACHE_FS_CUDA_BUILD_DIR=$work/cuda-kernels  # one build, shared by the tests and the bench

# 3. A runner directory: tests/, bench/, what some test modules import (frontend/, deploy/) and
#    pytest's configuration, but no package sources.
mkdir -p "$work/run"
cp -r "$repo/tests" "$repo/bench" "$repo/frontend" "$repo/deploy" "$repo/pyproject.toml" "$work/run/"
rm -rf "$work/run/tests/artifacts" "$work/run/bench/results"
cd "$work/run"

"$python" - "$site" > "$out/kernels_location.txt" <<'EOF'
import sys
from pathlib import Path
import lmcache_fs
from lmcache_fs.gpu import kernels
site = Path(sys.argv[1]).resolve()
package, sources = Path(lmcache_fs.__file__).resolve(), kernels.source_dir().resolve()
print(f"lmcache_fs imported from {package.parent}")
print(f"kernel sources found in {sources}")
missing = [n for n in (*kernels.SOURCES, *kernels.HEADERS) if not (sources / n).is_file()]
if not (package.is_relative_to(site) and sources.is_relative_to(site)) or missing:
    sys.exit(f"FAIL: expected the installed package under {site}; missing sources: {missing}")
print("OK: the installed wheel's kernel sources")
EOF
log "$(tail -1 "$out/kernels_location.txt")"

# The modules that hold GPU tests (collecting all of tests/ would import vLLM's test modules too).
mapfile -t gpu_tests < <(grep -l 'mark\.gpu' tests/test_*.py)

if [[ $mode == dry ]]; then
  # Collection imports every GPU test module against the installed package.
  "$python" -m pytest -q -p no:cacheprovider -m gpu --collect-only "${gpu_tests[@]}" \
    > "$out/pytest_gpu.txt" 2>&1
  log "dry run: $(tail -1 "$out/pytest_gpu.txt"); no GPU steps run"
  exit 0
fi

# 4. Does cuFile see GDS? (kvikio's view, and NVIDIA's gdscheck where the image has it.)
{
  echo "# cuFile / GDS on this machine"
  echo
  "$python" - <<'EOF' || echo "- kvikio probe failed (see gpu_check.log)"
import kvikio
import kvikio.defaults
from kvikio import cufile_driver
try:
    gds = cufile_driver.get("is_gds_available")
except Exception as exc:  # an older kvikio, or no cuFile library
    gds = f"unknown ({exc})"
print(f"- kvikio {kvikio.__version__}: cuFile reports GDS available: {gds}")
print(f"- compat mode preferred (POSIX reads instead of cuFile): {kvikio.defaults.is_compat_mode_preferred()}")
EOF
  for tool in /usr/local/cuda/gds/tools/gdscheck /usr/local/cuda/gds/tools/gdscheck.py; do
    if [[ -x $tool ]]; then
      echo
      echo '```'
      timeout 30 "$tool" -p 2>&1 | head -60 || true
      echo '```'
      break
    fi
  done
  [[ -e /proc/driver/nvidia-fs/stats ]] && echo "- nvidia-fs kernel module loaded" || echo "- no /proc/driver/nvidia-fs: the nvidia-fs (GDS) kernel module is not loaded"
} > "$out/gds.md" 2>> "$out/gpu_check.log"
log "gds: $(grep -m1 'GDS available' "$out/gds.md" || echo unknown)"

# 5. The GPU tests, once (bench.gpu_path runs its own list of files three more times).
set +e
timeout 150 "$python" -m pytest -q -rfE -p no:cacheprovider -m gpu "${gpu_tests[@]}" \
  > "$out/pytest_gpu.txt" 2>&1
tests_rc=$?
set -e
log "pytest -m gpu: $(tail -1 "$out/pytest_gpu.txt") (exit $tests_rc)"

# 6. The benchmark: full sizes within the time left, else the quick sizes so that tables exist.
left=$((450 - (SECONDS - started)))
set +e
# A build directory of its own, so that its "Kernels: built in N s" times a real build.
export LMCACHE_FS_CUDA_BUILD_DIR=$work/cuda-kernels-bench
timeout "$((left > 60 ? left - 60 : 30))" "$python" -m bench.gpu_path --out "$out/gpu_path.md" \
  > "$out/gpu_path.log" 2>&1
bench_rc=$?
if [[ $bench_rc -eq 124 ]]; then
  log "bench.gpu_path ran out of time at full size; running --quick"
  timeout 55 "$python" -m bench.gpu_path --quick --out "$out/gpu_path.md" >> "$out/gpu_path.log" 2>&1
  bench_rc=$?
fi
set -e
log "bench.gpu_path exit $bench_rc; tables in $out/gpu_path.md; $((SECONDS - started)) s in all"
exit $((tests_rc != 0 || bench_rc != 0))
