"""Build dist/spegel-node-image.tar (an OCI image layout in a tar) without Docker.

Debian packages (apt-get download, dpkg-deb -x) for python3.11 plus the wheel of this checkout
and its dependencies in one gzip layer; fixed mtimes (SOURCE_DATE_EPOCH), sorted entries,
uid/gid 0, pyc compiled with --invalidation-mode unchecked-hash. Prints digest and size.

Every input but our own wheel is pinned in scripts/image.lock: each Debian package's version
and .deb sha256, each dependency wheel's version, file name and sha256 (pip --require-hashes).
A build whose inputs differ from the lock stops (exit 1) and says so; `--update-lock` rewrites
the lock from what Debian and PyPI serve now (then review and commit it).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "scripts" / "image.lock"
DEBS = [
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",
    "libgcc-s1",
    "zlib1g",
    "libssl3",
    "libffi8",
    "libexpat1",
    "libbz2-1.0",
    "liblzma5",
    "libuuid1",
    "libcrypt1",
]
DROP = [
    "usr/share/doc",
    "usr/share/man",
    "usr/share/lintian",
    "usr/share/locale",
    "usr/share/info",
    "usr/lib/x86_64-linux-gnu/gconv",
    "usr/lib/python3.11/test",
    "usr/lib/python3.11/idlelib",
    "usr/lib/python3.11/tkinter",
    "usr/lib/python3.11/turtledemo",
    "usr/lib/python3.11/lib2to3",
    "usr/lib/python3.11/ensurepip",
    "usr/lib/python3.11/pydoc_data",
]
SITE = "usr/lib/python3/dist-packages"
ENTRY = "#!/usr/bin/python3.11 -s\nfrom spegel_node.cli import main\n\nraise SystemExit(main())\n"
# The image's default user: doctor needs nothing more; apply and run need uid 0 (docs/image.md).
NONROOT = 65532


class LockError(RuntimeError):
    """The inputs differ from scripts/image.lock, or it does not cover them."""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_lock(lock: Path = LOCK) -> dict[str, dict[str, dict[str, str]]]:
    try:
        data = tomllib.loads(lock.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise LockError(f"{lock}: {e}") from e
    if sorted(data.get("debs", {})) != sorted(DEBS):
        raise LockError(f"{lock} [debs] does not list exactly {', '.join(DEBS)}")
    return data


def write_lock(debs: dict[str, dict[str, str]], wheels: dict[str, dict[str, str]]) -> None:
    lines = [
        "# The pinned inputs of `make image` (scripts/build_image.py checks every one).",
        "# Rewritten by `python3 scripts/build_image.py --update-lock`: review, then commit.",
        "",
        "[debs]  # Debian 12 (bookworm), amd64: version and the .deb's sha256",
    ]
    for name in sorted(debs):
        d = debs[name]
        lines.append(f'"{name}" = {{ version = "{d["version"]}", sha256 = "{d["sha256"]}" }}')
    lines += ["", "[wheels]  # the project's runtime dependencies: version, file, sha256"]
    for name in sorted(wheels):
        w = wheels[name]
        lines.append(
            f'"{name}" = {{ version = "{w["version"]}", file = "{w["file"]}", '
            f'sha256 = "{w["sha256"]}" }}'
        )
    LOCK.write_text("\n".join(lines) + "\n")


def deb_fields(deb: Path) -> tuple[str, str, str]:
    out = subprocess.run(
        ["dpkg-deb", "--showformat=${Package}\t${Version}\t${Architecture}", "-W", str(deb)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    name, version, arch = out.strip().split("\t")
    return name, version, arch


def apt_download(specs: list[str], cwd: Path) -> None:
    try:
        run("apt-get", "download", "-q", *specs, cwd=cwd)
    except subprocess.CalledProcessError:  # a fresh machine has no package lists yet
        run("apt-get", "update", "-qq")
        try:
            run("apt-get", "download", "-q", *specs, cwd=cwd)
        except subprocess.CalledProcessError as e:
            raise LockError(
                "apt-get download of the locked versions failed (Debian no longer serves one "
                "of them?); run scripts/build_image.py --update-lock, review, commit"
            ) from e


def fetch_debs(debs: Path, locked: dict[str, dict[str, str]] | None) -> dict[str, dict[str, str]]:
    """Download the packages (the locked versions, or the candidates) and check them."""
    specs = [f"{n}={locked[n]['version']}" for n in DEBS] if locked else list(DEBS)
    apt_download(specs, debs)
    found: dict[str, dict[str, str]] = {}
    for deb in sorted(debs.glob("*.deb")):
        name, version, arch = deb_fields(deb)
        if arch not in ("amd64", "all"):
            raise LockError(f"{deb.name}: architecture {arch}, not amd64")
        found[name] = {"version": version, "sha256": sha256(deb)}
    if sorted(found) != sorted(DEBS):
        raise LockError(f"apt-get download gave {sorted(found)}, not {sorted(DEBS)}")
    for name, want in (locked or {}).items():
        if found[name] != want:
            raise LockError(
                f"{name}: got {found[name]['version']} sha256 {found[name]['sha256']}, "
                f"the lock has {want['version']} sha256 {want['sha256']}"
            )
    return found


def fetch_wheels(
    wheels: Path, locked: dict[str, dict[str, str]] | None
) -> dict[str, dict[str, str]]:
    """The dependency wheels: with a lock, exactly those files (pip --require-hashes); without,
    whatever pip resolves for this checkout now."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    if locked:
        req = wheels.parent / "requirements.lock.txt"
        req.write_text(
            "".join(f"{n}=={w['version']} --hash=sha256:{w['sha256']}\n" for n, w in locked.items())
        )
        try:
            run(*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--require-hashes",
                "-r", str(req), "-d", str(wheels))  # fmt: skip
        except subprocess.CalledProcessError as e:
            raise LockError("pip download of the locked wheels failed (see above)") from e
    else:
        run(*pip, "download", "-q", "--only-binary=:all:", str(REPO), "-d", str(wheels))
        for ours in wheels.glob("spegel_node-*"):
            ours.unlink()
    found: dict[str, dict[str, str]] = {}
    for whl in sorted(wheels.glob("*.whl")):
        name, version = whl.name.split("-")[:2]
        key = name.lower().replace("_", "-")
        found[key] = {"version": version, "file": whl.name, "sha256": sha256(whl)}
    for name, want in (locked or {}).items():
        if found.get(name) != want:
            raise LockError(f"wheel {name}: got {found.get(name)}, the lock has {want}")
    return found


