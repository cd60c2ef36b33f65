#!/usr/bin/env bash
# An arm64 Python 3.11 with the aarch64 TVM runtime, run under qemu-aarch64 user mode (no root
# filesystem, no binfmt, no chroot): how edgecut runs a Pi's code on an x86 machine.
#
#   scripts/aarch64-env.sh setup              build the cache (first time ~1-2 min, then instant)
#   scripts/aarch64-env.sh run SCRIPT [ARGS]  run SCRIPT with the arm64 python3.11 under qemu
#   scripts/aarch64-env.sh paths              print SYSROOT=... and SITE=...
#   scripts/aarch64-env.sh rpc-server [PORT]  an emulated Pi for `edgecut profile --target pi4 --rpc`:
#             a TVM RPC server (scripts/rpc_server.py: one process, no fork) on 127.0.0.1:PORT
#             (default 9090; 0: any free port, printed as `rpc server listening on HOST:PORT`)
#
# Cached under ${EDGECUT_CACHE:-~/.cache/edgecut}/aarch64:
#   sysroot/  Debian bookworm arm64 packages (python3.11-minimal, libpython3.11-stdlib, libstdc++6,
#             libgcc-s1 and their dependencies), unpacked with dpkg-deb -x, no maintainer scripts
#   site/     aarch64 wheels unzipped (numpy, ml_dtypes, typing_extensions, msgpack, zstandard, lz4,
#             apache-tvm, apache-tvm-ffi); TVM's compiler library is removed, as on a runtime-only device
#             (a cache made before zstandard and lz4 were listed lacks them: only the codecs' lossless
#             stage needs them; `rm -r` the cache to rebuild)
#   pycache/  the emulated python's bytecode (PYTHONPYCACHEPREFIX): importing TVM under qemu takes
#             ~10 s with it, ~30 s compiling every module each time without it
# Extra folders for PYTHONPATH (e.g. the edgecut checkout) go in EDGECUT_AARCH64_PYTHONPATH.
# Needs: qemu-user-static, apt-get, dpkg-deb, pip (the recipe of shared/platform-notes.md).
set -euo pipefail

CACHE="${EDGECUT_CACHE:-$HOME/.cache/edgecut}/aarch64"
SYSROOT="$CACHE/sysroot"
SITE="$CACHE/site"
STAMP="$CACHE/ready-v1"
TVM_VERSION="${EDGECUT_TVM_VERSION:-0.27.0.post1}"
TVM_FFI_VERSION="${EDGECUT_TVM_FFI_VERSION:-0.1.14.post0}"
SUITE="${EDGECUT_DEBIAN_SUITE:-bookworm}"
MIRROR="${EDGECUT_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
KEYRING="/usr/share/keyrings/debian-archive-keyring.gpg"

log() { echo "aarch64-env: $*" >&2; }

setup_sysroot() {
  local apt="$CACHE/apt"
  rm -rf "$apt" "$SYSROOT.tmp"
  mkdir -p "$apt"/etc/apt/{sources.list.d,preferences.d,apt.conf.d,trusted.gpg.d} \
           "$apt"/var/lib/apt/lists/partial "$apt"/var/cache/apt/archives/partial "$apt"/var/lib/dpkg
  : > "$apt/var/lib/dpkg/status"
  echo "deb [arch=arm64 signed-by=$KEYRING] $MIRROR $SUITE main" > "$apt/etc/apt/sources.list"
  local opts=(-o "Dir=$apt" -o "Dir::State::status=$apt/var/lib/dpkg/status"
              -o APT::Architecture=arm64 -o APT::Architectures::=arm64
              -o Debug::NoLocking=1 -o APT::Get::AllowUnauthenticated=false -q)
  log "resolving arm64 packages ($SUITE)"
  apt-get "${opts[@]}" update >/dev/null
  apt-get "${opts[@]}" install -y --download-only --no-install-recommends \
      python3.11-minimal libpython3.11-stdlib libstdc++6 libgcc-s1 >/dev/null
  mkdir -p "$SYSROOT.tmp"
  local n=0
  for deb in "$apt"/var/cache/apt/archives/*.deb; do
    dpkg-deb -x "$deb" "$SYSROOT.tmp"; n=$((n + 1))
  done
  [ -x "$SYSROOT.tmp/usr/bin/python3.11" ] || { log "python3.11 missing from the sysroot"; exit 1; }
  rm -rf "$SYSROOT"; mv "$SYSROOT.tmp" "$SYSROOT"; rm -rf "$apt"
  log "sysroot: $n packages unpacked"
}

setup_site() {
  local wheels="$CACHE/wheels"
  rm -rf "$wheels" "$SITE.tmp"; mkdir -p "$wheels" "$SITE.tmp"
  log "downloading aarch64 wheels (apache-tvm==$TVM_VERSION)"
  python -m pip download -q --disable-pip-version-check -d "$wheels" \
      --platform manylinux2014_aarch64 --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
      --only-binary=:all: --python-version 3.11 --implementation cp --no-deps \
      numpy ml_dtypes typing_extensions msgpack zstandard lz4 "apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$TVM_FFI_VERSION"
  for whl in "$wheels"/*.whl; do
    python -m zipfile -e "$whl" "$SITE.tmp"
  done
  # a runtime-only install, as on a Pi: no compiler library, no CUDA runtime
  rm -f "$SITE.tmp"/tvm/lib/libtvm_compiler.so "$SITE.tmp"/tvm/lib/libtvm_runtime_cuda.so
  rm -rf "$SITE"; mv "$SITE.tmp" "$SITE"; rm -rf "$wheels"
  log "site: $(ls "$SITE" | wc -l) entries"
}

setup() {
  command -v qemu-aarch64-static >/dev/null || { log "qemu-aarch64-static not found: apt-get install qemu-user-static"; exit 1; }
  [ -f "$STAMP" ] && return 0
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.lock"; flock 9          # two test runs at once: one builds, the other waits
  [ -f "$STAMP" ] && return 0
  [ -x "$SYSROOT/usr/bin/python3.11" ] || setup_sysroot
  [ -d "$SITE/tvm" ] || setup_site
  date -u +%FT%TZ > "$STAMP"
}

run() {
  setup
  local pp="$SITE"
  [ -n "${EDGECUT_AARCH64_PYTHONPATH:-}" ] && pp="$EDGECUT_AARCH64_PYTHONPATH:$SITE"
  exec env -i PATH=/usr/bin:/bin HOME="${HOME:-/tmp}" PYTHONPATH="$pp" PYTHONPYCACHEPREFIX="$CACHE/pycache" \
       TVM_NUM_THREADS="${TVM_NUM_THREADS:-2}" EDGECUT_RPC_SERVER_NOTE="${EDGECUT_RPC_SERVER_NOTE:-}" \
       qemu-aarch64-static -L "$SYSROOT" "$SYSROOT/usr/bin/python3.11" "$@"
}

case "${1:-}" in
  setup) setup ;;
  run) shift; [ $# -ge 1 ] || { echo "usage: $0 run SCRIPT [ARGS...]" >&2; exit 2; }; run "$@" ;;
  rpc-server)
    shift
    EDGECUT_RPC_SERVER_NOTE="emulated: qemu-aarch64 user mode on $(uname -m); its timings say nothing about a device" \
      run "$(dirname "$0")/rpc_server.py" --host 127.0.0.1 --port "${1:-9090}" "${@:2}" ;;
  paths) echo "SYSROOT=$SYSROOT"; echo "SITE=$SITE" ;;
  -h|--help|"") sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; [ -n "${1:-}" ] ;;
  *) echo "unknown command $1; try --help" >&2; exit 2 ;;
esac
