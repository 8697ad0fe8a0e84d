#!/usr/bin/env bash
# Install the peers that bench/forward_peers/run.py compares `fastpipe forward`
# with: socat, haproxy, nginx, iperf3, wrk and ab (apache2-utils), from
# Debian's packages.  The benchmark itself installs nothing; it skips what a
# missing peer is needed for.
#
# The packages' own services are kept from starting (a policy-rc.d that
# refuses, for the install only): a haproxy, nginx or iperf3 daemon left
# running would share the CPUs with the benchmark, and it starts its own
# instances on loopback ports.
set -euo pipefail

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi

policy=/usr/sbin/policy-rc.d
made_policy=""
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod 755 "$policy"
    made_policy=1
fi
cleanup() {
    if [ -n "$made_policy" ]; then
        $sudo rm -f "$policy"
    fi
}
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
# nginx-light is enough (a static file); newer Debian releases only have nginx.
if ! $sudo apt-get install -y -q socat haproxy nginx-light iperf3 wrk apache2-utils; then
    $sudo apt-get install -y -q socat haproxy nginx iperf3 wrk apache2-utils
fi

for tool in socat haproxy nginx iperf3 wrk ab taskset; do
    printf '%-8s %s\n' "$tool" "$(command -v "$tool" || echo MISSING)"
done
