"""A sandbox node on loopback, built from real components.

- a real containerd daemon (own root, state, socket and config in a temp dir, CRI plugin on,
  CRI `config_path` pointing at the sandbox hosts dir, `discard_unpacked_layers = false`);
- two real OCI registries (`docker-registry serve`): "upstream", and "spegel", a pull-through
  cache of upstream standing in for Spegel on its hostPort;
- a tiny OCI image, built here with the standard library and pushed to upstream with skopeo.

Facts observed with containerd 1.6.20, docker-registry 2.8.2 and skopeo 1.9.3:

- containerd's registry requests carry the user agent `containerd/<version>` (for
  `ctr images pull`, the ctr client makes them and parses `--hosts-dir` itself, so a bad
  hosts.toml is reported on ctr's stderr, not in the daemon's log);
- the pull-through cache fetches from upstream as `Go-http-client/1.1`; skopeo pushes as
  `skopeo/<version>`; the readiness probes here say `spegel-sandbox-probe`;
- requests to a mirror carry `?ns=<upstream host:port>` (URL-encoded in the access log);
- the access log (Combined Log Format, on the registry's stdout) keeps the query string;
- a fresh containerd namespace does NOT force a refetch (blobs are shared between namespaces:
  only the manifest is resolved again); `ctr images rm --sync` in every namespace that holds
  the image does, which is what `ContainerdProc.forget` runs;
- a registry started with `proxy.remoteurl` panics (exit 2) if upstream does not answer;
- a mirror whose connects time out costs containerd 1.6 its default 30 s dial timeout per
  request (3 x 30 s for this image), `dial_timeout = "200ms"` notwithstanding;
- a registry's log file cannot be truncated under it (its fd is not O_APPEND): use `mark()`.

Daemons are stopped by PID (SIGTERM, SIGKILL after a bounded wait) and also get SIGTERM if
the process that started them dies (PR_SET_PDEATHSIG).

Importable from scripts: `sys.path.insert(0, str(REPO / "tests"))`, then
`from support.sandbox import Sandbox`.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import json
import re
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

if TYPE_CHECKING:
    from typing import Self  # 3.11+: conftest imports this module on 3.9 too

LOOPBACK = "127.0.0.1"
CONTAINERD_UA_PREFIX = "containerd/"
PROXY_USER_AGENT = "Go-http-client/1.1"
PROBE_USER_AGENT = "spegel-sandbox-probe"
REQUIRED_BINARIES = ("containerd", "ctr", "docker-registry", "skopeo")
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
PULL_TIMEOUT_S = 120.0
_PR_SET_PDEATHSIG = 1


def missing_binaries() -> list[str]:
    """The sandbox's external programs that are not on PATH."""
    return [name for name in REQUIRED_BINARIES if shutil.which(name) is None]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _two_free_ports() -> tuple[int, int]:
    first = free_port()
    second = free_port()
    while second == first:
        second = free_port()
    return first, second


def wait_until(check: Callable[[], bool], what: str, timeout: float = START_TIMEOUT_S) -> None:
    """Poll `check` until it returns True; TimeoutError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(0.02)


# --- access log -------------------------------------------------------------------------------

_COMBINED = re.compile(
    r'^(?P<remote>\S+) \S+ \S+ \[(?P<time>[^\]]+)\] "(?P<method>\S+) (?P<target>\S+) [^"]*" '
    r'(?P<status>\d{3}) \S+ "[^"]*" "(?P<agent>[^"]*)"'
)


@dataclass(frozen=True)
class Request:
    """One request from a registry's access log. `path` keeps the query string."""

    method: str
    path: str
    status: int
    user_agent: str

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.path).query)

    @property
    def ns(self) -> str | None:
        values = self.query.get("ns")
        return values[0] if values else None

    @property
    def from_containerd(self) -> bool:
        return self.user_agent.startswith(CONTAINERD_UA_PREFIX)


