#!/usr/bin/env bash
# `tox -e mutation`: mutmut over the code where a silent regression would hurt most: the
# output log, identity, authorization, the job spec's checks, and the job manager's start,
# stop and exit paths. What is mutated and which tests judge it is [tool.mutmut] in
# pyproject.toml; docs/testing.md has the last result. Slow (an hour or more on 2 cores),
# so not part of CI.
# Extra arguments replace the list of mutants to run (mutmut's name patterns).
set -euo pipefail
cd "$(dirname "$0")/.."

targets=("$@")
if ((${#targets[@]} == 0)); then
  targets=(
    "jobworker.backends.local.outputlog.*"
    "jobworker.backends.local.spoolwriter.*"
    "jobworker.api.identity.*"
    "jobworker.plugins.authz.*"
    "jobworker.backends.local.ending.*" # supervise, _reap, _settle, exit_info, terminate
    "jobworker.model.x_describe_end__*"
    "jobworker.jobspec.x__check_spec__*" # what a job may ask for (validate_spec before)
    "jobworker.backends.local.manager.x*JobManager*start*" # start, start_as, _start
    "jobworker.backends.local.manager.x*JobManager*stop__*"
    "jobworker.backends.local.manager.x*JobManager*_supervise__*"
    "jobworker.backends.local.manager.x*JobManager*_finish__*"
    "jobworker.backends.local.table.*" # the quota per client and eviction
    "jobworker.backends.local.manager.x*JobManager*shutdown__*"
    "jobworker.backends.local.manager.x*JobManager*wait__*"
  )
  rm -rf mutants # a whole run starts from scratch; a partial one reuses what is known
fi

status=0
nice mutmut run --max-children "${JOBWORKER_MUTATION_CHILDREN:-2}" "${targets[@]}" || status=$?

# A mutant that breaks stopping leaves job processes behind, each in a session of its own
# where no process group reaches it; they all run in mutants/, and nothing else does.
for proc in /proc/[0-9]*; do
  if [[ "$(readlink "$proc/cwd" 2>/dev/null)" == "$PWD/mutants"* ]]; then
    kill -KILL "${proc#/proc/}" 2>/dev/null || true
  fi
done

mutmut results
exit "$status"
