"""Three nodes sharing images through real Spegel, each in a network namespace of its own.

Layout (all names carry the test process's pid, so parallel runs never collide):

- a namespace `spn-<pid>-br` holding a bridge `spnbr` with address 10.213.0.1/24; the upstream
  registry (`docker-registry`, access log on) listens there on :5000;
- per node `a`, `b`, `c`: a namespace `spn-<pid>-<x>` with a veth pair to the bridge and the
  address 10.213.0.1<n>/24; inside it containerd 2.3.7 (own root/state/socket, CRI on,
  `config_path` = /etc/containerd/certs.d, where the node's etc/containerd is bind-mounted in a
  private mount namespace, so `doctor --root` reads the same path; `discard_unpacked_layers =
  false`), `spegel registry`
  (registry :29999, router :5001, metrics :9090, http bootstrap on :5002 with node A as the
  bootstrap peer, a data dir for a stable peer id), and spegel-node `apply --root` on a fake
  node tree whose hosts dir is the one containerd reads.

Everything is torn down in `close()` (processes by PID, then the namespaces, then the temp dir).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from support.peers import peer_bin
from support.sandbox import (
    OCI_CONFIG,
    OCI_LAYER,
    OCI_MANIFEST,
    RegistryProc,
    Started,
    _Daemon,
    _descriptor,
    _put_blob,
    _unmount_under,
    skopeo_push,
    wait_until,
)

SUBNET = "10.213.0"
BRIDGE_IP = f"{SUBNET}.1"
UPSTREAM_PORT = 5000
SPEGEL_PORT = 29999
ROUTER_PORT = 5001
BOOTSTRAP_PORT = 5002
METRICS_PORT = 9090
CONTAINERD_VERSION = "2.3.7"
NODE_NAMES = ("a", "b", "c")
START_TIMEOUT_S = 30.0
PULL_TIMEOUT_S = 120.0
REPO = Path(__file__).resolve().parents[2]


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def netns_exec(ns: str, argv: Sequence[str]) -> list[str]:
    """`argv` run inside network namespace `ns`."""
    return ["ip", "netns", "exec", ns, *argv]


def http_get(ns: str, url: str, timeout: float = 3.0) -> tuple[int, str]:
    """GET `url` from inside `ns` (curl-free: a tiny python one-liner); (status, body)."""
    code = (
        "import sys,urllib.request,urllib.error\n"
        "try:\n"
        f"  r=urllib.request.urlopen(sys.argv[1],timeout={timeout})\n"
        "  print(r.status);sys.stdout.write(r.read().decode(errors='replace'))\n"
        "except urllib.error.HTTPError as e:\n"
        "  print(e.code)\n"
        "except OSError:\n"
        "  print(0)\n"
    )
    result = subprocess.run(
        netns_exec(ns, [sys.executable, "-c", code, url]),
        capture_output=True,
        text=True,
        timeout=timeout + 10,
        check=False,
    )
    status, _, body = result.stdout.partition("\n")
    return int(status or 0), body


class NsRegistry(RegistryProc):
    """docker-registry listening on the bridge address inside the bridge namespace."""

    def __init__(self, ns: str, directory: Path) -> None:
        super().__init__("upstream", directory, UPSTREAM_PORT)
        self.ns = ns

    @property
    def host(self) -> str:
        return f"{BRIDGE_IP}:{self.port}"

    def start(self) -> None:
        self.storage.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._config())
        cmd = netns_exec(self.ns, ["docker-registry", "serve", str(self.config_path)])
        self._launch(cmd, self.access_log, self.log_path, f"upstream on {self.host}")

    def _ready(self) -> bool:
        self._check_alive(self.log_path)
        return http_get(self.ns, f"{self.url}/v2/", 0.5)[0] == 200


class NodeContainerd(_Daemon):
    """containerd 2.x inside a node's namespace; config version 3."""

    def __init__(self, node: Node) -> None:
        super().__init__(f"containerd-{node.name}")
        self.node = node
        self.log_path = node.dir / "containerd.log"

    def start(self) -> None:
        node = self.node
        for path in (node.containerd_root, node.containerd_state, node.socket.parent):
            path.mkdir(parents=True, exist_ok=True)
        node.containerd_config.write_text(
            "version = 3\n"
            f'root = "{node.containerd_root}"\n'
            f'state = "{node.containerd_state}"\n\n'
            "[grpc]\n"
            f'  address = "{node.socket}"\n\n'
            "[plugins.'io.containerd.cri.v1.images']\n"
            "  discard_unpacked_layers = false\n"
            "  [plugins.'io.containerd.cri.v1.images'.registry]\n"
            '    config_path = "/etc/containerd/certs.d"\n'
            "[plugins.'io.containerd.cri.v1.runtime']\n"
            "  disable_apparmor = true\n"
        )
        binary = peer_bin("containerd", version=CONTAINERD_VERSION)
        env_path = f"{binary.parent}:{os.environ.get('PATH', '')}"
        # containerd sees the node's etc/containerd at /etc/containerd (a private mount
        # namespace), so its config_path is the node path `doctor --root` reads too.
        etc = node.containerd_config.parent
        script = (
            f'mount --bind "{etc}" /etc/containerd && exec env PATH="{env_path}" '
            f'"{binary}" --config /etc/containerd/config.toml'
        )
        cmd = netns_exec(node.ns, ["unshare", "-m", "--propagation", "private", "sh", "-c", script])
        self._launch(cmd, self.log_path, self.log_path, f"containerd on {node.socket}")

    def _ready(self) -> bool:
        self._check_alive(self.log_path)
        return self.node.crictl("version", timeout=5).returncode == 0


