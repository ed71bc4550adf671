#!/usr/bin/env bash
# ==================================================================================================
# The GPU check (issue 16): on a lent GPU machine, in ONE device call of at most 8 minutes, build the
# CUDA extension for that GPU, run every CUDA test, measure generation and training, check an exact
# resume on the GPU and the NCCL code paths. No device has run it yet (written without a GPU).
#
# 1. Here, first (CPU machine, PyPI):      bash scripts/gpu_wheels.sh        -> .whl/ (~2.2 MiB, ignored)
#    and check the kit without a GPU:      bash scripts/gpu_check.sh --dry-run
# 2. `status` (free): go on only if can_start_another is true. Then exactly this call:
#
#      run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=480)
#
#    The script ends itself inside its 450 s budget (--budget), so the reply always carries its summary.
#    Steps and timeouts (each capped by the budget left; a failing or hanging step is recorded, killed
#    with its process group, and the next one runs):
#      env 30 s | wheels 60 | build 240 | cuda_tests 150 | nccl_cli 75 | nccl_collectives 60 |
#      gen_speed 100 | train_speed 130 | resume 170 (sized to what is left)      expected ~435 s in all
# 3. The results: the reply's output_tail ends with the summary table (status, seconds and a note per
#    step, failed tests, the gen_speed and train_speed tables, the resume verdict). The files come back
#    under the reply's files_at: summary.json (everything, parsed), gpu_check.log (all output),
#    cuda_tests.xml, gen_speed.json, train_speed.json. Copy what you need out of files_at at once: the
#    next call empties it.
# 4. Then: the machine stays warm ~30 s. Either rerun at once only what you fixed, e.g.
#      run(command="bash scripts/gpu_check.sh --only build,cuda_tests --budget 200", carry=[".whl"],
#          timeout_s=240)
#    (a warm machine keeps /tmp/site and the ignored build/ folder, so the rebuild is incremental), or
#    call give_back. Device time is 15 minutes per task in all, start-up included: a start (1-2 min) +
#    this call leaves about one short rerun. Put the tables in the README's benchmark section with the
#    date and the device, and fix what failed (CPU-testable fixes first, here).
#
# Everything is in scripts/gpu_check.py (standard library only until the wheels are installed); this
# wrapper picks the interpreter: python3 on the device is the one with torch (PYTHON=... overrides).
# Options: --dry-run, --only STEPS, --skip STEPS, --budget SECONDS, --out DIR (default $OUT),
# --resume-steps N, --cpu-rehearsal (nccl_cli, nccl_collectives and resume on the CPU, to check them here).
# ==================================================================================================
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
