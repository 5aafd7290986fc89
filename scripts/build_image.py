"""Build dist/spegel-node-image.tar (an OCI image layout in a tar) without Docker.

Debian packages (apt-get download, dpkg-deb -x) for python3.11 plus our wheel and its
dependencies (pip wheel) in one gzip layer; fixed mtimes (SOURCE_DATE_EPOCH), sorted entries,
uid/gid 0, pyc compiled with --invalidation-mode unchecked-hash. Prints digest and size.
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
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


def run(*cmd: str, cwd: Path | None = None) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def rootfs(work: Path, epoch: int) -> Path:
    debs, wheels, root = work / "debs", work / "wheels", work / "root"
    debs.mkdir()
    wheels.mkdir()
    try:
        run("apt-get", "download", "-q", *DEBS, cwd=debs)
    except subprocess.CalledProcessError:  # a fresh machine has no package lists yet
        run("apt-get", "update", "-qq")
        run("apt-get", "download", "-q", *DEBS, cwd=debs)
    for deb in sorted(debs.glob("*.deb")):
        run("dpkg-deb", "-x", str(deb), str(root))
    for rel in DROP:
        shutil.rmtree(root / rel, ignore_errors=True)
    env_pip = [sys.executable, "-m", "pip"]
    run(*env_pip, "wheel", "-q", str(REPO), "-w", str(wheels))
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
        "nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
    )
    (root / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
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


def build(out: Path, epoch: int, name: str) -> tuple[str, int]:
    with tempfile.TemporaryDirectory(prefix="spegel-image-") as tmp:
        layer = layer_tar(rootfs(Path(tmp), epoch), epoch)
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
                "User": "0:0",
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
    args = parser.parse_args()
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "1767225600"))
    start = time.monotonic()
    digest, size = build(args.out, epoch, args.name)
    print(
        f"{args.out}: {args.name} manifest {digest} archive {size} bytes "
        f"({time.monotonic() - start:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
