"""Image references, normalised the way containerd and docker do (distribution/reference).

`alpine:3.20` -> docker.io / library/alpine / tag 3.20; `ghcr.io/x/y@sha256:...` keeps the digest;
`localhost:5000/x` keeps its registry; no tag and no digest means `latest`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote

from spegel_node.errors import BadInput

DOCKER_HUB = "docker.io"
_LEGACY_HUB = ("index.docker.io", "registry-1.docker.io")
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[0-9a-fA-F]{32,}")
_DOMAIN = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?"
)


@dataclass(frozen=True)
class ImageRef:
    registry: str  # "docker.io", "ghcr.io", "localhost:5000"
    repository: str  # "library/alpine"
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        """What the manifest request names: the digest when there is one, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def manifest_path(self) -> str:
        """`/v2/<repo>/manifests/<ref>?ns=<registry>`, as containerd asks a mirror."""
        return f"/v2/{self.repository}/manifests/{self.reference}?ns={quote(self.registry, safe=':[]')}"

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def parse_image_ref(raw: str) -> ImageRef:
    """Normalise `raw`; BadInput (exit 2) naming what is wrong."""
    text = raw.strip()
    if not text or any(c.isspace() for c in text):
        raise BadInput(f"invalid image reference {raw!r}: empty or contains whitespace")
    name, _, digest = text.partition("@")
    if digest and not _DIGEST.fullmatch(digest):
        raise BadInput(f"invalid image reference {raw!r}: bad digest {digest!r}")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = None
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise BadInput(f"invalid image reference {raw!r}: bad tag {tag!r}")
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        registry, path = first, rest
        if not _DOMAIN.fullmatch(registry):
            raise BadInput(f"invalid image reference {raw!r}: bad registry {registry!r}")
        registry = registry.lower()
    else:
        registry, path = DOCKER_HUB, name
    if registry in _LEGACY_HUB:
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not path or not all(_COMPONENT.fullmatch(c) for c in path.split("/")):
        raise BadInput(
            f"invalid image reference {raw!r}: repository {path!r} must be lowercase "
            "letters, digits and separators"
        )
    if tag is None and not digest:
        tag = "latest"
    return ImageRef(registry, path, tag, digest or None)