def parse_access_log(text: str) -> list[Request]:
    """Requests from Combined Log Format lines; other lines are skipped."""
    requests = []
    for line in text.splitlines():
        match = _COMBINED.search(line.strip("\x00 "))
        if match:
            requests.append(
                Request(
                    method=match["method"],
                    path=match["target"],
                    status=int(match["status"]),
                    user_agent=match["agent"],
                )
            )
    return requests


def containerd_requests(requests: Sequence[Request]) -> list[Request]:
    """The requests whose user agent starts with `containerd/`."""
    return [request for request in requests if request.from_containerd]


# --- processes --------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the test process dies, so nothing is left behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class _Daemon:
    """A child process with its output appended to log files, stopped by PID."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._proc: subprocess.Popen[bytes] | None = None
        self._files: list[IO[bytes]] = []

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _spawn(self, argv: Sequence[str], stdout: Path, stderr: Path) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self._files = [stdout.open("ab"), stderr.open("ab")]
        self._proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=self._files[0],
            stderr=self._files[1],
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    def _ready(self) -> bool:
        raise NotImplementedError

    def _launch(self, argv: Sequence[str], stdout: Path, stderr: Path, what: str) -> None:
        """Spawn, then wait until `_ready()`; a daemon that never gets ready is stopped again."""
        self._spawn(argv, stdout, stderr)
        try:
            wait_until(self._ready, what)
        except BaseException:
            self.stop()
            raise

    def _check_alive(self, log: Path) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited with {self._proc.returncode}:\n{tail}")

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL after STOP_TIMEOUT_S; idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)
        for handle in self._files:
            handle.close()
        self._files = []


def registry_config(storage: Path | str, addr: str, secret: str, proxy: str | None = None) -> str:
    """A docker-registry (distribution 2.8) config: filesystem storage, text access log on
    stdout, deletes allowed; with `proxy`, a pull-through cache of that upstream URL."""
    lines = [
        "version: 0.1",
        "log:",
        "  level: info",
        "  formatter: text",
        "  accesslog:",
        "    disabled: false",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {storage}",
        "  delete:",
        "    enabled: true",
        "http:",
        f"  addr: {addr}",
        f"  secret: {secret}",
    ]
    if proxy:
        lines += ["proxy:", f"  remoteurl: {proxy}"]
    return "\n".join(lines) + "\n"


class RegistryProc(_Daemon):
    """`docker-registry serve` on 127.0.0.1:`port`, filesystem storage under `dir`.

    With `remote_url` it is a pull-through cache of that registry. `stop()` and `start()`
    may be called mid-test: a restart keeps the port, the storage and the logs.
    """

    def __init__(self, name: str, directory: Path, port: int, remote_url: str | None = None):
        super().__init__(name)
        self.dir = directory
        self.port = port
        self.remote_url = remote_url
        self.storage = directory / "storage"
        self.config_path = directory / "config.yml"
        self.access_log = directory / "access.log"
        self.log_path = directory / "registry.log"
        self._mark = 0

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> None:
        self.storage.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._config())
        cmd = ["docker-registry", "serve", str(self.config_path)]
        self._launch(cmd, self.access_log, self.log_path, f"{self.name} registry on {self.host}")

    def _config(self) -> str:
        return registry_config(self.storage, self.host, f"sandbox-{self.name}", self.remote_url)

    def _ready(self) -> bool:
        self._check_alive(self.log_path)
        return probe_v2(self.url)

    def mark(self) -> int:
        """Forget the requests logged so far: `requests()` returns only later ones."""
        self._mark = self._log_size()
        return self._mark

    def _log_size(self) -> int:
        return self.access_log.stat().st_size if self.access_log.exists() else 0

    def requests(self, since: int | None = None) -> list[Request]:
        """Requests logged after byte offset `since` (default: the last `mark()`)."""
        if not self.access_log.exists():
            return []
        with self.access_log.open("rb") as handle:
            handle.seek(self._mark if since is None else since)
            return parse_access_log(handle.read().decode(errors="replace"))

    def containerd_requests(self, since: int | None = None) -> list[Request]:
        """The logged requests made by containerd (user agent `containerd/...`)."""
        return containerd_requests(self.requests(since))

    def wait_for_requests(
        self, check: Callable[[list[Request]], bool], timeout: float = 5.0
    ) -> list[Request]:
        """Poll the log until `check(requests())` holds (a log line may trail the response)."""
        found: list[Request] = []

        def satisfied() -> bool:
            nonlocal found
            found = self.requests()
            return check(found)

        wait_until(satisfied, f"requests logged by {self.name}", timeout)
        return found


def probe_v2(url: str, timeout: float = 0.5) -> bool:
    """True if `url`/v2/ answers 200 or 401."""
    request = urllib.request.Request(f"{url}/v2/", headers={"User-Agent": PROBE_USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status) == 200
    except urllib.error.HTTPError as err:
        return err.code == 401
    except (OSError, ValueError):
        return False


class ContainerdProc(_Daemon):
    """A standalone containerd daemon with everything under `dir`."""

    def __init__(
        self,
        directory: Path,
        hosts_dir: Path,
        namespace: str = "sandbox",
        *,
        binary: Path | None = None,
        ctr_binary: Path | None = None,
    ) -> None:
        """`binary`/`ctr_binary`: another containerd build (a test peer); default Debian's."""
        super().__init__("containerd")
        self.binary = str(binary or "containerd")
        self.ctr_binary = str(ctr_binary or "ctr")
        self.dir = directory
        self.hosts_dir = hosts_dir
        self.namespace = namespace
        self.socket = directory / "containerd.sock"
        self.config_path = directory / "config.toml"
        self.log_path = directory / "containerd.log"
        self._version = ""
        self.config_path_value = str(hosts_dir)  # CRI's config_path; may list several roots
        self.config_extra = ""  # appended to config.toml (version 2) as is
        self.config_text: str | None = None  # a whole config.toml of its own instead

    def start(self) -> None:
        for sub in ("root", "state"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            self._config() if self.config_text is None else self.config_text
        )
        cmd = [self.binary, "--config", str(self.config_path)]
        self._launch(cmd, self.log_path, self.log_path, f"containerd on {self.socket}")

    def _config(self) -> str:
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        return (
            "version = 2\n"
            f'root = "{self.dir / "root"}"\n'
            f'state = "{self.dir / "state"}"\n\n'
            "[grpc]\n"
            f'  address = "{self.socket}"\n\n'
            f"[{cri}]\n"
            "  disable_apparmor = true\n"
            f"  [{cri}.containerd]\n"
            "    discard_unpacked_layers = false\n"
            f"  [{cri}.registry]\n"
            f'    config_path = "{self.config_path_value}"\n'
            f"{self.config_extra}"
        )

    def _ready(self) -> bool:
        self._check_alive(self.log_path)
        return self.ctr("version", timeout=5).returncode == 0

    def ctr(
        self, *args: str, namespace: str | None = None, timeout: float = PULL_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        """Run `ctr -a SOCKET -n NAMESPACE ARGS...` (text output, never raises on failure)."""
        cmd = [self.ctr_binary, "-a", str(self.socket), "-n", namespace or self.namespace, *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)

    @property
    def version(self) -> str:
        """The daemon's version, e.g. `1.6.20~ds1`."""
        if not self._version:
            out = self.ctr("version", timeout=10).stdout
            server = out.split("Server:", 1)[-1]
            match = re.search(r"Version:\s*(\S+)", server)
            self._version = match.group(1) if match else ""
        return self._version

    @property
    def user_agent(self) -> str:
        return f"{CONTAINERD_UA_PREFIX}{self.version}"

    def pull(
        self,
        ref: str,
        hosts_dir: Path | None = None,
        *,
        namespace: str | None = None,
        keep: bool = False,
        timeout: float = PULL_TIMEOUT_S,
    ) -> subprocess.CompletedProcess[str]:
        """`ctr images pull --plain-http --hosts-dir DIR REF`, reading hosts.toml like containerd.

        Unless `keep`, the image and its content are removed afterwards (`forget`), so the
        next pull really fetches again.
        """
        hosts = hosts_dir or self.hosts_dir
        args = ("images", "pull", "--plain-http", "--hosts-dir", str(hosts), ref)
        result = self.ctr(*args, namespace=namespace, timeout=timeout)
        if not keep:
            self.forget(ref, namespace=namespace)
        return result

    def forget(self, ref: str, namespace: str | None = None) -> None:
        """Remove the image and, synchronously, its content and snapshots."""
        self.ctr("images", "rm", "--sync", ref, namespace=namespace, timeout=30)

    def content_digests(self, namespace: str | None = None) -> list[str]:
        """The digests in this namespace's content store."""
        out = self.ctr("content", "ls", "-q", namespace=namespace, timeout=30).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]


