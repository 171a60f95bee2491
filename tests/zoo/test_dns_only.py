"""The zoo's last network: only the resolver answers. The agent, in a network namespace of its own, reaches
nothing but a recursive resolver (unbound, 0x20 and QNAME minimisation on) inside that network; the resolver
reaches the gateway's DNS endpoint upstream (over TCP, the only way out of the namespace), as a hotel's
resolver reaches the internet before anyone logs in. Started as a user would (gateway URL, its DNS zone, the
resolver), the agent finds that no HTTP rung gets out, carries everything over DNS, and the gateway's journal
holds exactly the datagrams sent, once each, in order."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.agent.chain import GatewayProc, enroll_agent, journal, wait_until
from tests.peers import _stop_process, free_tcp_port, free_udp_port, require
from tests.resolvers import free_dns_port
from tests.zoo.agentrun import AGENT, ZooAgent, find_rung, status_text
from tests.zoo.netns import IsolatedNet
from tests.zoo.zoo import require_netns

ZONE = "t.example.org"


def _unbound_conf(workdir: Path, *, port: int, upstream: int) -> Path:
    conf = workdir / "unbound.conf"
    conf.write_text(
        "server:\n"
        "  interface: 127.0.0.1\n"
        f"  port: {port}\n"
        "  do-daemonize: no\n"
        '  username: ""\n'
        '  chroot: ""\n'
        f'  directory: "{workdir}"\n'
        '  pidfile: ""\n'
        "  use-syslog: no\n"
        f'  logfile: "{workdir / "unbound.log"}"\n'
        "  access-control: 127.0.0.0/8 allow\n"
        "  do-not-query-localhost: no\n"
        "  use-caps-for-id: yes\n"
        "  qname-minimisation: yes\n"
        '  module-config: "iterator"\n'
        "  do-ip6: no\n"
        "  tcp-upstream: yes\n"
        f'  domain-insecure: "{ZONE}"\n'
        "stub-zone:\n"
        f'  name: "{ZONE}"\n'
        f"  stub-addr: 127.0.0.1@{upstream}\n"
    )
    return conf


def test_only_dns_gets_out(tmp_path: Path, v9_capture: tuple[Path, list[bytes]]) -> None:
    require_netns()
    require("unbound")
    pcap, payloads = v9_capture
    data = tmp_path / "gw"
    key = enroll_agent(data, AGENT)
    dns_port = free_dns_port()
    gw = GatewayProc(data, extra=["--dns-zone", ZONE, "--dns-listen", f"udp://127.0.0.1:{dns_port}"])
    inside_upstream = free_tcp_port()
    resolver_port = free_dns_port()  # unbound listens on UDP and TCP
    # The gateway's HTTP port is not exposed: inside, only the resolver's upstream (the DNS endpoint, TCP).
    with gw.start(), IsolatedNet(expose={inside_upstream: dns_port}) as net:
        workdir = tmp_path / "unbound"
        workdir.mkdir()
        conf = _unbound_conf(workdir, port=resolver_port, upstream=inside_upstream)
        unbound = subprocess.Popen(net.command(["unbound", "-d", "-c", str(conf)]), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        try:
            time.sleep(1.0)  # unbound binds inside the namespace, where /proc/net of the host cannot see it
            assert unbound.poll() is None, (workdir / "unbound.log").read_text(errors="replace")
            agent = ZooAgent(net, tmp_path / "spool", gateway=gw.url, key=key, port=free_udp_port(),
                             extra=["--dns-zone", ZONE, "--dns-resolver", f"127.0.0.1:{resolver_port}",
                                    "--dns-qps", "200"])
            with agent.start():
                agent.replay(pcap)
                try:
                    wait_until(lambda: gw.acked(AGENT) > 0, "first acknowledged batch over DNS", timeout=60)
                    first = time.monotonic() - agent.started_at
                    wait_until(lambda: gw.acked(AGENT) == len(payloads), "every datagram over DNS",
                               timeout=240)
                except AssertionError as exc:
                    raise AssertionError(f"{exc}\nagent status: {status_text(agent.status())[:3000]}\n"
                                         f"agent log:\n{agent.log_text()[-3000:]}") from None
                wait_until(lambda: (agent.status() or {}).get("backlog", {}).get("datagrams") == 0,
                           "spool empty")
                status = agent.status() or {}
                assert agent.stop() == 0
        finally:
            _stop_process(unbound)
        gw_status = gw.status()
        assert gw.stop() == 0
    print(f"zoo dns-only: first acknowledged batch {first:.2f} s after agent start")
    entries = journal(data, AGENT)
    assert [seq for seq, _ in entries] == list(range(1, len(payloads) + 1)), "each datagram exactly once"
    assert [d.payload for _, d in entries] == payloads
    assert find_rung(status) == "dns", status_text(status)[:2000]
    upload = status.get("upload", {})
    assert upload.get("dns", {}).get("queries", 0) > 0
    counters = (gw_status.get("dns") or {}).get("counters", {})
    assert counters.get("dns-batches", 0) > 0
    assert counters.get("dns-mixed-case", 0) > 0  # unbound randomised the case on its way to the gateway
