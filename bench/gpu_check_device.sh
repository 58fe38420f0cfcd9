#!/bin/sh
# The GPU check on the device machine, as one command (bench/gpu_check.py; README "Running the GPU check").
# Before: `python3 bench/gpu_check.py --wheels .whl` here (.whl is git-ignored; carry it with the run).
# The device's `run` then calls:  sh bench/gpu_check_device.sh   with carry [".whl"], timeout_s 600.
# Wheels go to /tmp/site (never over the machine's own packages), the check gets 480 s of a 540 s
# limit (what it measured is written after every step), and the results land in $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && timeout 540 python3 bench/gpu_check.py --out "${OUT:?OUT is the device machine's output folder}" --budget 480 --compile
