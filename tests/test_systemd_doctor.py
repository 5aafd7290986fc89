"""The doctor textfile units on a real systemd node (Debian under systemd-nspawn): `install-units
--textfile` renders them, systemd runs the hardened service, doctor writes the textfile (and
nothing else: the service may write only the textfile's directory) and a failed check does not
fail the unit."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from support import nspawn

pytestmark = pytest.mark.nspawn

REPO = Path(__file__).resolve().parents[1]
VENV = "/opt/spegel-node"
TEXTDIR = "/var/lib/node_exporter/textfile"
TEXTFILE = f"{TEXTDIR}/spegel_node.prom"
SERVICE = "spegel-node-doctor.service"
TIMER = "spegel-node-doctor.timer"


def test_doctor_service_writes_the_textfile_read_only_elsewhere(tmp_path: Path) -> None:
    reason = nspawn.unavailable_reason()
    if reason:
        pytest.skip(reason)
    base = nspawn.ensure_base_image()
    wheels = nspawn.build_wheelhouse(REPO, tmp_path / "wheels")
    with nspawn.NspawnNode("doctor1", base) as node:
        node.install_wheelhouse(wheels, venv=VENV)
        node.replace_file("/etc/spegel-node/config.toml", 'node_ip = "127.0.0.1"\n')
        node.path(TEXTDIR).mkdir(parents=True)
        installed = node.run(f"{VENV}/bin/spegel-node", "install-units", "--textfile", TEXTFILE)
        assert f"enable --now spegel-node-repair.timer spegel-node-repair.path {TIMER}" in (
            installed.stdout
        )
        node.systemctl("daemon-reload")
        node.systemctl("enable", "--now", TIMER)
        assert node.systemctl("is-active", TIMER).stdout.strip() == "active"
        # a probe target doctor must not write into, and the state dir it must not create
        hosts = node.path("/etc/containerd/certs.d")
        shutil.rmtree(hosts, ignore_errors=True)
        state_dir = node.path("/var/lib/spegel-node")
        shutil.rmtree(state_dir, ignore_errors=True)

        node.systemctl("start", SERVICE)  # oneshot: returns when doctor has finished
        show = node.systemctl(
            "show", "--property=Result,ExecMainStatus,ProtectSystem,ReadWritePaths", SERVICE
        ).stdout
        props = dict(line.split("=", 1) for line in show.splitlines() if "=" in line)
        journal = node.journal(SERVICE)
        assert props["Result"] == "success", show + journal
        assert props["ExecMainStatus"] == "1", show  # spegel.v2 fails: nothing on 29999
        assert props["ProtectSystem"] == "strict"
        assert props["ReadWritePaths"] == f"-{TEXTDIR}"

        text = node.path(TEXTFILE).read_text()
        assert re.search(r"^spegel_node_doctor_ok 0$", text, re.M), text
        assert 'spegel_node_check_status{id="spegel.v2",status="fail"} 1' in text
        assert 'spegel_node_check_status{id="layout.detected",status="pass"} 1' in text
        assert sorted(p.name for p in node.path(TEXTDIR).iterdir()) == ["spegel_node.prom"]
        assert not state_dir.exists() and not hosts.exists()  # doctor wrote nothing else

        security = node.run("systemd-analyze", "security", "--no-pager", SERVICE).stdout
        found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security)
        assert found and float(found[1]) <= 3.0, security
