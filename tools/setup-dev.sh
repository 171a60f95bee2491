#!/usr/bin/env bash
# Prepares a fresh Debian machine for flowtunnel's tests: the real peers the tests drive (softflowd, nfdump,
# tshark, tinyproxy, nats-server; squid with its fake auth helpers and mitmproxy for the hostile-network zoo
# in tests/zoo/; unbound and dnsmasq as the DNS rung's resolvers; pmacct for the benchmarks' nfacctd baseline;
# systemd for systemd-analyze, which checks contrib/systemd; chromium and chromium-driver for the console's
# browser tests in tests/e2e/test_console_browser.py; haproxy, the load balancer in front of two gateways in
# tests/scaleout/test_failover.py) and a virtualenv at .venv with the project and
# its test/lint extras.
# Idempotent; needs root (or sudo) for apt-get. Set SKIP_APT=1 to skip the Debian part.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${SKIP_APT:-0}" != "1" ]; then
    SUDO=""
    [ "$(id -u)" = "0" ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    # tshark asks whether non-root users may capture; answer it up front so the install never blocks.
    echo "wireshark-common wireshark-common/install-setuid boolean false" | $SUDO debconf-set-selections
    need=""
    # systemd-analyze (package systemd) verifies the unit files in contrib/systemd.
    for pair in softflowd:softflowd nfcapd:nfdump tshark:tshark tinyproxy:tinyproxy nats-server:nats-server nfacctd:pmacct \
        squid:squid mitmdump:mitmproxy unbound:unbound dnsmasq:dnsmasq-base systemd-analyze:systemd \
        chromium:chromium chromedriver:chromium-driver haproxy:haproxy; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need="$need ${pair##*:}"
    done
    if [ -n "$need" ]; then
        echo "setup-dev: installing Debian packages:$need" >&2
        $SUDO apt-get update -qq
        $SUDO apt-get install -y -qq --no-install-recommends $need >/dev/null
    fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,lint,nats]'
echo "setup-dev: ready (.venv)" >&2