class SpegelProc(_Daemon):
    """`spegel registry` inside a node's namespace.

    `ports` = (registry, router, http bootstrap, metrics); a second instance on a node needs its
    own. `basic_auth` = (username, password): Spegel reads them from the fixed path
    /etc/secrets/basic-auth, so it then runs in a private mount namespace with an overlay on /etc
    whose upper dir holds only those two files (the host's /etc is never written)."""

    def __init__(
        self,
        node: Node,
        bootstrap_ip: str,
        *,
        ports: tuple[int, int, int, int] = (SPEGEL_PORT, ROUTER_PORT, BOOTSTRAP_PORT, METRICS_PORT),
        name: str = "",
        basic_auth: tuple[str, str] | None = None,
    ) -> None:
        super().__init__(f"spegel-{node.name}{'-' + name if name else ''}")
        self.node = node
        self.bootstrap_ip = bootstrap_ip
        self.ports = ports
        self.basic_auth = basic_auth
        suffix = f"-{name}" if name else ""
        self.data_dir = node.dir / f"spegel-data{suffix}"
        self.log_path = node.dir / f"spegel{suffix}.log"

    @property
    def url(self) -> str:
        return f"http://{self.node.ip}:{self.ports[0]}"

    def argv(self) -> list[str]:
        node = self.node
        registry, router, bootstrap, metrics = self.ports
        peer_port = bootstrap if self.bootstrap_ip == node.ip else BOOTSTRAP_PORT
        return [
            str(peer_bin("spegel")),
            "registry",
            "--bootstrap-kind=http",
            f"--http-bootstrap-addr=:{bootstrap}",
            f"--http-bootstrap-peer=http://{self.bootstrap_ip}:{peer_port}",
            f"--data-dir={self.data_dir}",
            f"--containerd-sock={node.socket}",
            "--containerd-namespace=k8s.io",
            f"--containerd-content-path={node.containerd_root}/io.containerd.content.v1.content",
            f"--registry-addr=:{registry}",
            f"--router-addr=:{router}",
            f"--metrics-addr=:{metrics}",
            "--mirror-resolve-timeout=1s",
        ]

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = self.argv()
        if self.basic_auth is not None:
            overlay = self.data_dir.parent / f"{self.data_dir.name}-etc"
            secrets = overlay / "upper/secrets/basic-auth"
            secrets.mkdir(parents=True, exist_ok=True)
            (overlay / "work").mkdir(exist_ok=True)
            (secrets / "username").write_text(self.basic_auth[0])
            (secrets / "password").write_text(self.basic_auth[1])
            opts = f"lowerdir=/etc,upperdir={overlay / 'upper'},workdir={overlay / 'work'}"
            script = f'mount -t overlay overlay -o "{opts}" /etc && exec "$@"'
            argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *argv]
        self._launch(netns_exec(self.node.ns, argv), self.log_path, self.log_path, f"{self.name}")

    def _ready(self) -> bool:
        self._check_alive(self.log_path)
        return http_get(self.node.ns, f"{self.url}/v2/", 0.5)[0] in (200, 401)

    def kill(self) -> None:
        """SIGKILL the whole session (ip netns exec and spegel)."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, 9)
        self.stop()


class Node:
    """One node: a namespace, containerd, Spegel and a fake node tree for spegel-node."""

    def __init__(self, cluster: P2PCluster, name: str, index: int) -> None:
        self.cluster = cluster
        self.name = name
        self.ns = f"spn-{cluster.pid}-{name}"
        self.ip = f"{SUBNET}.{11 + index}"
        self.veth = f"spn{cluster.pid % 100000}{name}"
        self.dir = cluster.root / name
        self.node_root = self.dir / "root"
        self.hosts_dir = self.node_root / "etc/containerd/certs.d"
        self.socket = self.node_root / "run/containerd/containerd.sock"
        self.containerd_config = self.node_root / "etc/containerd/config.toml"
        self.containerd_root = self.node_root / "var/lib/containerd"
        self.containerd_state = self.node_root / "run/containerd/state"
        self.config = self.dir / "spegel-node.toml"
        self.containerd = NodeContainerd(self)
        self.spegel = SpegelProc(self, cluster.bootstrap_ip)

    @property
    def mirror(self) -> str:
        return f"http://{self.ip}:{SPEGEL_PORT}"

    def setup_net(self) -> None:
        br = self.cluster.bridge_ns
        _ip("netns", "add", self.ns)
        _ip("link", "add", self.veth, "type", "veth", "peer", "name", f"{self.veth}p")
        _ip("link", "set", f"{self.veth}p", "netns", br)
        _ip("link", "set", self.veth, "netns", self.ns)
        _ip("-n", br, "link", "set", f"{self.veth}p", "master", "spnbr", "up")
        _ip("-n", self.ns, "link", "set", "lo", "up")
        _ip("-n", self.ns, "link", "set", self.veth, "name", "eth0")
        _ip("-n", self.ns, "addr", "add", f"{self.ip}/24", "dev", "eth0")
        _ip("-n", self.ns, "link", "set", "eth0", "up")

    def write_config(self, *, gate_failures: int = 3) -> None:
        self.hosts_dir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            f'registries = ["http://{self.cluster.upstream.host}"]\n'
            f"host_port = {SPEGEL_PORT}\n"
            f'node_ip = "{self.ip}"\n'
            f"gate_failures = {gate_failures}\n"
            'hosts_dir = "/etc/containerd/certs.d"\n'
            'containerd_socket = "/run/containerd/containerd.sock"\n'
            'containerd_config = "/etc/containerd/config.toml"\n'
        )

    def spegel_node(
        self, *args: str, timeout: float = 60, config: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`spegel-node CMD --root NODE_ROOT --config FILE ARGS...` inside the node's namespace
        (`config`: another config file than the node's)."""
        env = f"PYTHONPATH={REPO / 'src'}"
        argv = [
            "env",
            env,
            sys.executable,
            "-m",
            "spegel_node",
            *args[:1],
            "--root",
            str(self.node_root),
            "--config",
            str(config or self.config),
            *args[1:],
        ]
        return subprocess.run(
            netns_exec(self.ns, argv), capture_output=True, text=True, timeout=timeout, check=False
        )

    def apply(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.spegel_node("apply", *args)

    def crictl(
        self, *args: str, timeout: float = PULL_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        argv = [
            str(peer_bin("crictl")),
            "--runtime-endpoint",
            f"unix://{self.socket}",
            "--image-endpoint",
            f"unix://{self.socket}",
            "--timeout",
            f"{int(timeout)}s",
            *args,
        ]
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout + 10, check=False
        )

    def pull(self, ref: str) -> tuple[subprocess.CompletedProcess[str], float]:
        """`crictl pull REF`; (result, seconds)."""
        began = time.monotonic()
        result = self.crictl("pull", ref)
        return result, time.monotonic() - began

    def forget(self, ref: str) -> None:
        self.crictl("rmi", ref, timeout=30)

    def metrics(self) -> str:
        return http_get(self.ns, f"http://{self.ip}:{METRICS_PORT}/metrics")[1]

    def mirror_served(self) -> float:
        """Sum of `spegel_mirror_requests_total` samples (all labels) on this node."""
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith("spegel_mirror_requests_total"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def hosts_toml(self) -> str:
        path = self.hosts_dir / self.cluster.upstream.host / "hosts.toml"
        return path.read_text() if path.exists() else ""


@contextlib.contextmanager
def extra_spegel(
    node: Node,
    ports: tuple[int, int, int, int],
    name: str,
    basic_auth: tuple[str, str] | None = None,
) -> Iterator[SpegelProc]:
    """A second Spegel on `node`, bootstrapping from itself only: a lone instance (no peer)."""
    spegel = SpegelProc(node, node.ip, ports=ports, name=name, basic_auth=basic_auth)
    try:
        spegel.start()
        yield spegel
    finally:
        spegel.stop()


HUNG_LISTENER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(64)
print("ready", flush=True)
held = []
while True:
    conn, _ = s.accept()
    held.append(conn)
    print("accepted", flush=True)
"""


class HungListener(_Daemon):
    """In place of Spegel on a node's hostPort: accepts every connection and never answers
    (run inside the node's namespace; each accepted connection is one line in its log)."""

    def __init__(self, node: Node, port: int = SPEGEL_PORT) -> None:
        super().__init__(f"hung-{node.name}")
        self.node = node
        self.port = port
        self.log_path = node.dir / f"hung-{port}.log"

    def start(self) -> None:
        self.log_path.write_text("")
        argv = [sys.executable, "-u", "-c", HUNG_LISTENER, self.node.ip, str(self.port)]
        self._launch(netns_exec(self.node.ns, argv), self.log_path, self.log_path, self.name)

    def _ready(self) -> bool:
        self._check_alive(self.log_path)
        return "ready" in self.log_path.read_text()

    @property
    def accepted(self) -> int:
        return self.log_path.read_text().count("accepted")

    def __enter__(self) -> HungListener:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_LOG_LINE = re.compile(
    r'^(?P<remote>\S+) \S+ \S+ \[[^\]]+\] "(?P<method>\S+) (?P<target>\S+) [^"]*" '
    r"(?P<status>\d{3}) (?P<size>\d+|-) "
)


@dataclass(frozen=True)
class BlobFetch:
    """One GET of a blob in upstream's access log: who asked, and the bytes sent."""

    remote: str
    path: str
    size: int


def upstream_blob_fetches(cluster: P2PCluster, since: int | None = None) -> list[BlobFetch]:
    """Blob GETs upstream logged after byte offset `since` (default: its last `mark()`)."""
    log = cluster.upstream.access_log
    if not log.exists():
        return []
    offset = cluster.upstream._mark if since is None else since
    with log.open("rb") as handle:
        handle.seek(offset)
        text = handle.read().decode(errors="replace")
    fetches = []
    for line in text.splitlines():
        m = _LOG_LINE.match(line.strip("\x00 "))
        if m and m["method"] == "GET" and "/blobs/" in m["target"]:
            size = 0 if m["size"] == "-" else int(m["size"])
            fetches.append(BlobFetch(m["remote"], m["target"], size))
    return fetches


def build_layered_layout(layout: Path, tag: str, layers: int = 3, size: int = 1 << 20) -> int:
    """An OCI layout with `layers` layers of `size` random bytes each; returns the layer bytes."""
    digests, descs, total = [], [], 0
    for index in range(layers):
        buf = io.BytesIO()
        content = os.urandom(size)
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo(f"layer{index}.bin")
            info.size, info.mode, info.mtime = len(content), 0o644, 0
            tar.addfile(info, io.BytesIO(content))
        data = buf.getvalue()
        digest = _put_blob(layout, data)
        digests.append(digest)
        descs.append(_descriptor(OCI_LAYER, digest, data))
        total += len(data)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": digests},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": _descriptor(OCI_CONFIG, _put_blob(layout, config), config),
            "layers": descs,
        }
    ).encode()
    entry = _descriptor(OCI_MANIFEST, _put_blob(layout, manifest), manifest)
    entry["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    return total


class P2PCluster(Started):
    """Bridge namespace + upstream + three nodes. A context manager; `close()` is idempotent."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.root = Path(tempfile.mkdtemp(prefix=f"spn-p2p-{self.pid}-", dir="/tmp"))
        self.bridge_ns = f"spn-{self.pid}-br"
        self.bootstrap_ip = f"{SUBNET}.11"
        self.upstream = NsRegistry(self.bridge_ns, self.root / "upstream")
        self.nodes = [Node(self, name, i) for i, name in enumerate(NODE_NAMES)]
        self._namespaces: list[str] = []

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def start(self) -> None:
        _ip("netns", "add", self.bridge_ns)
        self._namespaces.append(self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "set", "lo", "up")
        _ip("-n", self.bridge_ns, "link", "add", "spnbr", "type", "bridge")
        _ip("-n", self.bridge_ns, "addr", "add", f"{BRIDGE_IP}/24", "dev", "spnbr")
        _ip("-n", self.bridge_ns, "link", "set", "spnbr", "up")
        for node in self.nodes:
            self._namespaces.append(node.ns)
            node.setup_net()
        self.upstream.start()
        for node in self.nodes:
            node.write_config()
            node.containerd.start()
        for node in self.nodes:  # A first: it is the bootstrap peer
            node.spegel.start()

    def push_image(
        self, repo: str = "p2p/layers", tag: str = "v1", layers: int = 3, size: int = 1 << 20
    ) -> str:
        """Build a unique multi-layer image (`layers` of `size` random bytes) and push it to
        upstream (skopeo, from the bridge ns)."""
        layout = self.root / "layouts" / uuid.uuid4().hex[:8]
        build_layered_layout(layout, tag, layers, size)
        ref = f"{self.upstream.host}/{repo}:{tag}"
        return skopeo_push(
            layout, tag, ref, timeout=120, wrap=lambda cmd: netns_exec(self.bridge_ns, cmd)
        )

    def upstream_logged(self) -> None:
        """Wait until upstream's access log holds every request answered so far: one more
        request (a unique /v2/ query from the bridge namespace) and wait for its line."""
        token = uuid.uuid4().hex
        http_get(self.bridge_ns, f"{self.upstream.url}/v2/?logged={token}")
        log = self.upstream.access_log
        wait_until(lambda: token in log.read_text(errors="replace"), "upstream's access log", 10)

    def wait_resolvable(self, node: Node, ref: str, timeout: float = 20.0) -> None:
        """Wait until Spegel on `node` can resolve `ref`'s manifest through a peer."""
        host, _, rest = ref.partition("/")
        repo, _, tag = rest.rpartition(":")
        url = f"{node.mirror}/v2/{repo}/manifests/{tag}?ns={host}"
        wait_until(lambda: http_get(node.ns, url)[0] == 200, f"{ref} via {node.name}", timeout)

    def close(self) -> None:
        for node in self.nodes:
            node.spegel.stop()
        for node in self.nodes:
            node.containerd.stop()
        self.upstream.stop()
        for ns in reversed(self._namespaces):
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", ns)
        self._namespaces = []
        if self.root.exists():
            _unmount_under(self.root)
            shutil.rmtree(self.root, ignore_errors=True)


def probe(ns: str, url: str) -> int:
    """HTTP status of GET `url` from inside `ns` (0: no answer)."""
    return http_get(ns, url)[0]


__all__ = [
    "BlobFetch",
    "HungListener",
    "Node",
    "P2PCluster",
    "SpegelProc",
    "build_layered_layout",
    "extra_spegel",
    "http_get",
    "probe",
    "upstream_blob_fetches",
]


@contextlib.contextmanager
def applied_cluster() -> Iterator[P2PCluster]:
    """A P2PCluster where `spegel-node apply` has run once on every node."""
    with P2PCluster() as cluster:
        for node in cluster.nodes:
            result = node.apply()
            assert result.returncode == 0, result.stderr
        yield cluster
