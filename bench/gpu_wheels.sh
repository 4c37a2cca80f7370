#!/usr/bin/env bash
# The project's Python packages as wheels for a GPU machine that has no network and its own Python 3.12 with
# torch, numpy, pandas, scikit-learn... (this workplace's CUDA image): what bench/gpu_device.sh needs on top.
# Writes .whl/ (ignored by git; about 54 MB). On the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   MAMMO_COMMIT=<commit> bash bench/gpu_device.sh OUT python3
# Versions are this clone's .venv's (pip freeze), so the GPU run uses the packages the tests passed with; the
# image's own copies are kept for what it has (the list below), torch and torchvision among them.
#
# Usage, from the repository root, after make setup: bash bench/gpu_wheels.sh [PYTHON_VERSION]
set -euo pipefail
pyver=${1:-3.12}
# In the image already (its package list): left out, the image's versions are used.
image='torch|torchvision|triton|nvidia-.*|cuda-.*|numpy|scipy|pandas|pyarrow|scikit-learn|scikit-image|matplotlib'
image+='|opencv-python-headless|numba|llvmlite|h5py|pillow|contourpy|fonttools|kiwisolver|tifffile|ImageIO|networkx'
image+='|sympy|mpmath|pytest|pytest-timeout|pytest-xdist|execnet|iniconfig|Pygments|regex|grpcio|protobuf|psutil'
image+='|PyYAML|MarkupSafe|Jinja2|lazy-loader|threadpoolctl|joblib|cycler|pyparsing|python-dateutil|six|packaging'
image+='|certifi|idna|urllib3|charset-normalizer|requests|filelock|fsspec|click|cloudpickle|msgpack|sortedcontainers'
image+='|toolz'
# Not needed there: the linter, PostgreSQL tracking, compressed-DICOM codecs (the phantom writes none), and the
# parts of MLflow that its full wheel holds already.
unused='ruff|psycopg2-binary|pylibjpeg|pylibjpeg-libjpeg|pylibjpeg-openjpeg|mlflow-skinny|mlflow-tracing'
rm -rf .whl && mkdir .whl
.venv/bin/python -m pip freeze --exclude-editable | grep -v -i -E "^($image|$unused)==" >.whl/requirements.txt
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl -r .whl/requirements.txt
# MLflow's web UI (40 MB unpacked) is not served there: repack its wheel without it to fit the 64 MiB transfer.
mlflow=$(ls .whl/mlflow-[0-9]*.whl)
tmp=$(mktemp -d)
(cd "$tmp" && python3 -m zipfile -e "$OLDPWD/$mlflow" . && rm -rf mlflow/server/js/build/static && rm "$OLDPWD/$mlflow" \
    && python3 -m zipfile -c "$OLDPWD/$mlflow" ./*)
rm -rf "$tmp"
du -sh .whl
