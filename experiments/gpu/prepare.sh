#!/usr/bin/env bash
# Put the wheels the GPU machine lacks (../shared/design/MODELS.md: hydra-core, omegaconf, antlr4,
# deepspeed, wandb, gguf; plus rapidfuzz and the packages these need that are not on that box)
# into ONE folder, experiments/gpu/wheels/ (git-ignored), which travels with the working tree
# (the whole tree is capped at 64 MiB). run_all.sh installs from it offline.
#
#   bash experiments/gpu/prepare.sh                 # wheels for the GPU box's Python 3.12
#   PY_VER=3.11 WHEELS=/tmp/w bash experiments/gpu/prepare.sh   # e.g. to try the install here
#
# Versions are the ones this project is tested with. Binary wheels are for CPython $PY_VER on
# manylinux x86_64; antlr4 and deepspeed have no wheel on PyPI and are built here (pure Python).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
PY_VER=${PY_VER:-3.12}
WHEELS=${WHEELS:-$PWD/wheels}
ABI=cp${PY_VER/./}
mkdir -p "$WHEELS"

# installed on the GPU box already (MODELS.md): torch, transformers, lightning, peft, accelerate,
# safetensors, tokenizers, scipy, sacrebleu, pytest and their dependencies.
PACKAGES=(
  hydra-core==1.3.8 omegaconf==2.3.1 rapidfuzz==3.14.6 gguf==0.19.0
  # deepspeed's dependencies
  einops==0.8.2 hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 py-cpuinfo==9.0.0
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
  # wandb and its dependencies (only logger=wandb needs it; the check itself logs to CSV)
  wandb==0.31.0 cwevals==0.0.1b1 click platformdirs==4.14.9 protobuf==7.36.2 xxhash==4.1.0
  requests==2.34.2 urllib3==2.7.0 certifi==2026.5.20 charset-normalizer==3.4.7 idna
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2
  opentelemetry-semantic-conventions==0.66b2 opentelemetry-exporter-http-transport==0.66b2
  opentelemetry-exporter-otlp-common==0.66b2 googleapis-common-protos==1.76.0
  httpx==0.29.0 httpcore==1.0.9 sniffio==1.3.1 distro==1.9.0
)

quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }  # this box's pip.conf noise

"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" \
  --python-version "$PY_VER" --implementation cp --abi "$ABI" --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any "${PACKAGES[@]}" 2>&1 | quiet

# No wheels on PyPI: build pure-Python wheels here. deepspeed builds against the installed torch
# (no isolated, unpinned torch download) and with no CUDA ops pre-compiled, so it runs with any torch.
"$PY" -m pip wheel --quiet --no-deps --wheel-dir "$WHEELS" antlr4-python3-runtime==4.9.3 2>&1 | quiet
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$WHEELS" deepspeed==0.19.8 2>&1 | quiet

echo "wheels in $WHEELS: $(ls "$WHEELS" | wc -l) files, $(du -sh "$WHEELS" | cut -f1)"
