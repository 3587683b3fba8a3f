# shellcheck shell=bash
# `supervise NAME PID [NAME PID ...]`: waits for the given background processes (children of the
# calling shell) and keeps them a unit. When one ends on its own, it says which one and how it
# ended, stops the others with SIGTERM, waits for them and returns that one's exit code (1 if it
# was 0: a service is not meant to end by itself). On SIGINT or SIGTERM to the shell, it passes
# SIGTERM to all of them, waits for them and returns 0. Sourced by scripts/run.sh.
#
# It polls (`kill -0` every 0.5 s) rather than `wait -n`: a child that is reaped before `wait -n`
# starts (a service that fails at once) is "no such job" to it, and it would wait for the others
# for ever. `wait PID` still returns a reaped child's saved status. Globals only (`_sv_*`), no
# `local`: bash 5.2 mishandles a trap that fires while a function with locals waits.

supervise() {
  _sv_names=()
  _sv_pids=()
  while [ $# -ge 2 ]; do
    _sv_names+=("$1")
    _sv_pids+=("$2")
    shift 2
  done
  _sv_stopping=0
  # Background children of a non-interactive shell ignore SIGINT, so Ctrl-C reaches only this
  # shell: pass it on as the SIGTERM the services shut down gracefully on.
  trap '_sv_stopping=1; echo "run: stopping ${_sv_names[*]}" >&2; kill -TERM "${_sv_pids[@]}" 2>/dev/null' INT TERM
  _sv_ended=""
  while [ -z "$_sv_ended" ]; do
    for _sv_i in "${!_sv_pids[@]}"; do
      if ! kill -0 "${_sv_pids[$_sv_i]}" 2>/dev/null; then
        _sv_ended=$_sv_i
        break
      fi
    done
    if [ -z "$_sv_ended" ]; then
      # In the background so that a trapped signal interrupts the `wait` at once.
      sleep 0.5 &
      wait $! 2>/dev/null || true
    fi
  done
  wait "${_sv_pids[$_sv_ended]}" 2>/dev/null && _sv_code=0 || _sv_code=$?
  if [ "$_sv_stopping" = 0 ]; then
    _sv_what="exited with code $_sv_code"
    [ "$_sv_code" -gt 128 ] && _sv_what="was killed by signal $((_sv_code - 128))"
    echo "run: ${_sv_names[$_sv_ended]} (pid ${_sv_pids[$_sv_ended]}) $_sv_what; stopping the other services" >&2
    kill -TERM "${_sv_pids[@]}" 2>/dev/null || true
  fi
  for _sv_i in "${!_sv_pids[@]}"; do
    wait "${_sv_pids[$_sv_i]}" 2>/dev/null || true
  done
  trap - INT TERM
  [ "$_sv_stopping" = 1 ] && return 0
  [ "$_sv_code" -eq 0 ] && return 1
  return "$_sv_code"
}