# --- the image --------------------------------------------------------------------------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


def _put_blob(layout: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / digest).write_bytes(data)
    return f"sha256:{digest}"


def _layer_tar(name: str, content: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(content), 0o644, 0
        tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def _descriptor(media_type: str, digest: str, data: bytes) -> dict[str, object]:
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def build_oci_layout(layout: Path, tag: str, content: bytes) -> str:
    """Write an OCI layout with one image (one layer holding `hello.txt`); returns its digest."""
    layer = _layer_tar("hello.txt", content)
    layer_digest = _put_blob(layout, layer)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": _descriptor(OCI_CONFIG, _put_blob(layout, config), config),
            "layers": [_descriptor(OCI_LAYER, layer_digest, layer)],
        }
    ).encode()
    manifest_digest = _put_blob(layout, manifest)
    entry = _descriptor(OCI_MANIFEST, manifest_digest, manifest)
    entry["annotations"] = {"org.opencontainers.image.ref.name": tag}
    index = {"schemaVersion": 2, "manifests": [entry]}
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_text(json.dumps(index))
    return manifest_digest


# --- the sandbox ------------------------------------------------------------------------------


def _temp_root() -> Path:
    base = tempfile.gettempdir()
    # containerd's socket (and its .ttrpc twin) must fit in sun_path (108 bytes)
    if len(base) + len("/spegel-sandbox-XXXXXXXX/containerd/containerd.sock.ttrpc") > 100:
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix="spegel-sandbox-", dir=base))


