"""Build the Go test peers (`make peers`) into a cache outside the repo, and reuse them.

The product is pure Python; these binaries exist only so tests can run the real thing:
containerd and ctr for every line nodes run, crictl for the kubelet's CRI pull path, Spegel,
helm, and the per-line judges under tests/judge/ (our own Go, importing each containerd's own
hosts.toml parser). Every version is pinned here; nothing fetched or built is committed.

Each peer lands in ``<cache>/peers/<name>-<version>/`` with a ``.built`` stamp; a second run
builds nothing. A peer that cannot be built prints one line naming it and the run goes on; the
tests that need it fail (``tests/support/peers.py``), never skip. Exit status 1 if any failed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("SPEGEL_NODE_TEST_CACHE", "/var/cache/spegel-node-tests")) / "peers"


@dataclass(frozen=True)
class Peer:
    name: str  # directory name, also what tests ask for
    version: str
    packages: tuple[str, ...]  # `go install` targets, without @version
    tags: str = ""
    env: dict[str, str] = field(default_factory=dict)
    judge_src: str = ""  # set for our own judges: "v1" or "v2", tests/judge/ built against `module`
    module: str = ""
    # Build inside the module's own source (from `go mod download`), honouring its go.mod:
    # `go install pkg@version` refuses modules whose go.mod has exclude/replace directives.
    in_module: str = ""

    @property
    def dir(self) -> Path:
        return CACHE / f"{self.name}-{self.version}"


CONTAINERD_1 = "github.com/containerd/containerd"
CONTAINERD_2 = "github.com/containerd/containerd/v2"

# The newest release of each line the module proxy serves (checked 2026-12-02 with
# `go list -m -versions`). Debian's containerd 1.6.20 comes from apt, not from here.
CONTAINERD_VERSIONS = {
    "1.7": "1.7.35",
    "2.0": "2.0.14",
    "2.1": "2.1.9",
    "2.2": "2.2.9",
    "2.3": "2.3.7",
}


def _containerd(version: str) -> Peer:
    module = CONTAINERD_1 if version.startswith("1.") else CONTAINERD_2
    return Peer(
        "containerd",
        version,
        (f"{module}/cmd/containerd", f"{module}/cmd/ctr"),
        tags="no_btrfs",
        env={"CGO_ENABLED": "0"},
        in_module=module,
    )


# Judges: Debian's 1.6.20 (what the sandbox runs) plus every containerd peer above.
JUDGE_VERSIONS = ("1.6.20", *CONTAINERD_VERSIONS.values())


def _judge(version: str) -> Peer:
    """tests/judge, built against that version's remotes/docker/config."""
    line = "v1" if version.startswith("1.") else "v2"
    module = CONTAINERD_1 if line == "v1" else CONTAINERD_2
    return Peer("judge", version, (), env={"CGO_ENABLED": "0"}, judge_src=line, module=module)


PEERS: list[Peer] = [
    *(_containerd(v) for v in CONTAINERD_VERSIONS.values()),
    Peer("crictl", "1.34.0", ("sigs.k8s.io/cri-tools/cmd/crictl",), env={"CGO_ENABLED": "0"}),
    # v0.7.4 is refused by the module proxy here (403 "not available"); v0.7.3 is served, but
    # not its version list, which `go install` reads for deprecations: build in the module.
    Peer(
        "spegel",
        "0.7.3",
        ("github.com/spegel-org/spegel",),
        env={"CGO_ENABLED": "0"},
        in_module="github.com/spegel-org/spegel",
    ),
    Peer("helm", "3.22.0", ("helm.sh/helm/v3/cmd/helm",), env={"CGO_ENABLED": "0"}),
    *(_judge(v) for v in JUDGE_VERSIONS),
]


def _go_install(peer: Peer, log: Path) -> None:
    env = {**os.environ, **peer.env, "GOBIN": str(peer.dir / "bin"), "GOFLAGS": "-buildvcs=false"}
    cmd = ["go", "install"]
    if peer.tags:
        cmd.append(f"-tags={peer.tags}")
    cmd += [f"{pkg}@v{peer.version}" for pkg in peer.packages]
    with log.open("wb") as out:
        subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, check=True, cwd="/")


def module_download(
    module: str, version: str, env: dict[str, str] | None = None, cwd: str | Path = "/"
) -> dict[str, str]:
    """`go mod download -json module@vVERSION`: where the proxy's copy is (`Dir`, `GoMod`)."""
    info = subprocess.run(
        ["go", "mod", "download", "-json", f"{module}@v{version}"],
        env=env,
        capture_output=True,
        check=True,
        cwd=cwd,
        timeout=600,
    )
    found: dict[str, str] = json.loads(info.stdout)
    return found


