#!/usr/bin/env bash
# README command 2 (and CI): set up, then run the whole test suite, including the test on the real
# default model. Extra arguments go to pytest (e.g. -m "not real_model" for the fast subset).
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
python -m pytest -q -p no:cacheprovider "$@"
