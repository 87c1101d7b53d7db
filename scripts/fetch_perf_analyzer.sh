#!/usr/bin/env bash
# Fetch Triton's perf_analyzer (the binary inside the tritonclient 2.51.0 wheel, the newest that
# runs on Debian 12's glibc) into DIR (default .tools/perf_analyzer) and write DIR/perf_analyzer,
# a wrapper that sets the library path it needs.  Prints the wrapper's path on success.
#   scripts/fetch_perf_analyzer.sh [DIR]
# Needs: apt-get (libb64-0d) and pip with access to PyPI.  Exits non-zero, saying why, otherwise.
set -euo pipefail
dir="${1:-.tools/perf_analyzer}"
py="${PYTHON:-python3}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
if [ -x "$dir/perf_analyzer" ] && "$dir/perf_analyzer" --version >/dev/null 2>&1; then
  echo "$dir/perf_analyzer"; exit 0
fi
if ! ldconfig -p 2>/dev/null | grep -q 'libb64.so.0d'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -q libb64-0d >"$dir/apt.log" 2>&1 ||
      { apt-get update -q >>"$dir/apt.log" 2>&1 && apt-get install -y -q libb64-0d >>"$dir/apt.log" 2>&1; } ||
      { echo "fetch_perf_analyzer: apt-get install libb64-0d failed (see $dir/apt.log)" >&2; exit 1; }
  else
    echo "fetch_perf_analyzer: libb64-0d is missing; install it (apt-get install libb64-0d)" >&2
    exit 1
  fi
fi
"$py" -m pip download -q --no-deps tritonclient==2.51.0 --platform manylinux1_x86_64 \
  --only-binary=:all: -d "$dir/whl" >"$dir/pip.log" 2>&1 ||
  { echo "fetch_perf_analyzer: downloading tritonclient 2.51.0 failed (see $dir/pip.log)" >&2; exit 1; }
(cd "$dir" && unzip -o -q whl/tritonclient-2.51.0-*.whl \
  'tritonclient-2.51.0.data/data/bin/perf_analyzer')
"$py" -m pip install -q --target "$dir/cudart" nvidia-cuda-runtime-cu12 >>"$dir/pip.log" 2>&1 ||
  { echo "fetch_perf_analyzer: installing nvidia-cuda-runtime-cu12 failed (see $dir/pip.log)" >&2; exit 1; }
cat >"$dir/perf_analyzer" <<WRAP
#!/usr/bin/env bash
# perf_analyzer from tritonclient 2.51.0 with the CUDA runtime library it links against
# (it never uses a GPU for HTTP measurements).
export LD_LIBRARY_PATH="$dir/cudart/nvidia/cuda_runtime/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$dir/tritonclient-2.51.0.data/data/bin/perf_analyzer" "\$@"
WRAP
chmod +x "$dir/perf_analyzer" "$dir/tritonclient-2.51.0.data/data/bin/perf_analyzer"
"$dir/perf_analyzer" --version >/dev/null 2>&1 ||
  { echo "fetch_perf_analyzer: $dir/perf_analyzer does not run:" >&2; "$dir/perf_analyzer" --version >&2; exit 1; }
echo "$dir/perf_analyzer"
