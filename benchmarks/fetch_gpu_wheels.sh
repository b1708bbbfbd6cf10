#!/usr/bin/env bash
# Run HERE (not on the device) before benchmarks/gpu_check.sh: downloads, into .whl/ (git-ignored), the
# wheels the device image lacks (hydra-core, wandb and their needs), for its Python 3.12 on x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"
for pkg in hydra-core omegaconf antlr4-python3-runtime==4.9.3 wandb sentry-sdk gitpython gitdb smmap platformdirs \
           pydantic pydantic-core annotated-types typing-inspection; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d .whl "$pkg" \
    || python3 -m pip download -q --no-deps --python-version 3.12 -d .whl "$pkg"
done
ls .whl
