#!/bin/sh
# Stage B: PID 1 of the machine's new PID namespace, still on the host's root.
# Records its host PID, moves into the payload cgroup, then enters a cgroup namespace rooted there.
set -eu
read -r host_pid _ < /proc/self/stat  # this /proc still belongs to the host's PID namespace
echo 0 > "$MACHINE_CGROUP/payload/cgroup.procs"  # "0" moves the writer itself
echo "$host_pid" > "$MACHINE_STATE/pid.tmp"
mv "$MACHINE_STATE/pid.tmp" "$MACHINE_STATE/pid"
exec unshare --cgroup /bin/sh "$MACHINE_STAGES/stage_c.sh"
