"""The Spegel Helm chart values that match this node (chart v0.7.x keys)."""

from __future__ import annotations

import json
from typing import Any

from spegel_node.flavors import FALLBACK_HOSTS_DIR
from spegel_node.layout import Layout
from spegel_node.settings import NODE_IP_PLACEHOLDER, Settings


def fallback_layout(settings: Settings) -> Layout:
    """Plain containerd's default paths (and the overrides), for a node with no layout found."""
    import posixpath

    from spegel_node.containerd_config import CONTENT_PLUGIN
    from spegel_node.flavors import flavor as flavor_record

    plain = flavor_record("containerd")
    hosts_dir = settings.hosts_dir or FALLBACK_HOSTS_DIR
    return Layout(
        flavor="containerd",
        containerd_socket=settings.containerd_socket or plain.socket,
        containerd_config=settings.containerd_config or plain.config,
        hosts_dir=hosts_dir,
        hosts_dirs=(hosts_dir,),
        config_path_set=False,
        content_dir=posixpath.join(plain.root, CONTENT_PLUGIN),
        distro_owned=False,
        evidence=("no containerd layout found: containerd's default paths",),
        config=None,
    )


def helm_values(layout: Layout, settings: Settings) -> dict[str, Any]:
    spegel: dict[str, Any] = {
        "containerdSock": layout.containerd_socket,
        "containerdRegistryConfigPath": layout.hosts_dir or FALLBACK_HOSTS_DIR,
        "containerdContentPath": layout.content_dir,
        # spegel-node owns the hosts dir: Spegel's init container must not wipe it into _backup/
        "containerdMirrorAdd": False,
        "mirroredRegistries": [r.url for r in settings.registries],
        "resolveTags": settings.resolve_tags,
    }
    if settings.extra_mirrors:
        # the chart puts them in the pod's args, where Kubernetes expands $(NODE_IP)
        spegel["additionalMirrorTargets"] = [
            m.replace(NODE_IP_PLACEHOLDER, "$(NODE_IP)") for m in settings.extra_mirrors
        ]
    return {"spegel": spegel, "service": {"registry": {"hostPort": settings.host_port}}}


def to_yaml(data: Any, indent: int = 0) -> str:
    """Block YAML for nested mappings of scalars and lists (scalars JSON-quoted, which YAML reads)."""
    pad = "  " * indent
    lines: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:")
            lines.append(to_yaml(value, indent + 1).rstrip("\n"))
        elif isinstance(value, list):
            if not value:
                lines.append(f"{pad}{key}: []")
            else:
                lines.append(f"{pad}{key}:")
                lines += [f"{pad}  - {json.dumps(item)}" for item in value]
        else:
            lines.append(f"{pad}{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"
