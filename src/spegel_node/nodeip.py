"""The node's own address for the mirror URL: the configured one, or this machine's primary IPv4
(the address of the default route's interface)."""

from __future__ import annotations

from pathlib import Path


def resolve_node_ip(node_ip: str) -> str:
    """`node_ip` as configured, or with "auto" this machine's primary IPv4."""
    return primary_ipv4() if node_ip == "auto" else node_ip


def primary_ipv4() -> str:
    iface = _default_route_interface()
    import psutil  # only needed for "auto"

    addrs = psutil.net_if_addrs()
    candidates = [iface] if iface else []
    candidates += [name for name in addrs if name != iface]
    for name in candidates:
        for addr in addrs.get(name, []):
            if addr.family.name == "AF_INET" and not addr.address.startswith("127."):
                return str(addr.address)
    return "127.0.0.1"


def _default_route_interface() -> str | None:
    try:
        lines = Path("/proc/net/route").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 2 and fields[1] == "00000000":
            return fields[0]
    return None
