#!/usr/bin/env bash
# Idempotent set-up for lmsdp on Debian/Ubuntu: system packages, .venv, torch, mpi4py, Horovod
# (built once against torch 2.x and cached as a wheel), and the project itself in editable mode.
# A second run only checks and takes seconds. Override: PYTHON, LMSDP_VENV, LMSDP_TORCH_SPEC,
# LMSDP_WHEEL_CACHE, LMSDP_SKIP_APT=1, LMSDP_SKIP_HOROVOD=1.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${LMSDP_VENV:-$repo/.venv}
python=${PYTHON:-python3}
torch_spec=${LMSDP_TORCH_SPEC:-torch==2.13.0}
horovod_version=0.28.1
wheel_cache=${LMSDP_WHEEL_CACHE:-$HOME/.cache/lmsdp/wheels}
say() { printf '[setup] %s\n' "$*"; }

# --- system packages -------------------------------------------------------------------------
apt_packages=(openmpi-bin libopenmpi-dev cmake g++ make procps
              slurmctld slurmd slurm-client munge)
if [ "${LMSDP_SKIP_APT:-0}" != 1 ] && command -v dpkg-query >/dev/null; then
  missing=()
  for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo="sudo"; else
      echo "setup: missing system packages (${missing[*]}) and no root to install them" >&2; exit 1; fi
    say "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

# --- virtual environment ---------------------------------------------------------------------
if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv"
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"
# (pip's warnings about find-links folders a machine's pip.conf names but lacks are noise: dropped)
pip() { "$py" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v 'is ignored: it is neither' >&2); }

if ! "$py" -c 'import torch' 2>/dev/null; then
  say "installing $torch_spec"
  pip install "$torch_spec"
fi

# Plain Python dependencies: re-checked only when this list changes (stamp file).
# transformers: for the Hugging Face tests and configs/hf_gpt2.yaml only (never a dependency of lmsdp);
# it installs beside the pinned torch without replacing it.
deps=(pyyaml pytest pytest-timeout psutil rich numpy matplotlib mpi4py tensorboard
      packaging wheel "setuptools>=64" cloudpickle cffi transformers)
stamp="$venv/.lmsdp-deps"
want=$(printf '%s\n' "${deps[@]}" | sha1sum | cut -c1-12)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing Python dependencies"
  pip install "${deps[@]}"
  echo "$want" > "$stamp"
fi

# --- Horovod 0.28.1, built against torch 2.x (C++17 patch, see shared DESIGN.md) ---------------
if [ "${LMSDP_SKIP_HOROVOD:-0}" != 1 ] && ! "$py" -c 'import horovod.torch' 2>/dev/null; then
  key=$("$py" -c 'import sys, torch; print("py%d%d-torch%s" % (sys.version_info[0], sys.version_info[1], torch.__version__.replace("+", "_")))')
  gpu=$("$py" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
  dir="$wheel_cache/horovod-$horovod_version-$key-$gpu"
  if ! ls "$dir"/horovod-*.whl >/dev/null 2>&1; then
    say "building Horovod $horovod_version against $key ($gpu); about 15 minutes on 2 cores, once"
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    pip download --no-deps --no-binary :all: "horovod==$horovod_version" -d "$build"
    tar xzf "$build/horovod-$horovod_version.tar.gz" -C "$build"
    src="$build/horovod-$horovod_version"
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
      "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
           HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS=-j"$(nproc)"
    [ "$gpu" = cuda ] && export HOROVOD_GPU_OPERATIONS=NCCL
    mkdir -p "$dir"
    pip wheel --no-deps --no-build-isolation --no-cache-dir "$src" -w "$build/out"
    mv "$build"/out/horovod-*.whl "$dir/"
  fi
  say "installing Horovod from $dir"
  pip install --no-deps "$dir"/horovod-*.whl
fi

# --- the project ---------------------------------------------------------------------------
if ! "$py" -c 'import lmsdp.launcher, lmsdp.swapping, lmsdp.comm' 2>/dev/null \
   || [ "$repo/setup.cfg" -nt "$venv/.lmsdp-installed" ]; then
  say "installing lmsdp (editable)"
  pip install --no-deps --no-build-isolation -e "$repo"
  touch "$venv/.lmsdp-installed"
fi
say "ready: $venv"
