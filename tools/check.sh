#!/usr/bin/env bash
# Install what the checks need into .venv and run every check: lint, types, generated code,
# the host test suite, then the cgroup v2 suite inside a throw-away VM.
# JOBWORKER_SKIP_VM=1 skips the VM suite (it needs QEMU and takes minutes).
#
# Every stage runs whatever failed before it; the end lists each stage's outcome and the
# exit status is 1 if any failed. Only the set-up (packages, .venv) stops the script.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

step() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'check.sh: %s\n' "$*" >&2; exit 1; }

results=()
failed=0
# stage NAME COMMAND...: run COMMAND, record NAME's outcome and time, go on either way.
stage() {
  local name=$1 began=$SECONDS status
  shift
  step "$name"
  "$@"
  status=$?
  if ((status == 0)); then
    results+=("ok      $name ($((SECONDS - began)) s)")
  else
    results+=("FAILED  $name (exit $status, $((SECONDS - began)) s)")
    failed=1
  fi
}

need_apt=()
command -v openssl >/dev/null || need_apt+=(openssl)
command -v ps >/dev/null || need_apt+=(procps)
command -v dot >/dev/null || need_apt+=(graphviz)  # docs/architecture.svg is checked
command -v zsh >/dev/null || need_apt+=(zsh)  # the zsh completion script is checked
command -v groff >/dev/null || need_apt+=(groff-base)  # the man page is checked
command -v ip >/dev/null || need_apt+=(iproute2)
# Jobs' private networks (the default): pasta, and nft for the rules inside them.
command -v pasta >/dev/null || need_apt+=(passt)
PATH="$PATH:/usr/sbin:/sbin" command -v nft >/dev/null || need_apt+=(nftables)
if ((${#need_apt[@]})); then
  step "installing ${need_apt[*]}"
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need_apt[@]}"; } ||
    die "cannot install ${need_apt[*]}"
fi

step "python environment (.venv)"
[ -x .venv/bin/python ] || python3 -m venv .venv || die "cannot create .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' ||
  die "cannot install jobworker[dev] into .venv"
export PATH="$PWD/.venv/bin:$PATH"

lint() { ruff check . && ruff format --check .; }
stage "lint (ruff)" lint

stage "types (mypy --strict)" mypy

proto() {
  tools/gen_proto.sh || return
  git diff --exit-code -- jobworker/v1 || {
    echo "generated code differs from proto/: run tools/gen_proto.sh and commit" >&2
    return 1
  }
}
stage "generated protobuf code is up to date" proto

# The README's command, so a test that imports something only the dev extra installs fails
# here too (tox.ini's extras and this script cannot drift). About 25 s to build the env.
stage "tests on the host (tox -e tests: a virtualenv with only the test extra)" \
  tox -e tests -- -p no:cacheprovider

# Its own environment: the ray extra (about 450 MB) stays out of the base install. A local
# Ray cluster (head + 3 nodes on 127.0.0.1) runs for about a minute.
stage "Ray cluster backend (tox -e ray)" tox -e ray

vm_suite() {
  python tests/vm/run_vm.py --timeout 1200 --retries 1 -- \
    "$PWD/.venv/bin/python" -m pytest -p pytest_timeout -p no:cacheprovider -m cgroup tests/vm
}
# run_vm.py re-boots a hung VM itself. Rates measured under software emulation are noisy,
# so a failed suite gets one more run in a fresh VM; a real regression fails both.
vm_suite_twice() {
  vm_suite && return
  step "cgroup v2 tests: one more run in a fresh VM"
  vm_suite
}
if [ "${JOBWORKER_SKIP_VM:-0}" != 1 ]; then
  stage "cgroup v2 tests inside a QEMU VM" vm_suite_twice
else
  results+=("skipped cgroup v2 tests inside a QEMU VM (JOBWORKER_SKIP_VM=1)")
fi

step "summary"
printf '%s\n' "${results[@]}" >&2
exit "$failed"
