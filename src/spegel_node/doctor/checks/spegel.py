"""spegel.*: the local Spegel answers on the mirror URL; is ready; what its metrics say; whether
a peer can serve a given image. Only the node IP's mirror port, its port 9090 and (when the
mirror is dead) the chart's default hostPort 30020 are ever contacted; redirects are not followed.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import urlsplit

from spegel_node.doctor.facts import Facts
from spegel_node.doctor.imageref import ImageRef
from spegel_node.doctor.model import Check, CheckResult
from spegel_node.doctor.promtext import parse_samples
from spegel_node.doctor.remedy import apply_command, cli_command, config_file

CHART_HOST_PORT = 30020
METRICS_PORT = 9090
MANIFEST_ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)
# The namespace of the shipped manifests (docs/flux: kube-system).
SPEGEL_NAMESPACE = "kube-system"
POD_HINT = (
    f"kubectl -n {SPEGEL_NAMESPACE} get pods -l app.kubernetes.io/name=spegel -o wide "
    "--field-selector spec.nodeName=$(hostname)"
)
# Shows whether the running chart still has a hostPort (0.7.x) or only the NodePort (0.8+).
PORTS_HINT = (
    f"kubectl -n {SPEGEL_NAMESPACE} get daemonset spegel -o "
    "jsonpath='{.spec.template.spec.containers[0].ports}'"
)


def _host_url(facts: Facts, port: int) -> str:
    ip = facts.node_ip
    return f"http://[{ip}]:{port}" if ":" in ip else f"http://{ip}:{port}"


@dataclass(frozen=True)
class SpegelV2(Check):
    area: ClassVar[str] = "spegel"

    @property
    def id(self) -> str:
        return "spegel.v2"

    def run(self, facts: Facts) -> CheckResult:
        url = f"{facts.mirror_url}/v2/"
        port = facts.settings.host_port
        r = facts.mirror_v2
        if r.status == 200:
            return self.passed(f"{url} answered HTTP 200 in {r.elapsed_s * 1000:.0f} ms")
        if r.status is not None and 300 <= r.status < 400:
            return self.fail(
                f"{url} answered a redirect (HTTP {r.status}), not followed: this is not Spegel",
                f"find what listens on port {port}: ss -ltnp 'sport = :{port}'",
            )
        if r.status == 401:
            # Spegel with basic auth (/etc/secrets/basic-auth) answers every /v2/ request 401
            # without credentials: it is up. spegel-node writes no Authorization header, so
            # containerd's requests to it are refused too and its pulls fall back upstream; the
            # health gate (200 only) withdraws such a mirror.
            return self.warn(
                f"{url} answered HTTP 401 in {r.elapsed_s * 1000:.0f} ms: Spegel answers, with "
                "basic auth on; the hosts.toml spegel-node writes carries no Authorization "
                "header, so containerd cannot pull through it",
                "turn off Spegel's basic auth (the chart's basicAuthSecretName) on this cluster, "
                "or let Spegel's own init container write hosts.toml (containerdMirrorAdd: true)",
            )
        if r.status is not None:
            return self.fail(
                f"{url} answered HTTP {r.status}: something other than Spegel holds port {port}",
                f"find what listens there (ss -ltnp 'sport = :{port}'); Spegel's hostPort cannot "
                "bind while another process holds the port (Spegel #551)",
            )
        if r.timed_out:
            summary = (
                f"{url} accepted the connection but sent no answer within "
                f"{facts.timeouts.mirror_s:g}s: Spegel is hung, and every pull waits on it "
                "(Spegel #739)"
            )
            fix = (
                f"restart the Spegel pod on this node ({POD_HINT}; "
                f"kubectl -n {SPEGEL_NAMESPACE} delete pod POD)"
            )
        else:
            summary = f"{url}: {r.error}: Spegel does not serve on this node's mirror port"
            fix = f"check the Spegel pod on this node: {POD_HINT}"
        fix += (
            f"\nUntil it answers, the health gate withdraws the mirror after "
            f"{facts.settings.gate_failures} failed probes (`{apply_command(facts)}`, run by the "
            "repair timer)."
        )
        if port != CHART_HOST_PORT:
            hint = facts.http(
                f"{_host_url(facts, CHART_HOST_PORT)}/v2/", timeout=facts.timeouts.hint_s
            )
            if hint.status == 200:
                fix = port_30020_fix(port, facts)
        else:
            fix += "\n" + nodeport_note()
        return self.fail(summary, fix)


def port_30020_fix(port: int, facts: Facts) -> str:
    """Spegel answers on 30020, not on `port`: a 0.7.x chart's default hostPort, or the next
    chart's NodePort (it has no hostPort); the fix differs."""
    return (
        f"Spegel answers on port {CHART_HOST_PORT} instead of {port}. Which one is it ({PORTS_HINT}):\n"
        f"- a hostPort {CHART_HOST_PORT} in the ports (Spegel chart 0.7.x, where "
        f"{CHART_HOST_PORT} is the default hostPort): set service.registry.hostPort: {port} in "
        f"the chart values (`{cli_command(facts, 'helm-values')}` prints them), or host_port = "
        f"{CHART_HOST_PORT} in {config_file(facts)} and run `{apply_command(facts)}`;\n"
        f"- no hostPort (Spegel's next chart, 0.8+, serves the mirror only as NodePort "
        f"{CHART_HOST_PORT} through kube-proxy): set host_port = {CHART_HOST_PORT} in "
        f"{config_file(facts)} and run `{apply_command(facts)}` (the NodePort answers while "
        "any Spegel pod is up, so the gate no longer sees this node's pod alone)"
    )


