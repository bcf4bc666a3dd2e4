"""The names and addresses a server answers to: loopback, this machine's names, its interface addresses.

Shared by the worker's startup banner (the URLs to paste) and the request guard's Host check (service/guard.py);
and whose word the servers take for a client's address (proxy_options).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

ANY_HOSTS = ("0.0.0.0", "::", "")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1; IPv6 may come in brackets)."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def interface_addresses(bind: str) -> list[str]:
    """The addresses a server bound to `bind` is reached on: for every interface (0.0.0.0 or ::) each interface
    address (loopback last; IPv6 link-local left out: it needs a zone), else `bind` itself."""
    if bind not in ANY_HOSTS:
        return [bind]
    import psutil

    families = (socket.AF_INET,) if bind == "0.0.0.0" else (socket.AF_INET, socket.AF_INET6)
    found = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family not in families:
                continue
            ip = ipaddress.ip_address(address.address.split("%")[0])
            if not ip.is_link_local:
                found.append(ip)
    found.sort(key=lambda ip: (ip.is_loopback, ip.version, int(ip)))
    return list(dict.fromkeys(str(ip) for ip in found))


def machine_names() -> list[str]:
    """This machine's host name and fully qualified name (what a LAN client may type)."""
    return list(dict.fromkeys(name for name in (socket.gethostname(), socket.getfqdn()) if name))


def host_name(text: str) -> str:
    """The name or address of a host as a user may write it (`name`, `name:port`, `[v6]:port`, a bare IPv6 address,
    a URL): lowercase, IPv6 compressed and without brackets, as the request guard reads a Host header."""
    text = text.strip()
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        pass
    try:
        name = urlsplit(text if "://" in text else f"//{text}").hostname
    except ValueError:
        name = None
    return (name or text).lower()


def answered_hosts(bind: str, extra: tuple[str, ...] = ()) -> frozenset[str] | None:
    """The Host names a server bound to `bind` answers to (host_name's form), or None for any.

    Loopback names always; bound to every interface, this machine's names and interface addresses too; bound to
    one address or name, that one; `extra` adds names (a reverse proxy's, a tunnel's; a port or a scheme given with
    one is left out, the check being by name), and "*" turns the check off.
    """
    if "*" in extra:
        return None
    names = [*LOOPBACK_NAMES, *extra]
    if bind in ANY_HOSTS:
        names += [*machine_names(), *interface_addresses(bind)]
    elif not is_loopback(bind):
        names.append(bind)
    return frozenset(host_name(name) for name in names if name.strip())


def proxy_options(forwarded_allow_ips: str | None) -> dict[str, Any]:
    """uvicorn's settings for X-Forwarded-For / X-Forwarded-Proto: believed only from the reverse proxies named in
    `forwarded_allow_ips` (comma-separated addresses or networks, as uvicorn's own flag), else never. uvicorn's
    default believes 127.0.0.1, so that any process on this machine could give each of its token guesses and
    logins a fresh client address, and with it a fresh count in the back-off (service/login_limit.py)."""
    names = ",".join(n.strip() for n in (forwarded_allow_ips or "").split(",") if n.strip())
    if not names:
        return {"proxy_headers": False}
    return {"proxy_headers": True, "forwarded_allow_ips": names}