def _unmount_under(root: Path) -> None:
    """Lazily unmount anything containerd may have left mounted under `root`."""
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    targets = [line.split()[1] for line in mounts if len(line.split()) > 1]
    for target in sorted((t for t in targets if t.startswith(f"{root}/")), reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True, check=False)


def skopeo_push(
    layout: Path,
    tag: str,
    ref: str,
    *,
    timeout: float,
    wrap: Callable[[list[str]], list[str]] = lambda cmd: cmd,
) -> str:
    """Push the OCI layout's `tag` to `ref` (a plain-HTTP registry) with skopeo; returns `ref`.
    `wrap` turns the command into the one to run (e.g. inside a network namespace)."""
    cmd = wrap(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            f"oci:{layout}:{tag}",
            f"docker://{ref}",
        ]
    )
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"skopeo push of {ref} failed: {result.stderr.strip()}")
    return ref


class Started:
    """A context manager over `start()` and `close()`; a failed start is closed again."""

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Sandbox(Started):
    """containerd + upstream registry + Spegel stand-in + a pushed image, in one temp dir.

    Use as a context manager; everything is stopped and removed on exit, also on errors.
    """

    def __init__(
        self,
        *,
        namespace: str = "sandbox",
        image_repo: str = "sandbox/hello",
        image_tag: str = "v1",
        containerd_version: str | None = None,
    ) -> None:
        """`containerd_version`: run that pinned test peer (`make peers`), not Debian's 1.6.20."""
        self.root = _temp_root()
        self.hosts_dir = self.root / "certs.d"
        binaries: dict[str, Path] = {}
        if containerd_version is not None:
            from support.peers import peer_bin  # only here: it needs the peer cache

            binaries["binary"] = peer_bin("containerd", version=containerd_version)
            binaries["ctr_binary"] = peer_bin("containerd", "ctr", containerd_version)
        self.containerd = ContainerdProc(
            self.root / "containerd", self.hosts_dir, namespace, **binaries
        )
        up_port, spegel_port = _two_free_ports()
        self.upstream = RegistryProc("upstream", self.root / "upstream", up_port)
        self.spegel = RegistryProc(
            "spegel", self.root / "spegel", spegel_port, remote_url=self.upstream.url
        )
        self.image_repo, self.image_tag = image_repo, image_tag
        self.image_ref = ""
        self.startup_s = 0.0

    def start(self) -> None:
        """Start upstream (first: the proxy needs it), the Spegel stand-in, containerd; push."""
        began = time.monotonic()
        self.hosts_dir.mkdir(parents=True, exist_ok=True)
        _start_on_free_port(self.upstream)
        self.spegel.remote_url = self.upstream.url
        _start_on_free_port(self.spegel)
        self.containerd.start()
        self.image_ref = self.push_image(self.image_repo, self.image_tag)
        self.startup_s = time.monotonic() - began

    def close(self) -> None:
        """Stop every process (by PID) and remove the temp dir; idempotent."""
        for proc in (self.containerd, self.spegel, self.upstream):
            proc.stop()
        if self.root.exists():
            _unmount_under(self.root)
            shutil.rmtree(self.root, ignore_errors=True)

    def push_image(self, repo: str, tag: str = "v1") -> str:
        """Build a tiny unique image and push it to upstream; returns `HOST:PORT/REPO:TAG`."""
        layout = self.root / "layouts" / f"{repo.replace('/', '_')}_{tag}_{uuid.uuid4().hex[:8]}"
        content = f"hello from the spegel sandbox: {repo}:{tag} {uuid.uuid4()}\n".encode()
        build_oci_layout(layout, tag, content)
        return skopeo_push(layout, tag, f"{self.upstream.host}/{repo}:{tag}", timeout=60)

    def registry_dir(self, registry: str | None = None) -> Path:
        """`hosts_dir/<registry>` (default: the upstream `host:port`)."""
        return self.hosts_dir / (registry or self.upstream.host)

    def write_hosts_toml(self, text: str, registry: str | None = None) -> Path:
        """Write `text` as `hosts_dir/<registry>/hosts.toml`; returns the file's path."""
        path = self.registry_dir(registry) / "hosts.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def write_mirror_first(self, registry: str | None = None) -> Path:
        """A hosts.toml naming the Spegel stand-in before upstream (what apply writes)."""
        return self.write_hosts_toml(
            f'server = "{self.upstream.url}"\n\n'
            f'[host."{self.spegel.url}"]\n  capabilities = ["pull", "resolve"]\n',
            registry,
        )

    def crictl_pull(self) -> subprocess.CompletedProcess[str]:
        """`crictl pull` of the sandbox image: CRI PullImage, hosts.toml read daemon-side."""
        from support.peers import peer_bin  # only here: it needs the peer cache

        endpoint = f"unix://{self.containerd.socket}"
        cmd = [
            str(peer_bin("crictl")),
            "--runtime-endpoint",
            endpoint,
            "--image-endpoint",
            endpoint,
        ]
        return subprocess.run(
            [*cmd, "pull", self.image_ref], capture_output=True, text=True, timeout=120, check=False
        )

    def pull(
        self,
        ref: str | None = None,
        hosts_dir: Path | None = None,
        *,
        namespace: str | None = None,
        keep: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """`containerd.pull` of `ref` (default: the pushed image)."""
        ref = ref or self.image_ref
        return self.containerd.pull(ref, hosts_dir, namespace=namespace, keep=keep)

    def mark_logs(self) -> None:
        """Make both registries' `requests()` start from now."""
        self.upstream.mark()
        self.spegel.mark()

    def reset(self) -> None:
        """Back to a clean state for the next test: empty hosts dir, mirror up, logs marked."""
        shutil.rmtree(self.hosts_dir, ignore_errors=True)
        self.hosts_dir.mkdir(parents=True)
        if not self.spegel.running:
            self.spegel.start()
        self.containerd.forget(self.image_ref)
        self.mark_logs()

    def describe(self) -> str:
        """A few lines on ports and paths, for printing."""
        return "\n".join(
            [
                f"sandbox root      {self.root}",
                f"containerd {self.containerd.version or '?'}  socket {self.containerd.socket}",
                f"  config          {self.containerd.config_path}",
                f"  log             {self.containerd.log_path}",
                f"  namespace       {self.containerd.namespace}",
                f"hosts dir         {self.hosts_dir}",
                f"upstream registry {self.upstream.url}  log {self.upstream.access_log}",
                f"spegel stand-in   {self.spegel.url}  (pull-through cache of upstream)"
                f"  log {self.spegel.access_log}",
                f"image             {self.image_ref}",
            ]
        )


def _start_on_free_port(registry: RegistryProc, attempts: int = 3) -> None:
    """Start `registry`; if its port was taken meanwhile, retry on another free port."""
    for attempt in range(attempts):
        try:
            registry.start()
            return
        except RuntimeError as err:
            if "address already in use" not in str(err) or attempt == attempts - 1:
                raise
            registry.port = free_port()


# --- a mirror that hangs ----------------------------------------------------------------------


class HangingServer:
    """A TCP listener on 127.0.0.1 that accepts connections and never answers ("Spegel hung").

    `port=0` picks a free port; pass a stopped registry's port to make "Spegel" hang there.
    With `complete_handshake=False` it is a dead node instead: its accept queue is kept full,
    so the kernel drops new SYNs and every connect times out (containerd 1.6 then waits its
    default 30 s dial timeout per request, whatever `dial_timeout` says).
    """

    def __init__(self, port: int = 0, *, complete_handshake: bool = True) -> None:
        self.complete_handshake = complete_handshake
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((LOOPBACK, port))
        self.port = int(self._listener.getsockname()[1])
        self._conns: list[socket.socket] = []
        self._fillers: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def connections(self) -> int:
        """How many connections it has accepted (and left hanging)."""
        return len(self._conns)

    def __enter__(self) -> Self:
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def _open(self) -> None:
        if not self.complete_handshake:
            self._listener.listen(0)
            self._fill_accept_queue()
            return
        self._listener.listen(64)
        self._listener.settimeout(0.05)
        self._thread.start()

    def _fill_accept_queue(self, attempts: int = 8) -> None:
        """Connect to ourselves until a connect times out: from then on SYNs are dropped."""
        for _ in range(attempts):
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probe.settimeout(0.2)
            try:
                probe.connect((LOOPBACK, self.port))
            except TimeoutError:
                probe.close()
                return
            self._fillers.append(probe)
        raise RuntimeError(f"could not fill the accept queue of {self.host}")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conns.append(conn)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=STOP_TIMEOUT_S)
        for conn in [*self._conns, *self._fillers, self._listener]:
            with contextlib.suppress(OSError):
                conn.close()


__all__ = [
    "CONTAINERD_UA_PREFIX",
    "PROBE_USER_AGENT",
    "PROXY_USER_AGENT",
    "ContainerdProc",
    "HangingServer",
    "RegistryProc",
    "Request",
    "Sandbox",
    "build_oci_layout",
    "containerd_requests",
    "free_port",
    "missing_binaries",
    "parse_access_log",
    "probe_v2",
    "wait_until",
]


@contextlib.contextmanager
def sandbox_on_fake_node(root: Path) -> Iterator[Sandbox]:
    """Debian's containerd (CRI on) reading the hosts dir of a fake node tree made at `root`,
    which `spegel-node apply --root` manages; the Spegel stand-in stopped (a test puts what it
    needs on the mirror port)."""
    from support import fake_nodes

    fake_nodes.make_containerd(root, config_path="/etc/containerd/certs.d")
    sandbox = Sandbox()
    sandbox.containerd.config_path_value = str(root / "etc/containerd/certs.d")
    with sandbox:
        sandbox.spegel.stop()
        yield sandbox
