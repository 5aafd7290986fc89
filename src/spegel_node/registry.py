"""Registry and mirror URLs: strict parsing, and the hosts-dir names containerd looks up."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from spegel_node import hostsdir_rules
from spegel_node.errors import BadInput

DOCKER_HUB = "docker.io"
DOCKER_HUB_UPSTREAM = "https://registry-1.docker.io"

# A DNS name or IPv4 literal: letters, digits, '-', '.', each label starting with an alphanumeric.
_HOSTNAME = re.compile(
    r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}))*$"
)

MAX_HOSTNAME = 253  # RFC 1035, as DNS carries it (without the trailing dot)
MAX_LABEL = 63
MAX_DIR_NAME = 255  # NAME_MAX: the registry's directory in the hosts dir is named host:port


@dataclass(frozen=True, order=True)
class Registry:
    """An upstream registry, e.g. `https://ghcr.io` or `http://127.0.0.1:5000`."""

    scheme: str
    host: str  # `host` or `host:port`; IPv6 literals keep their brackets: `[::1]:5000`

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def dir_names(self) -> tuple[str, ...]:
        """Directory names containerd tries, in order, before `_default` (HostDirFromRoot)."""
        return hostsdir_rules.dir_names(self.host)

    @property
    def upstream(self) -> str:
        """The `server` a file for this registry names (docker.io is served by registry-1)."""
        return DOCKER_HUB_UPSTREAM if self.host == DOCKER_HUB else self.url


def _bad(kind: str, value: object, why: str) -> BadInput:
    return BadInput(f"invalid {kind} {value!r}: {why}")


def _check_host(kind: str, raw: str, host: str, port: int | None) -> str:
    if host.startswith("[") or ":" in host:
        try:
            address = ipaddress.IPv6Address(host.strip("[]"))
        except ValueError as e:
            raise _bad(kind, raw, "not a valid IPv6 address") from e
        if address.scope_id is not None:  # a zone ("%eth0") cannot be in an image reference
            raise _bad(kind, raw, "not a valid IPv6 address (no zone allowed)")
        host = f"[{host.strip('[]')}]"
    elif not _HOSTNAME.match(host):
        label = max(host.split("."), key=len)
        if len(label) > MAX_LABEL and _HOSTNAME.match(
            ".".join(p[:MAX_LABEL] for p in host.split("."))
        ):
            raise _bad(kind, raw, f"a DNS label is longer than {MAX_LABEL} characters")
        raise _bad(kind, raw, "host must be a DNS name or IP address")
    elif len(host) > MAX_HOSTNAME:
        raise _bad(
            kind, raw, f"host name is {len(host)} characters, more than DNS allows ({MAX_HOSTNAME})"
        )
    named = f"{host}:{port}" if port is not None else host
    if len(named.encode()) > MAX_DIR_NAME:  # the hosts dir name containerd looks up
        raise _bad(
            kind, raw, f"host:port is longer than a directory name may be ({MAX_DIR_NAME} bytes)"
        )
    return named


def parse_url(raw: object, kind: str = "registry") -> tuple[str, str]:
    """Split `http(s)://host[:port]` into (scheme, host[:port]); anything else is BadInput."""
    if not isinstance(raw, str):
        raise _bad(kind, raw, "must be a string")
    if any(ch in raw for ch in ("\x00", "\\", " ", "\t", "\n", "\r")):
        raise _bad(kind, raw, "contains a NUL, backslash or whitespace")
    if "://" not in raw:
        raise _bad(kind, raw, "needs a scheme, e.g. https://" + raw.lstrip("/"))
    try:
        parts = urlsplit(raw)
    except ValueError as e:
        raise _bad(kind, raw, str(e)) from e
    if parts.scheme not in ("http", "https"):
        raise _bad(kind, raw, "scheme must be http or https")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise _bad(kind, raw, "must not carry user info")
    if parts.path not in ("", "/"):
        raise _bad(kind, raw, "must not have a path")
    if parts.query or parts.fragment or raw.endswith(("?", "#")):
        raise _bad(kind, raw, "must not have a query or fragment")
    try:
        port = parts.port
    except ValueError as e:
        raise _bad(kind, raw, "port must be a number from 1 to 65535") from e
    if port == 0:
        raise _bad(kind, raw, "port must be a number from 1 to 65535")
    host = parts.hostname or ""
    if not host or host.startswith(".") or ".." in host:
        raise _bad(kind, raw, "host must not be empty, start with '.' or contain '..'")
    netloc_host = parts.netloc.rsplit(":", 1)[0] if port is not None else parts.netloc
    if netloc_host.startswith("["):
        host = netloc_host
    return parts.scheme, _check_host(kind, raw, host, port)


def parse_registry(raw: object) -> Registry:
    scheme, host = parse_url(raw, "registry")
    return Registry(scheme=scheme, host=host.lower())


def parse_mirror_url(raw: object) -> str:
    scheme, host = parse_url(raw, "mirror URL")
    return f"{scheme}://{host}"


def registry_for_host(host: str) -> Registry:
    """The registry a hosts dir entry names (`ghcr.io`, `host:port`, `host_port_`)."""
    return Registry(scheme="https", host=hostsdir_rules.host_of_dir(host))
