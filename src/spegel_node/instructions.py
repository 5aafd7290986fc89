"""What to do instead on nodes whose hosts dir the distro owns (Talos, Bottlerocket)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from spegel_node.flavors import flavor as flavor_record
from spegel_node.registry import Registry

TALOS_DISCARD_PART = """\
    - path: /etc/cri/conf.d/20-customization.part
      op: create
      content: |
        [plugins."io.containerd.cri.v1.images"]
          discard_unpacked_layers = false
"""


def _names(registries: Sequence[Registry]) -> list[str]:
    return [r.host for r in registries] or ["*"]


def talos_patch(registries: Sequence[Registry], mirror_urls: Sequence[str]) -> str:
    """A Talos machine-config patch (`talosctl patch mc --patch @spegel.yaml`)."""
    lines = ["machine:", "  registries:", "    mirrors:"]
    for name in _names(registries):
        lines += [f"      {json.dumps(name)}:", "        endpoints:"]
        lines += [f"          - {url}" for url in mirror_urls]
    lines += ["  files:", TALOS_DISCARD_PART.rstrip("\n")]
    return "\n".join(lines) + "\n"


def bottlerocket_settings(registries: Sequence[Registry], mirror_urls: Sequence[str]) -> str:
    """An `apiclient set` command for Bottlerocket's container-registry mirrors."""
    mirrors = [{"registry": name, "endpoint": list(mirror_urls)} for name in _names(registries)]
    payload = json.dumps({"settings": {"container-registry": {"mirrors": mirrors}}})
    return f"apiclient set --json '{payload}'\n"


def distro_owned_message(
    flavor: str | None, registries: Sequence[Registry], mirror_urls: Sequence[str]
) -> str:
    """What to do instead of writing the hosts dir, on a flavor whose distro owns it."""
    if flavor_record(flavor).owner == "machine-config":
        return (
            "Talos regenerates /etc/cri/conf.d/hosts from its machine config and /etc is read-only; "
            "put the mirrors in the machine config instead "
            "(save as spegel.yaml, then: talosctl patch mc --nodes NODE --patch @spegel.yaml):\n"
            + talos_patch(registries, mirror_urls)
        )
    return (
        "Bottlerocket renders containerd's registry config from its API settings; set the mirrors "
        "there instead (and deploy Spegel with containerdMirrorAdd: false):\n"
        + bottlerocket_settings(registries, mirror_urls)
    )
