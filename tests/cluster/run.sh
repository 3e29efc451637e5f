#!/usr/bin/env bash
# Boot the two-node SLURM test cluster, run the cluster tests on it, tear it down (also on failure).
#   sudo tests/cluster/run.sh [pytest args...]        exits with pytest's status
# Not root: boots nothing; runs pytest on the cluster tests, which then report SKIPPED (needs root), exit 0.
# Installs slurm + munge with apt when missing. Python: the repo's .venv when present, else python3.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=python3; [ ! -x .venv/bin/python ] || PYTHON=.venv/bin/python
if [ "$(id -u)" -ne 0 ]; then
    # No cluster without root: pytest still collects the cluster tests, which skip with the reason, so the
    # summary shows them as SKIPPED (and pytest exits 0) instead of them silently not running.
    echo "SLURM cluster tests need root (network namespaces, daemons): reported as skipped below; run: sudo tests/cluster/run.sh"
    exec "$PYTHON" -m pytest -m cluster tests/cluster -q -rs "$@"
fi

CLUSTER=tests/cluster/cluster.sh
eval "$($CLUSTER env)"   # SLURM_CONF for sinfo/sbatch here and in the tests
export DCGAN_TEST_CLUSTER=1   # tests fail rather than skip when the cluster is not there

PYTEST_PID=
trap '$CLUSTER down' EXIT
trap '[ -z "$PYTEST_PID" ] || kill "$PYTEST_PID" 2>/dev/null; exit 130' INT TERM   # EXIT trap still tears down
$CLUSTER up
status=0
"$PYTHON" -m pytest -m cluster tests/cluster "$@" &   # in the background so that INT/TERM reach the trap at once
PYTEST_PID=$!
wait "$PYTEST_PID" || status=$?
if [ "$status" -ne 0 ]; then
    echo "--- slurm logs (last lines) ---" >&2
    tail -n 15 "$(dirname "$SLURM_CONF")"/log/*.log >&2 || true
fi
exit "$status"