def update_lock() -> None:
    with tempfile.TemporaryDirectory(prefix="spegel-image-lock-") as tmp:
        debs, wheels = Path(tmp, "debs"), Path(tmp, "wheels")
        debs.mkdir()
        wheels.mkdir()
        write_lock(fetch_debs(debs, None), fetch_wheels(wheels, None))


def run(*cmd: str, cwd: Path | None = None) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def rootfs(work: Path, epoch: int, lock_path: Path = LOCK) -> Path:
    debs, wheels, root = work / "debs", work / "wheels", work / "root"
    debs.mkdir()
    wheels.mkdir()
    lock = read_lock(lock_path)
    fetch_debs(debs, lock["debs"])
    fetch_wheels(wheels, lock.get("wheels", {}))
    for deb in sorted(debs.glob("*.deb")):
        run("dpkg-deb", "-x", str(deb), str(root))
    for rel in DROP:
        shutil.rmtree(root / rel, ignore_errors=True)
    env_pip = [sys.executable, "-m", "pip"]
    run(*env_pip, "wheel", "-q", "--no-deps", str(REPO), "-w", str(wheels))  # this checkout
    run(
        *env_pip,
        "install",
        "-q",
        "--no-deps",
        "--no-compile",
        "--target",
        str(root / SITE),
        *sorted(str(w) for w in wheels.glob("*.whl")),
    )
    shutil.rmtree(root / SITE / "bin", ignore_errors=True)
    # pip records where each wheel came from (a temp dir): drop it, and its line in RECORD.
    for extra in (root / SITE).glob("*.dist-info/direct_url.json"):
        extra.unlink()
        record = extra.parent / "RECORD"
        lines = record.read_text().splitlines(keepends=True)
        gone = f"{extra.parent.name}/direct_url.json,"
        record.write_text("".join(line for line in lines if not line.startswith(gone)))
    (root / "usr/bin/spegel-node").write_text(ENTRY)
    (root / "usr/bin/spegel-node").chmod(0o755)
    (root / "usr/bin/python3").unlink(missing_ok=True)
    (root / "usr/bin/python3").symlink_to("python3.11")
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/sbin/nologin\n"
        f"nonroot:x:{NONROOT}:{NONROOT}:nonroot:/nonexistent:/sbin/nologin\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
    )
    (root / "etc/group").write_text(f"root:x:0:\nnonroot:x:{NONROOT}:\nnogroup:x:65534:\n")
    for d in ("tmp", "host", "root"):
        (root / d).mkdir(exist_ok=True)
    (root / "tmp").chmod(0o1777)
    env = {"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "SOURCE_DATE_EPOCH": str(epoch)}
    subprocess.run(
        [
            "/usr/sbin/chroot",
            str(root),
            "/usr/bin/python3.11",
            "-m",
            "compileall",
            "-q",
            "--invalidation-mode",
            "unchecked-hash",
            "/usr/lib/python3.11",
            "/" + SITE,
        ],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    # Every runtime requirement of our wheel is installed (the lock covers them), and it starts.
    # (requirements whose python_version marker leaves this Python out, e.g. tomli, are skipped)
    smoke = (
        "import importlib.metadata as m, operator as o, re, sys\n"
        "OPS = {'<': o.lt, '<=': o.le, '>': o.gt, '>=': o.ge, '==': o.eq, '!=': o.ne}\n"
        "def applies(marker):\n"
        "    found = re.findall(r'python_version\\s*(<=|>=|<|>|==|!=)\\s*.([\\d.]+).', marker)\n"
        "    ok = all(OPS[op](sys.version_info[:2], tuple(map(int, v.split('.'))))"
        " for op, v in found)\n"
        "    return ok and 'extra ==' not in marker\n"
        "for r in m.distribution('spegel-node').requires or []:\n"
        "    name, _, marker = r.partition(';')\n"
        "    if applies(marker): m.version(re.split(r'[ <>=!~\\[(]', name.strip(), maxsplit=1)[0])\n"
        "import spegel_node.cli, spegel_node.doctor, spegel_node.reconcile, psutil, h2.connection\n"
    )
    for argv in (["/usr/bin/python3.11", "-c", smoke], ["/usr/bin/spegel-node", "--version"]):
        done = subprocess.run(
            ["/usr/sbin/chroot", str(root), *argv], env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise LockError(f"the image's {argv[0]} failed: {done.stderr.strip()[-800:]}")
    return root


def layer_tar(root: Path, epoch: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
        for rel in paths:
            path = root / rel
            st = path.lstat()
            info = tarfile.TarInfo(rel)
            info.mtime, info.uid, info.gid, info.uname, info.gname = epoch, 0, 0, "", ""
            info.mode = st.st_mode & 0o7777
            if path.is_symlink():
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
                tar.addfile(info)
            elif path.is_dir():
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                data = path.read_bytes()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def blob(blobs: dict[str, bytes], data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return digest


def build(out: Path, epoch: int, name: str, lock: Path = LOCK) -> tuple[str, int]:
    with tempfile.TemporaryDirectory(prefix="spegel-image-") as tmp:
        layer = layer_tar(rootfs(Path(tmp), epoch, lock), epoch)
    blobs: dict[str, bytes] = {}
    packed = gzip.compress(layer, compresslevel=9, mtime=0)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": created,
            "config": {
                "Entrypoint": ["/usr/bin/spegel-node"],
                "User": f"{NONROOT}:{NONROOT}",
                "WorkingDir": "/",
                "Env": ["PATH=/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE=1"],
            },
            "rootfs": {
                "type": "layers",
                "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()],
            },
        },
        sort_keys=True,
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": blob(blobs, config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": blob(blobs, packed),
                    "size": len(packed),
                }
            ],
        },
        sort_keys=True,
    ).encode()
    digest = blob(blobs, manifest)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": digest,
                    "size": len(manifest),
                    "annotations": {
                        "io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": name,
                    },
                }
            ],
        },
        sort_keys=True,
    ).encode()
    files = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}', "index.json": index}
    files.update({f"blobs/sha256/{d.split(':')[1]}": b for d, b in blobs.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(rel)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, epoch
            tar.addfile(info)
        for rel in sorted(files):
            info = tarfile.TarInfo(rel)
            info.size, info.mode, info.mtime = len(files[rel]), 0o644, epoch
            tar.addfile(info, io.BytesIO(files[rel]))
    return digest, out.stat().st_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "dist/spegel-node-image.tar")
    parser.add_argument("--name", default="localhost/spegel-node:0.1.0")
    parser.add_argument("--lock", type=Path, default=LOCK, help="the lock file to build from")
    parser.add_argument(
        "--update-lock",
        action="store_true",
        help=f"rewrite {LOCK.relative_to(REPO)} from what Debian and PyPI serve now; no build",
    )
    args = parser.parse_args()
    try:
        if args.update_lock:
            update_lock()
            print(f"{LOCK}: rewritten; review the diff and commit it")
            return 0
        epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "1767225600"))
        start = time.monotonic()
        digest, size = build(args.out, epoch, args.name, args.lock)
    except LockError as e:
        print(f"build_image: {e}", file=sys.stderr)
        return 1
    print(
        f"{args.out}: {args.name} manifest {digest} archive {size} bytes "
        f"({time.monotonic() - start:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
