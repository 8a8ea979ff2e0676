#!/usr/bin/env bash
# Fetches, on a machine with network, the wheels capjax needs on an air-gapped node whose image
# already has JAX (with its CUDA plugin), flax, optax, orbax-checkpoint, h5py and absl-py (and
# so numpy and scipy, which JAX requires). docs/accelerators.md has the whole procedure.
#
#   scripts/fetch_wheels.sh [DIR] [PYTHON_VERSION]        defaults: .whl and 3.12
#   GLIBC=2.35 scripts/fetch_wheels.sh                    the node's glibc (default 2.28)
#
# Then, on the node, from the checkout, with no network:
#   python -m pip install --no-index --find-links DIR -e .
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
python_version=${2:-3.12}
glibc=${GLIBC:-2.28}
python=${PYTHON:-python3}

# capjax's requirements (pyproject.toml) less those the image provides: pip keeps the image's
# own versions of those, which satisfy capjax's lower bounds, so their wheels would only be
# carried along unused. setuptools builds the editable install of capjax itself (pip builds it
# in an isolated environment, from DIR too); pytest runs the tests there.
requirements=$("$python" - <<'EOF'
import re, tomllib
PREINSTALLED = {'jax', 'flax', 'optax', 'orbax-checkpoint', 'h5py', 'absl-py', 'numpy', 'scipy'}
with open('pyproject.toml', 'rb') as f:
  project = tomllib.load(f)['project']
needed = [r for r in project['dependencies']
          if re.split(r'[<>=!~ \[;]', r)[0].lower().replace('_', '-') not in PREINSTALLED]
print(' '.join(needed + ['setuptools>=77', 'pytest>=8']))
EOF
)
# Every manylinux tag a node with this glibc accepts, from manylinux2014 (glibc 2.17) up: pip
# takes --platform tags literally and does not add the older ones a newer glibc also runs.
platforms=""
for minor in $(seq 17 "${glibc#2.}"); do platforms+=" --platform manylinux_2_${minor}_x86_64"; done

# Requirements published only as source, all pure Python (tensorflow-datasets needs promise):
# built here into py3-none-any wheels, which any Python 3 takes, and found in DIR by the
# download below, which with --platform accepts nothing but wheels.
source_only="promise"

echo "Fetching into $dir for CPython $python_version, glibc >= $glibc: $requirements"
"$python" -m pip wheel --no-deps -w "$dir" $source_only
"$python" -m pip download --only-binary=:all: --python-version "$python_version" \
    --implementation cp --platform manylinux2014_x86_64 $platforms --find-links "$dir" \
    -d "$dir" $requirements
echo "$(ls "$dir" | wc -l) files, $(du -sh "$dir" | cut -f1) in $dir"
