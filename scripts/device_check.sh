#!/usr/bin/env bash
# On the GPU machine, over a build folder made here and carried there: runs every test
# executable directly (meson's build folder holds this machine's paths), then the main job on
# the GPU. Logs go to $OUT when set. Usage: scripts/device_check.sh [BUILD_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
out=${OUT:-/tmp}
mkdir -p "$out"
export FLASHMEM_TEST_DATA=$PWD/tests/data
export FLASHMEM_BIN=$PWD/$build/src/cli/flashmem  # for the CLI suite
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

passed=0 failed=0 skipped=0
for t in "$build"/tests/test_*; do
  [ -x "$t" ] && [ -f "$t" ] || continue
  name=$(basename "$t")
  "$t" >"$out/$name.log" 2>&1
  rc=$?
  case $rc in
    0) passed=$((passed + 1)); echo "PASS $name: $(grep -E 'test cases:' "$out/$name.log" | tail -1)" ;;
    77) skipped=$((skipped + 1)); echo "SKIP $name: $(tail -1 "$out/$name.log")" ;;
    *) failed=$((failed + 1)); echo "FAIL $name (exit $rc)"; grep -E 'ERROR|error' "$out/$name.log" | head -20 ;;
  esac
done
echo "device tests: ${passed} passed, ${failed} failed, ${skipped} skipped"

echo "== flashmem score --device cuda"
"$build"/src/cli/flashmem score --device cuda 2>&1 | tee "$out/score_cuda.log"
echo "== flashmem run (default, cuda)"
"$build"/src/cli/flashmem run --device cuda --out /tmp/run_cuda 2>&1 | tee "$out/run_cuda.log"
cp /tmp/run_cuda/summary.json "$out/run_cuda_summary.json" 2>/dev/null || true
[ "$failed" -eq 0 ]
