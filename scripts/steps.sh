# Sourced by setup.sh and setup_vllm.sh (set step_prefix first): each setup step runs with
# all its output (pip's, apt-get's) in a log, and says one line on stderr,
# "<prefix>: <what> ... 41 s". A step that fails shows the end of its log, keeps the log
# and exits with the step's status; `try_step` returns the status instead.
step_log=$(mktemp "${TMPDIR:-/tmp}/netloader-setup.XXXXXX")
trap 'rm -f "$step_log"' EXIT
step_tail=40  # lines of a failed step's output shown

# try_step WHAT COMMAND...: run COMMAND (a program or a function; a function's commands
# do not stop at a failure by themselves, so chain them with &&), say how it went, and
# return its status.
try_step() {
  local what=$1 start=$SECONDS status=0
  shift
  "$@" >"$step_log" 2>&1 </dev/null || status=$?
  if [ "$status" -eq 0 ]; then
    echo "$step_prefix: $what ... $((SECONDS - start)) s" >&2
  elif [ -s "$step_log" ]; then
    echo "$step_prefix: $what ... FAILED after $((SECONDS - start)) s (exit status $status);" \
      "the end of its output:" >&2
    tail -n "$step_tail" "$step_log" | sed 's/^/    /' >&2
  else
    echo "$step_prefix: $what ... FAILED after $((SECONDS - start)) s (exit status $status)," \
      "printing nothing" >&2
  fi
  return "$status"
}

# step WHAT COMMAND...: as try_step, but a failure ends the script with the step's status,
# its whole output kept in the log named.
step() {
  local status=0
  try_step "$@" || status=$?
  if [ "$status" -ne 0 ]; then
    if [ -s "$step_log" ]; then
      trap - EXIT
      echo "$step_prefix: the whole output of '$1': $step_log" >&2
    fi
    exit "$status"
  fi
}
