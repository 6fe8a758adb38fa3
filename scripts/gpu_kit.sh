#!/usr/bin/env bash
# An offline GPU check in two steps (docs/gpu-check.md):
#
#   scripts/gpu_kit.sh prepare DIR    here, with pip access: DIR becomes a kit of at most 60 MiB (the trimmed
#                                     llama-cpp-python sdist, wheels, the project, a tokenizer, manifest.json)
#   bash DIR/gpu_kit.sh check DIR [--out FILE] [--cpu] [--build]
#                                     on the GPU machine, no network: a virtual environment over its Python
#                                     (torch, transformers, peft, accelerate, numpy; cmake, ninja, nvcc), the
#                                     kit's wheels installed into it, then scripts/gpu_check.py: llama.cpp built
#                                     with CUDA for the GPU found, the checks, FILE as JSON and a summary.
#
# --cpu: no GPU needed; what runs on the CPU runs (the installed llama-cpp-python unless --build), GPU-only checks
# are skipped. Environment: PYTHON (the interpreter with torch; default python3, or the project's .venv when
# run from a checkout), GPU_KIT_WORK (default DIR/work), and for prepare PY_VERSION, BNB_CUDA (gpu_kit_prepare.py).
set -euo pipefail

usage() { echo "usage: gpu_kit.sh prepare DIR [--no-download] | gpu_kit.sh check DIR [--out FILE] [--cpu] [--build] [--only NAME...]" >&2; exit 2; }
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[ $# -ge 2 ] || usage
cmd=$1 kit=$2
shift 2

# The interpreter: PYTHON, else a checkout's .venv (when this is scripts/gpu_kit.sh), else python3.
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$here/../.venv/bin/python" ]; then PYTHON=$here/../.venv/bin/python; else PYTHON=python3; fi
fi

case $cmd in
prepare)
  exec "$PYTHON" "$here/gpu_kit_prepare.py" "$kit" "$@"
  ;;
check)
  cpu=0
  for a in "$@"; do [ "$a" = --cpu ] && cpu=1; done
  if [ $cpu = 0 ] && ! nvidia-smi -L >/dev/null 2>&1; then
    echo "error: no NVIDIA GPU found (nvidia-smi -L fails): run this on the GPU machine, or add --cpu to check the CPU part" >&2
    exit 2
  fi
  [ -f "$kit/manifest.json" ] || { echo "error: $kit: not a kit (no manifest.json); make one with gpu_kit.sh prepare DIR" >&2; exit 2; }
  kit=$(cd "$kit" && pwd)
  work=${GPU_KIT_WORK:-$kit/work}
  mkdir -p "$work"
  work=$(cd "$work" && pwd)
  venv=$work/venv
  # A venv that sees the interpreter's own packages behind its own (site.addsitedir in a .pth: works for a system
  # Python, a conda env or another venv alike), so the kit's wheels come first and torch & co. from the machine.
  # --without-pip: the machine's pip serves it through the .pth (a Debian Python may lack ensurepip).
  if [ ! -x "$venv/bin/python" ]; then
    "$PYTHON" -m venv --without-pip "$venv"
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$PYTHON" -c 'import site, sys
dirs = site.getsitepackages() + [site.getusersitepackages()]
print("".join(f"import site; site.addsitedir({d!r})\n" for d in dirs))' > "$site/_gpu_kit_base.pth"
  fi
  shopt -s nullglob
  wheels=("$kit"/wheels/*.whl)
  if [ ${#wheels[@]} -gt 0 ]; then
    echo "installing the kit's ${#wheels[@]} wheels into $venv (offline)"
    "$venv/bin/python" -m pip install -q --no-index --no-deps --disable-pip-version-check --find-links "$kit/wheels" "${wheels[@]}"
  fi
  rm -rf "$work/project"
  tar xzf "$kit/project.tar.gz" -C "$work"
  exec "$venv/bin/python" "$work/project/scripts/gpu_check.py" --kit "$kit" --work "$work" --project "$work/project" "$@"
  ;;
*) usage ;;
esac