def nodeport_note() -> str:
    """host_port is 30020 and does not answer: a hostPort (0.7.x) or a NodePort (0.8+)."""
    return (
        f"Port {CHART_HOST_PORT} is the Spegel chart 0.7.x's default hostPort, or from the next "
        f"chart (0.8+) its NodePort ({PORTS_HINT} shows which): a hostPort needs the CNI's "
        "portmap plugin (Cilium: cni.chainingMode=portmap or kube-proxy replacement with "
        "hostPort support); a NodePort needs kube-proxy (or Cilium's kube-proxy replacement) on "
        "this node"
    )


@dataclass(frozen=True)
class SpegelReadyz(Check):
    area: ClassVar[str] = "spegel"

    @property
    def id(self) -> str:
        return "spegel.readyz"

    def run(self, facts: Facts) -> CheckResult:
        url = f"{facts.mirror_url}/readyz"
        r = facts.http(url, timeout=facts.timeouts.optional_s)  # in parallel with spegel.v2
        if not facts.mirror_v2.answered:
            return self.skip("Spegel does not answer (see spegel.v2)")
        if r.status == 200:
            return self.passed(f"{url} answered HTTP 200: ready")
        if r.status == 404:
            return self.warn(
                f"{url} answered HTTP 404: no readiness endpoint (Spegel before v0.4, or not Spegel)",
                "upgrade Spegel (the chart's image tag); /readyz exists from v0.4.0",
            )
        if r.status is not None:
            return self.warn(
                f"{url} answered HTTP {r.status}: Spegel is not ready (its p2p router has not "
                "found peers yet)",
                f"read the Spegel pod's log on this node ({POD_HINT}; "
                f"kubectl -n {SPEGEL_NAMESPACE} logs POD); "
                "it must reach the other nodes' Spegel on its router port",
            )
        return self.warn(f"{url}: {r.error}", f"read the Spegel pod's log ({POD_HINT})")


