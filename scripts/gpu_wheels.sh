#!/usr/bin/env bash
# Downloads into gpu-wheels/ the Python packages `make gpu-check` needs that the GPU machine lacks; that machine
# reaches no registry, so the folder travels with the working tree and scripts/gpu_check.py installs it there
# (pip --no-index --no-deps --target, only where `import mlflow` fails).
#
# The machine has torch, transformers, peft, accelerate, pandas, pyarrow, scikit-learn, matplotlib, click, numpy,
# requests, pyyaml, protobuf, psutil, ninja, py-cpuinfo, einops, msgpack, nvidia-ml-py, anyio, h11, ... (the
# device notes' package list), and no mlflow, deepspeed or datasets. Carried, at the versions this venv tests:
#   - mlflow-skinny (the mlflow package without the server and UI; the full `mlflow` wheel holds the same
#     module again plus 12 MB of UI) and what importing it, its sqlite store and pyfunc logging need:
#     sqlalchemy + alembic + mako (the SQL store and its migrations), cryptography + cffi + pycparser (the
#     store's registry tables import Fernet), sqlparse, cachetools, opentelemetry
#     (tracing is imported with mlflow), pydantic (+ core), fastapi/starlette/uvicorn, python-dotenv,
#     importlib-metadata, protobuf and typing-extensions at the versions mlflow's generated code was tested with.
#     databricks-sdk too: `import mlflow` asks importlib for databricks.agents, which raises without a
#     `databricks` package (its google-auth, for databricks:// URIs only, is left out, as is gitpython:
#     mlflow logs no git commit without it).
#   - datasets (textclf.components.encoding) with dill and multiprocess.
#   - deepspeed: PyPI has only its sdist, so it is built here into a pure-Python wheel (DS_BUILD_OPS=0: its
#     ops compile just in time where they are used), with hjson; its other needs are on the machine.
# Binary wheels (pydantic-core, cffi, ...; multiprocess is per Python version) come for each of GPU_PYTHON_VERSIONS;
# gpu_check.py installs by name, so pip takes the one of the Python it runs.
#
# Usage: scripts/gpu_wheels.sh [DEST]      (default gpu-wheels/; run from anywhere, needs PyPI)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-gpu-wheels}
PY=${PY:-.venv/bin/python}
# The device notes saw Python 3.12.3 there; 3.11 too, as this venv's Python.
GPU_PYTHON_VERSIONS=${GPU_PYTHON_VERSIONS:-"3.12 3.11"}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

PURE=(
  mlflow-skinny==3.17.2 SQLAlchemy==2.1.9 alembic==1.20.1 Mako==1.4.3 sqlparse==0.6.1 cachetools==7.3.3
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-semantic-conventions==0.66b2 importlib-metadata==9.1.0 pydantic==2.14.4 annotated-types==0.8.0
  typing-inspection==0.4.5 typing-extensions==4.16.0 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0
  python-dotenv==1.2.4 databricks-sdk==0.162.0 pycparser==3.12 datasets==5.2.0 dill==0.4.1 hjson==3.1.0
)
PER_PYTHON=(pydantic-core==2.50.5 multiprocess==0.70.19 protobuf==7.36.2 cryptography==50.0.2 cffi==2.1.1)

mkdir -p "$DEST"
download() {  # download PYTHON_VERSION SPEC...
  local version=$1; shift
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --implementation cp \
    --python-version "$version" "${PLATFORMS[@]}" -d "$DEST" "$@"
}
first=${GPU_PYTHON_VERSIONS%% *}
download "$first" "${PURE[@]}"
for version in $GPU_PYTHON_VERSIONS; do
  download "$version" "${PER_PYTHON[@]}"
done
# Prefer SQLAlchemy's pure-Python wheel (one file for every Python; its C speed-ups do not matter here).
if "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --platform any \
     --python-version "$first" -d "$DEST/.any" SQLAlchemy==2.1.9 2>/dev/null; then
  rm -f "$DEST"/sqlalchemy-2.1.9-cp*.whl "$DEST"/SQLAlchemy-2.1.9-cp*.whl
  mv "$DEST"/.any/*.whl "$DEST"/
fi
rm -rf "$DEST/.any"
# deepspeed: sdist only. --no-build-isolation: its setup.py imports torch (this venv's); no op is compiled.
if ! ls "$DEST"/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation \
    -w "$DEST" deepspeed==0.19.8
fi

echo "gpu-wheels: $(ls "$DEST"/*.whl | wc -l) wheels, $(du -ch "$DEST"/*.whl | tail -1 | cut -f1) in $DEST/"
ls -1 "$DEST"
