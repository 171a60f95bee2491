"""The PAC evaluator's child process: ``python -I .../_pacworker.py`` (stdlib and dukpy only, no flowtunnel).

A PAC file is JavaScript from the network (WPAD) or a file someone handed over; it may throw, loop for ever
or allocate without end. ``discover.evaluate_pac`` therefore runs it here, in a child that first caps its own
address space and CPU time (``RLIMIT_AS``, ``RLIMIT_CPU``) and that the parent kills after a wall-clock
timeout.
The engine is dukpy (an embedded JS interpreter in one wheel, no Node or browser needed); the PAC helper
functions (``shExpMatch``, ``isInNet``, ``dnsDomainIs`` ...) are defined below in JavaScript, with
``dnsResolve`` and ``myIpAddress`` answered from Python.

Protocol: one JSON object on stdin ``{"pac", "url", "host", "memory", "cpu", "target"}``; one JSON object on
stdout: ``{"result": "PROXY ...; DIRECT"}`` or ``{"error": "what went wrong"}``. Anything the PAC prints is
sent to stderr (which the parent discards), so it cannot forge the answer.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import sys
from typing import Any

__all__ = ["PAC_PRELUDE", "main"]

_MAX_RESULT = 4096
_MAX_LOOKUPS = 32

PAC_PRELUDE = r"""
function dnsDomainIs(host, domain) {
  host = String(host).toLowerCase(); domain = String(domain).toLowerCase();
  return host.length >= domain.length && host.substring(host.length - domain.length) === domain;
}
function isPlainHostName(host) { return String(host).indexOf('.') < 0; }
function localHostOrDomainIs(host, hostdom) {
  host = String(host).toLowerCase(); hostdom = String(hostdom).toLowerCase();
  return host === hostdom || hostdom.lastIndexOf(host + '.', 0) === 0;
}
function dnsDomainLevels(host) { return String(host).split('.').length - 1; }
function dnsResolve(host) { return call_python('dnsResolve', String(host)); }
function dnsResolveEx(host) { var a = dnsResolve(host); return a === null ? '' : a; }
function myIpAddress() { return call_python('myIpAddress'); }
function myIpAddressEx() { return myIpAddress(); }
function isResolvable(host) { return dnsResolve(host) !== null; }
function isResolvableEx(host) { return isResolvable(host); }
function convert_addr(ipchars) {
  var b = String(ipchars).split('.');
  return (((b[0] & 0xff) << 24) | ((b[1] & 0xff) << 16) | ((b[2] & 0xff) << 8) | (b[3] & 0xff)) >>> 0;
}
function _isIp4(s) {
  var m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(String(s));
  return m !== null && m[1] < 256 && m[2] < 256 && m[3] < 256 && m[4] < 256;
}
function isInNet(ipaddr, pattern, maskstr) {
  if (!_isIp4(ipaddr)) { ipaddr = dnsResolve(ipaddr); if (ipaddr === null || !_isIp4(ipaddr)) return false; }
  if (!_isIp4(pattern) || !_isIp4(maskstr)) return false;
  var mask = convert_addr(maskstr);
  return ((convert_addr(ipaddr) & mask) >>> 0) === ((convert_addr(pattern) & mask) >>> 0);
}
function shExpMatch(str, pattern) {
  var re = String(pattern).replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.');
  return new RegExp('^' + re + '$').test(String(str));
}
var _PAC_DAYS = ['SUN', 'MON', 'TUE', 'WED', 'THU', 'FRI', 'SAT'];
var _PAC_MONTHS = ['JAN', 'FEB', 'MAR', 'APR', 'MAY', 'JUN', 'JUL', 'AUG', 'SEP', 'OCT', 'NOV', 'DEC'];
function _pacArgs(args) {
  var a = Array.prototype.slice.call(args), gmt = false;
  if (a.length && String(a[a.length - 1]).toUpperCase() === 'GMT') { a.pop(); gmt = true; }
  return { a: a, gmt: gmt, now: new Date() };
}
function _inRange(lo, v, hi) { return lo <= hi ? (v >= lo && v <= hi) : (v >= lo || v <= hi); }
function weekdayRange() {
  var p = _pacArgs(arguments);
  if (p.a.length < 1 || p.a.length > 2) return false;
  var d1 = _PAC_DAYS.indexOf(String(p.a[0]).toUpperCase());
  var d2 = p.a.length === 2 ? _PAC_DAYS.indexOf(String(p.a[1]).toUpperCase()) : d1;
  if (d1 < 0 || d2 < 0) return false;
  return _inRange(d1, p.gmt ? p.now.getUTCDay() : p.now.getDay(), d2);
}
function timeRange() {
  var p = _pacArgs(arguments), a = p.a.map(function (x) { return parseInt(x, 10); }), n = p.now;
  var h = p.gmt ? n.getUTCHours() : n.getHours(), m = p.gmt ? n.getUTCMinutes() : n.getMinutes();
  var s = p.gmt ? n.getUTCSeconds() : n.getSeconds(), now = h * 3600 + m * 60 + s;
  if (a.length === 1) return h === a[0];
  if (a.length === 2) return _inRange(a[0] * 3600, now, a[1] * 3600 - 1);
  if (a.length === 4) return _inRange(a[0] * 3600 + a[1] * 60, now, a[2] * 3600 + a[3] * 60 - 1);
  if (a.length === 6) return _inRange(a[0] * 3600 + a[1] * 60 + a[2], now, a[3] * 3600 + a[4] * 60 + a[5]);
  return false;
}
function dateRange() {
  var p = _pacArgs(arguments), n = p.now, a = p.a, parts = [];
  if (a.length < 1 || a.length > 6 || (a.length > 1 && a.length % 2 === 1)) return false;
  var cur = { y: p.gmt ? n.getUTCFullYear() : n.getFullYear(), m: p.gmt ? n.getUTCMonth() : n.getMonth(),
              d: p.gmt ? n.getUTCDate() : n.getDate() };
  for (var i = 0; i < a.length; i++) {
    var mi = _PAC_MONTHS.indexOf(String(a[i]).toUpperCase()), v = parseInt(a[i], 10);
    if (mi >= 0) parts.push({ k: 'm', v: mi });
    else if (isNaN(v)) return false;
    else parts.push({ k: v > 31 ? 'y' : 'd', v: v });
  }
  var half = a.length === 1 ? 1 : a.length / 2, lo = parts.slice(0, half);
  var hi = a.length === 1 ? lo : parts.slice(half);
  function key(ps, useCur) {
    var o = {}, k = 0;
    ps.forEach(function (q) { o[q.k] = q.v; });
    ['y', 'm', 'd'].forEach(function (f) { if (f in o) k = k * 100000 + (useCur ? cur[f] : o[f]); });
    return k;
  }
  return _inRange(key(lo, false), key(lo, true), key(hi, false));
}
"""


def _set_limits(memory: int, cpu: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    # A PAC has no business writing files (the answer goes to the parent through a pipe, not a file).
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))


def _evaluate(req: dict[str, Any]) -> dict[str, Any]:
    import dukpy  # type: ignore[import-untyped]  # after the limits: the engine's allocations are capped too

    lookups: dict[str, str | None] = {}
    target = str(req.get("target") or "127.0.0.1")

    def dns_resolve(host: str) -> str | None:
        if host in lookups:
            return lookups[host]
        if len(lookups) >= _MAX_LOOKUPS:
            return None
        try:
            addr: str | None = socket.gethostbyname(host)
        except (OSError, UnicodeError):
            addr = None
        lookups[host] = addr
        return addr

    def my_ip() -> str:
        # The source address the kernel would use towards the gateway; connecting a UDP socket sends nothing.
        peer = dns_resolve(target) or "127.0.0.1"
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((peer, 9))
                return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"

    js = dukpy.JSInterpreter()
    # A PAC gets the PAC functions and nothing else: no module loader (require() reads files), no process.
    for name in [n for n in js._funcs if not n.startswith("dukpy.log.")]:  # console.log stays: to stderr
        del js._funcs[name]
    js.evaljs("delete globalThis.require; delete globalThis.process; "
              "delete globalThis._dukpy_eval_cjs_source; delete globalThis._dukpy_cjs_source_compiles;")
    js.export_function("dnsResolve", dns_resolve)
    js.export_function("myIpAddress", my_ip)
    js.evaljs(PAC_PRELUDE)
    js.evaljs(str(req["pac"]))
    result = js.evaljs("String(FindProxyForURL(dukpy.url, dukpy.host))", url=str(req["url"]),
                       host=str(req["host"]))
    return {"result": str(result)[:_MAX_RESULT]}


def main() -> int:
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the PAC or the engine prints goes to stderr, never into our answer
    try:
        req = json.loads(sys.stdin.read())
        _set_limits(int(req["memory"]), int(req["cpu"]))
        answer = _evaluate(req)
    except MemoryError:
        answer = {"error": "PAC ran out of its memory limit"}
    except Exception as exc:  # the PAC's own error (JSRuntimeError...), reported to the parent
        text = " ".join(str(exc).split())
        answer = {"error": f"{type(exc).__name__}: {text[:300]}"}
    out.write(json.dumps(answer))
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