@dataclass(frozen=True)
class SpegelMetrics(Check):
    area: ClassVar[str] = "spegel"

    @property
    def id(self) -> str:
        return "spegel.metrics"

    def run(self, facts: Facts) -> CheckResult:
        url = f"{_host_url(facts, METRICS_PORT)}/metrics"
        r = facts.http(url, timeout=facts.timeouts.optional_s)
        if r.status is None:
            return self.skip(
                f"{url}: {r.error} (the chart exposes metrics on the pod IP only, unless you "
                "publish port 9090)"
            )
        if r.status != 200:
            return self.skip(f"{url} answered HTTP {r.status}")
        hits: dict[str, float] = defaultdict(float)
        misses: dict[str, float] = defaultdict(float)
        last = None
        seen = False
        for s in parse_samples(r.body.decode("utf-8", "replace")):
            if s.name == "spegel_mirror_requests_total":
                seen = True
                registry = s.labels.get("registry", "?")
                cache = s.labels.get("cache")
                if cache == "hit":
                    hits[registry] += s.value
                elif cache == "miss":
                    misses[registry] += s.value
            elif s.name == "spegel_mirror_last_success_timestamp_seconds":
                seen = True
                last = s.value if last is None else max(last, s.value)
        if not seen:
            return self.skip(f"{url} answers but serves no Spegel mirror metrics")
        hit, miss = sum(hits.values()), sum(misses.values())
        if last:
            ago = max(0.0, facts.now() - last)
            last_text = f"last served from a peer {_ago(ago)} ago"
        else:
            last_text = "never served from a peer"
        details = [
            f"{reg}: {hits[reg]:.0f} hits, {misses[reg]:.0f} misses"
            for reg in sorted(set(hits) | set(misses))
        ]
        if hit + miss == 0:
            return self.warn(
                f"Spegel has had no mirror request yet; {last_text}",
                "if this node pulled images since Spegel started, containerd is not sending them "
                "to Spegel: see the containerd.* and hosts.* checks",
                details,
            )
        ratio = hit / (hit + miss)
        summary = f"hit ratio {ratio:.0%} ({hit:.0f} hits, {miss:.0f} misses); {last_text}"
        if hit == 0:
            return self.warn(
                summary,
                "no request found the image on a peer yet; pull an image on another node and "
                f"check again ({cli_command(facts, 'doctor --image REF')})",
                details,
            )
        return self.passed(summary, details)


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


@dataclass(frozen=True)
class SpegelImage(Check):
    area: ClassVar[str] = "spegel"
    image: ImageRef

    @property
    def id(self) -> str:
        return "spegel.image"

    def run(self, facts: Facts) -> CheckResult:
        ref = self.image
        url = facts.mirror_url + ref.manifest_path
        shown = urlsplit(url).path + "?" + urlsplit(url).query
        r = facts.http(
            url, method="HEAD", timeout=facts.timeouts.mirror_s, headers={"Accept": MANIFEST_ACCEPT}
        )
        details = [f"HEAD {url} -> {r.describe()}"]
        mirrored = facts.settings.default_mode or ref.registry in {
            reg.host for reg in facts.settings.registries
        }
        if not mirrored:
            details.append(
                f"{ref.registry} is not in `registries`: containerd does not send its pulls to "
                f'Spegel (add "https://{ref.registry}")'
            )
        if r.status == 200:
            digest = r.headers.get("docker-content-digest", "")
            at = f" ({digest})" if digest else ""
            return self.passed(f"a peer can serve {ref}{at}", details)
        if r.status == 404:
            fix = (
                f"no node has it in its content store yet: pull it on another node (crictl pull "
                f"{ref}) and ask again; if a node has it, check that node "
                f"({cli_command(facts, 'doctor')} there: discard_unpacked_layers must be false, "
                "and its Spegel must be ready)"
            )
            if not mirrored:
                fix += (
                    f'\nand add "https://{ref.registry}" to registries, then '
                    f"`{apply_command(facts)}`"
                )
            return self.fail(
                f"no peer can serve {ref}: Spegel answered 404 for {shown}", fix, details
            )
        if r.status is not None:
            return self.fail(
                f"Spegel answered HTTP {r.status} for {shown}",
                "read the Spegel pod's log on this node (" + POD_HINT + ")",
                details,
            )
        return self.fail(
            f"cannot ask Spegel about {ref}: {r.error}",
            "Spegel must answer first (see spegel.v2)",
            details,
        )
