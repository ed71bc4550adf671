#!/usr/bin/env bash
# The project's test command (README "Build and test"); CI runs it through .ci/run.
# Installs the build tools, builds wavenet_ae._C in place (editable install; CUDA kernels too when
# /usr/local/cuda has nvcc and torch is a CUDA build), then runs the tests. WAVENET_AE_REQUIRE_EXT=1
# makes the tests fail if the extension is missing or silently came out CPU-only.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install torch==2.14.1 setuptools wheel ninja
MAX_JOBS=${MAX_JOBS:-2} python -m pip install --no-build-isolation -e ".[test,abx]"
# ABX scoring (zerospeech-libriabx2): without dependencies, else torchaudio's wheel would replace our
# torch (see the `abx` extra in pyproject.toml)
python -m pip install --no-deps torchaudio==2.11.0
python -m pip install --no-deps --no-build-isolation zerospeech-libriabx2==0.9.8
# The browser of tests/test_report_html.py, which opens the evaluation report's report.html in headless
# Chromium through selenium (the `test` extra): Debian's chromium and chromium-driver. Under CI (the CI
# variable set) the test fails without them rather than skipping.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = 0 ]; then sudo=(); elif command -v sudo >/dev/null; then sudo=(sudo); else sudo=(false); fi
    if command -v apt-get >/dev/null && "${sudo[@]}" apt-get update \
            && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
                chromium chromium-driver; then :
    else
        echo "warning: could not install chromium and chromium-driver (needs apt-get, as root or with sudo):" \
             "tests/test_report_html.py will skip, or fail when CI is set" >&2
    fi
fi
WAVENET_AE_REQUIRE_EXT=1 python -m pytest -q tests
