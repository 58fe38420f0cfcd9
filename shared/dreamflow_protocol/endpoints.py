"""Which ZeroMQ endpoints stay on this machine: the one rule the server and the add-on share.

The server refuses to bind beyond loopback without CURVE keys, and the Blender add-on asks for
Blender's online-access permission before it connects beyond loopback. Both ask
:func:`is_local_endpoint`, so they can never disagree about an address.

The rule answers "provably local", so anything it cannot prove is remote (the safe side: a
remote answer costs a permission or a key, a wrong local answer skips a security rule):

- ``ipc://PATH`` and ``inproc://NAME`` (non-empty) are local.
- ``tcp://HOST:PORT`` is local when PORT is a number in 0..65535 (or ``*``, a bind's "any
  port") and HOST is a literal loopback address: any IPv4 ``127.x.y.z`` in dotted-quad form,
  IPv6 ``::1`` in any spelling (``[::1]``, ``[0:0:0:0:0:0:0:1]``), an IPv4-mapped loopback
  (``[::ffff:127.0.0.1]``), or the name ``localhost`` (any case; RFC 6761 reserves it).
- Everything else is remote: host names (``127.evil.com`` is a DNS name, not an address),
  ``localhost.`` and ``127.0.0.1.`` (a trailing dot makes a DNS name that this machine's resolver
  may send elsewhere), short or numeric IPv4 forms (``127.1``, ``2130706433``), wildcards
  (``*``, ``0.0.0.0``, ``[::]``), interface names, ZeroMQ's ``source;destination`` form, a
  missing or non-numeric port, other or upper-case schemes (ZeroMQ matches schemes exactly),
  ``user@host`` forms, and empty or non-text input.
"""

from __future__ import annotations

import ipaddress

#: Schemes whose endpoints never leave this machine.
LOCAL_SCHEMES = ("ipc", "inproc")


def _port_ok(port: str) -> bool:
    return port == "*" or (port.isascii() and port.isdigit() and int(port) <= 65535)


def _loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif "[" in host or "]" in host:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a DNS name, an interface name, "*" or junk: not provably local
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def is_local_endpoint(endpoint: object) -> bool:
    """True only for ZeroMQ endpoints that provably stay on this machine (see the module's rules)."""
    if not isinstance(endpoint, str):
        return False
    scheme, sep, rest = endpoint.strip().partition("://")
    if not sep or not rest:
        return False
    if scheme in LOCAL_SCHEMES:
        return True
    if scheme != "tcp" or ";" in rest or "@" in rest or "/" in rest:
        return False
    host, sep, port = rest.rpartition(":")
    return bool(sep and host) and _port_ok(port) and _loopback_host(host)