def _go_build_in_module(peer: Peer, log: Path) -> None:
    env = {**os.environ, **peer.env, "GOFLAGS": "-buildvcs=false -mod=mod", "GOWORK": "off"}
    with log.open("wb") as out:
        src = Path(module_download(peer.in_module, peer.version, env)["Dir"])
        with tempfile.TemporaryDirectory(prefix=f"{peer.name}-{peer.version}-") as tmp:
            work = Path(tmp) / "src"
            shutil.copytree(src, work)
            for path in [work, *work.rglob("*")]:
                path.chmod(path.stat().st_mode | 0o200)
            pkgs = ["./" + pkg.removeprefix(peer.in_module).lstrip("/") for pkg in peer.packages]
            cmd = ["go", "build", "-o", str(peer.dir / "bin") + "/"]
            if peer.tags:
                cmd.append(f"-tags={peer.tags}")
            subprocess.run(
                [*cmd, *pkgs], env=env, cwd=work, stdout=out, stderr=subprocess.STDOUT, check=True
            )


def _replaces(go_mod: str) -> list[str]:
    """The ``replace`` directives of a go.mod as ``go mod edit -replace`` arguments.

    A dependency's replaces do not apply to the module that requires it, but containerd 1.6
    pins genproto/googleapis there; without them `go mod tidy` picks versions it does not build
    with (ambiguous genproto imports)."""
    out: list[str] = []
    block = False
    for raw in go_mod.splitlines():
        line = raw.split("//")[0].strip()
        if line == "replace (":
            block = True
            continue
        if block and line == ")":
            block = False
            continue
        if line.startswith("replace "):
            line = line.removeprefix("replace ").strip()
        elif not block:
            continue
        if "=>" not in line:
            continue
        old, new = (side.strip().split() for side in line.split("=>", 1))
        if len(new) != 2:  # a local-directory replace: nothing a requirer can use
            continue
        out.append(f"-replace={'@'.join(old)}={new[0]}@{new[1]}")
    return out


def _judge_source(peer: Peer) -> dict[str, bytes]:
    """tests/judge's Go files for this judge's containerd line: written with 1.x's import paths,
    which 2.x moved under containerd/v2/core/."""
    files = {f.name: f.read_bytes() for f in sorted((REPO / "tests" / "judge").glob("*.go"))}
    if peer.judge_src == "v2":
        old, new = (
            b'"github.com/containerd/containerd/remotes/',
            b'"github.com/containerd/containerd/v2/core/remotes/',
        )
        files = {name: text.replace(old, new) for name, text in files.items()}
    return files


def _go_build_judge(peer: Peer, log: Path) -> None:
    """Our own judge program, built against one containerd version in a scratch module."""
    env = {**os.environ, **peer.env, "GOFLAGS": "-buildvcs=false", "GOWORK": "off"}
    with tempfile.TemporaryDirectory(prefix=f"judge-{peer.version}-") as tmp:
        work = Path(tmp)
        for name, text in _judge_source(peer).items():
            (work / name).write_bytes(text)
        with log.open("wb") as out:
            go_mod = Path(
                module_download(peer.module, peer.version, env, work)["GoMod"]
            ).read_text()
            steps = [
                ["go", "mod", "init", "spegelnode.test/judge"],
                [
                    "go",
                    "mod",
                    "edit",
                    f"-require={peer.module}@v{peer.version}",
                    *_replaces(go_mod),
                ],
                ["go", "mod", "tidy"],
                ["go", "build", "-o", str(peer.dir / "bin" / "judge"), "."],
            ]
            for step in steps:
                subprocess.run(
                    step, env=env, cwd=work, stdout=out, stderr=subprocess.STDOUT, check=True
                )


def _source_digest(peer: Peer) -> str:
    """For our own judges: a digest of their Go source, so an edit rebuilds them ("" otherwise)."""
    if not peer.judge_src:
        return ""
    digest = hashlib.sha256()
    for name, text in _judge_source(peer).items():
        digest.update(name.encode() + b"\0" + text)
    return digest.hexdigest()[:16]


def build(peer: Peer) -> bool:
    stamp = peer.dir / ".built"
    if stamp.is_file() and _source_digest(peer) in ("", *stamp.read_text().split()[1:]):
        print(f"peers: {peer.name} {peer.version}: cached", flush=True)
        return True
    if peer.dir.exists():
        shutil.rmtree(peer.dir)
    (peer.dir / "bin").mkdir(parents=True)
    log = peer.dir / "build.log"
    print(f"peers: {peer.name} {peer.version}: building ...", flush=True)
    started = time.monotonic()
    try:
        if peer.judge_src:
            _go_build_judge(peer, log)
        elif peer.in_module:
            _go_build_in_module(peer, log)
        else:
            _go_install(peer, log)
    except (subprocess.CalledProcessError, OSError) as exc:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
        why = tail[0] if tail else str(exc)
        print(f"peers: {peer.name} {peer.version}: FAILED to build ({why}); log {log}", flush=True)
        return False
    stamp.write_text(f"{time.time()} {_source_digest(peer)}\n".replace(" \n", "\n"))
    print(
        f"peers: {peer.name} {peer.version}: built in {time.monotonic() - started:.0f} s",
        flush=True,
    )
    return True


def main(argv: list[str]) -> int:
    wanted = set(argv)
    if shutil.which("go") is None:
        print("peers: no `go` on PATH: the Go test peers cannot be built", flush=True)
        return 1
    CACHE.mkdir(parents=True, exist_ok=True)
    chosen = [p for p in PEERS if not wanted or p.name in wanted]
    ok = [build(p) for p in chosen]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
