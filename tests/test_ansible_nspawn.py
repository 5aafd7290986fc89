"""The Ansible role for real: two Debian nodes (systemd as PID 1) under systemd-nspawn.

`ansible-playbook` from the dev venv runs `ansible/playbooks/rollout.yml` against the nodes over
the `community.docker.nsenter` connection (REFERENCE section 5). The nodes install spegel-node
offline from a wheelhouse built from this checkout. Each node runs a docker-registry on
127.0.0.1:29999 as the stand-in for Spegel's hostPort, so `spegel-node doctor` can pass and
the role runs with `spegel_node_fail_on_doctor: true`. The role also configures the node's
containerd (Debian's 1.6.20 ships no config_path) and restarts it.

Proved here: the first run succeeds; a second run reports changed=0 on every node; `--check
--diff` passes with changed=0; the timer and path units are enabled and active; every mirrored
registry's hosts.toml lists the mirror; containerd runs with config_path set; and a hosts.toml
replaced by rename in one node is repaired by that node's own path unit.

The first run uses the role as the built and installed collection (`ansible-galaxy collection
build`, `install -p`, role `spegel_node.spegel_node.spegel_node`); the later runs the checkout's
`playbooks/rollout.yml`, so run 2's changed=0 also shows the two are the same role. Then
`playbooks/doctor.yml` prints one row per node and the counts, changed=0; `playbooks/remove.yml`
leaves every node's hosts dir byte for byte as it was before the rollout (a person's own
hosts.toml in it included), the units, venv, link, config and state gone; a second remove
changes nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from support import nspawn

pytestmark = pytest.mark.nspawn

REPO = Path(__file__).resolve().parents[1]
PLAYBOOK = REPO / "ansible" / "playbooks" / "rollout.yml"
DOCTOR_PLAYBOOK = REPO / "ansible" / "playbooks" / "doctor.yml"
REMOVE_PLAYBOOK = REPO / "ansible" / "playbooks" / "remove.yml"
ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
ANSIBLE_GALAXY = Path(sys.executable).parent / "ansible-galaxy"
ROLE_FQCN = "spegel_node.spegel_node.spegel_node"
# A person's own hosts.toml files, there before the rollout: one for a mirrored registry (apply
# merges Spegel in), one for a registry spegel-node does not mirror (never touched).
PERSONS_FILES = {
    "docker.io/hosts.toml": (
        '# mine: docker.io through the office cache\nserver = "https://registry-1.docker.io"\n\n'
        '[host."https://cache.office.example:5000"]\n  capabilities = ["pull", "resolve"]\n'
    ),
    "quay.io/hosts.toml": 'server = "https://quay.io"\n',
}
# What the role puts on a node besides the hosts dir; all of it gone after remove.yml.
ROLE_PATHS = (
    "/opt/spegel-node",
    "/usr/local/bin/spegel-node",
    "/etc/spegel-node",
    "/var/cache/spegel-node",
    "/var/lib/spegel-node",
    "/etc/systemd/system/spegel-node-repair.service",
    "/etc/systemd/system/spegel-node-repair.timer",
    "/etc/systemd/system/spegel-node-repair.path",
    "/etc/systemd/system/timers.target.wants/spegel-node-repair.timer",
    "/etc/systemd/system/paths.target.wants/spegel-node-repair.path",
)
FQCN_PLAYBOOK = f"""\
- name: Roll out spegel-node with the collection's role
  hosts: spegel_nodes
  become: true
  gather_facts: true
  gather_subset: [min, network]
  serial: 1
  roles:
    - role: {ROLE_FQCN}
"""
NODES = ("spegel-ans1", "spegel-ans2")
HOST_PORT = 29999
MIRROR = f"http://127.0.0.1:{HOST_PORT}"
REGISTRIES = ["https://docker.io", "https://ghcr.io", "https://registry.k8s.io"]
HOSTS_DIR = "/etc/containerd/certs.d"
UNITS = ("spegel-node-repair.timer", "spegel-node-repair.path")
PLAYBOOK_TIMEOUT = 300

STANDIN_CONFIG = f"""\
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: /var/lib/spegel-standin
http:
  addr: 127.0.0.1:{HOST_PORT}
"""

# What the PLAY RECAP says per host.
RECAP_LINE = re.compile(r"^(\S+)\s*:\s*((?:\w+=\d+\s*)+)$")


def parse_recap(output: str) -> dict[str, dict[str, int]]:
    """{host: {"ok": n, "changed": n, "failed": n, ...}} from ansible-playbook's PLAY RECAP."""
    _, _, recap = output.rpartition("PLAY RECAP")
    hosts: dict[str, dict[str, int]] = {}
    for line in recap.splitlines():
        m = RECAP_LINE.match(line.strip())
        if m:
            counts = dict(pair.split("=") for pair in m.group(2).split())
            hosts[m.group(1)] = {k: int(v) for k, v in counts.items()}
    return hosts


def changed_tasks(output: str) -> list[str]:
    """`host: task name` for every task the output reports as changed."""
    found, task = [], ""
    for line in output.splitlines():
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            task = line.split("[", 1)[1].rsplit("]", 1)[0]
        m = re.match(r"^changed: \[([^\]]+)\]", line)
        if m:
            found.append(f"{m.group(1)}: {task}")
    return found


def recap_lines(output: str) -> list[str]:
    _, _, recap = output.rpartition("PLAY RECAP")
    return [line.strip() for line in recap.splitlines() if RECAP_LINE.match(line.strip())]


def fleet_summary(output: str) -> list[str]:
    """The lines of doctor.yml's one "Summarise the fleet" message."""
    _, _, rest = output.partition("TASK [Summarise the fleet]")
    body = rest[rest.index("{") : rest.index("\n}\n") + 2]
    lines: list[str] = json.loads(body)["msg"]
    return lines


def snapshot(root: Path) -> dict[str, tuple[str, bytes, int]]:
    """Every entry under root: kind, bytes (files) or link target, and mode."""
    found: dict[str, tuple[str, bytes, int]] = {}
    if not root.exists():
        return found
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = ("link", os.readlink(path).encode(), st.st_mode)
        elif path.is_file():
            found[rel] = ("file", path.read_bytes(), st.st_mode)
        else:
            found[rel] = ("dir", b"", st.st_mode)
    return found


def install_collection(tmp: Path, env: dict[str, str]) -> Path:
    """`ansible-galaxy collection build` the checkout's ansible/ and install it under tmp."""
    dist, dest = tmp / "dist", tmp / "collections"

    def galaxy(*argv: str) -> None:
        proc = subprocess.run(
            [str(ANSIBLE_GALAXY), *argv], capture_output=True, text=True, timeout=120,
            env=env, cwd=tmp, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr

    galaxy("collection", "build", str(REPO / "ansible"), "--output-path", str(dist))
    (tarball,) = dist.glob("*.tar.gz")
    galaxy("collection", "install", "-p", str(dest), str(tarball))
    assert (dest / "ansible_collections/spegel_node/spegel_node/roles/spegel_node").is_dir()
    return dest


def test_parse_recap() -> None:
    out = (
        "PLAY RECAP *****\n"
        "node-1   : ok=20   changed=0    unreachable=0    failed=0    skipped=3    "
        "rescued=0    ignored=0   \n"
    )
    assert parse_recap(out) == {
        "node-1": {
            "ok": 20,
            "changed": 0,
            "unreachable": 0,
            "failed": 0,
            "skipped": 3,
            "rescued": 0,
            "ignored": 0,
        }
    }


@pytest.fixture(scope="module")
def base() -> Path:
    reason = nspawn.unavailable_reason()
    if reason:
        pytest.skip(reason)
    if not ANSIBLE_PLAYBOOK.exists():
        pytest.skip(f"{ANSIBLE_PLAYBOOK} missing (make installs the dev extra: ansible)")
    return nspawn.ensure_base_image()


def start_standin(node: nspawn.NspawnNode) -> None:
    """docker-registry on 127.0.0.1:29999 in the node, as a transient unit: Spegel's stand-in."""
    config = node.path("/etc/spegel-standin/config.yml")
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(STANDIN_CONFIG)
    node.run(
        "systemd-run", "--unit=spegel-standin", "--quiet", "--property=Restart=on-failure",
        "/usr/bin/docker-registry", "serve", "/etc/spegel-standin/config.yml",
    )  # fmt: skip


def v2_answers(node: nspawn.NspawnNode) -> bool:
    probe = (
        "import urllib.request,sys\n"
        f"try: urllib.request.urlopen('{MIRROR}/v2/', timeout=1); sys.exit(0)\n"
        "except Exception: sys.exit(1)\n"
    )
    return node.run("python3", "-c", probe, check=False).returncode == 0


class Ansible:
    def __init__(self, tmp: Path, nodes: list[nspawn.NspawnNode], wheels: Path) -> None:
        self.tmp = tmp
        self.inventory = tmp / "inventory.ini"
        lines = ["[spegel_nodes]"]
        for node in nodes:
            lines.append(
                f"{node.name} ansible_connection=community.docker.nsenter "
                f"ansible_nsenter_pid={node.leader} ansible_python_interpreter=/usr/bin/python3 "
                "ansible_become=false"
            )
        self.inventory.write_text("\n".join(lines) + "\n")
        self.extra = tmp / "vars.json"
        self.extra.write_text(
            json.dumps(
                {
                    "spegel_node_wheelhouse": str(wheels),
                    "spegel_node_node_ip": "127.0.0.1",
                    "spegel_node_registries": REGISTRIES,
                    "spegel_node_configure_containerd": True,
                    "spegel_node_fail_on_doctor": True,
                }
            )
        )
        home = tmp / "ansible-home"
        home.mkdir()
        self.env = {
            "PATH": f"{ANSIBLE_PLAYBOOK.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "ANSIBLE_CONFIG": str(REPO / "ansible" / "ansible.cfg"),
            "ANSIBLE_HOME": str(home),
            "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_STDOUT_CALLBACK": "default",
        }
        self.env["ANSIBLE_COLLECTIONS_PATH"] = str(install_collection(tmp, self.env))
        self.fqcn_playbook = tmp / "rollout-fqcn.yml"
        self.fqcn_playbook.write_text(FQCN_PLAYBOOK)
        self.outputs: list[str] = []

    def playbook(
        self, *args: str, playbook: Path = PLAYBOOK
    ) -> tuple[str, dict[str, dict[str, int]]]:
        argv = [
            str(ANSIBLE_PLAYBOOK), "-i", str(self.inventory), "-e", f"@{self.extra}",
            *args, str(playbook),
        ]  # fmt: skip
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=PLAYBOOK_TIMEOUT, env=self.env,
            cwd=self.tmp, check=False,
        )  # fmt: skip
        output = proc.stdout + proc.stderr
        self.outputs.append(output)
        (self.tmp / f"ansible-run-{len(self.outputs)}.log").write_text(output)
        assert proc.returncode == 0, f"ansible-playbook {' '.join(args)} failed:\n{output[-6000:]}"
        return output, parse_recap(proc.stdout)


def hosts_toml(node: nspawn.NspawnNode, registry: str) -> str:
    host = registry.split("://", 1)[1]
    return node.path(f"{HOSTS_DIR}/{host}/hosts.toml").read_text()


def mirror_first(text: str) -> bool:
    hosts = list(tomllib.loads(text).get("host", {}))
    return bool(hosts) and hosts[0] == MIRROR


def test_rollout_playbook_on_two_nspawn_nodes(
    base: Path, tmp_path: Path, record_property: pytest.RecordProperty
) -> None:
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    wheels = nspawn.build_wheelhouse(REPO, tmp_path / "wheels")
    timings["wheelhouse"] = time.monotonic() - t0

    t0 = time.monotonic()
    with nspawn.boot_nodes(base, *NODES) as nodes:
        timings["boot"] = time.monotonic() - t0
        for node in nodes:
            start_standin(node)
        for node in nodes:
            node.wait_for(lambda n=node: v2_answers(n), timeout=20, what="stand-in /v2/")
        ansible = Ansible(tmp_path, nodes, wheels)
        # Before the role: Debian's containerd does not read any hosts dir.
        assert 'config_path = ""' in nodes[0].run("containerd", "config", "dump").stdout
        # A person's own hosts.toml files; the hosts dir as it is before the rollout.
        for node in nodes:
            for rel, text in PERSONS_FILES.items():
                path = node.path(f"{HOSTS_DIR}/{rel}")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                path.chmod(0o640)
            for role_path in ROLE_PATHS:
                assert not os.path.lexists(node.path(role_path)), (node.name, role_path)
        before = {node.name: snapshot(node.path(HOSTS_DIR)) for node in nodes}

        # Run 1, the role from the built and installed collection: installs and configures
        # everything.
        t0 = time.monotonic()
        out1, recap1 = ansible.playbook(playbook=ansible.fqcn_playbook)
        timings["run1"] = time.monotonic() - t0
        assert set(recap1) == set(NODES), out1[-3000:]
        for name, counts in recap1.items():
            assert counts["failed"] == 0 and counts["unreachable"] == 0, (name, counts)
            assert counts["changed"] > 0, (name, counts)

        # Run 2: nothing left to do.
        t0 = time.monotonic()
        out2, recap2 = ansible.playbook()
        timings["run2"] = time.monotonic() - t0
        for name, counts in recap2.items():
            assert counts["changed"] == 0, (name, counts, changed_tasks(out2))
            assert counts["failed"] == 0

        # --check --diff: also nothing, and nothing written.
        t0 = time.monotonic()
        out3, recap3 = ansible.playbook("--check", "--diff")
        timings["check"] = time.monotonic() - t0
        for name, counts in recap3.items():
            assert counts["changed"] == 0, (name, counts, changed_tasks(out3))
            assert counts["failed"] == 0

        for node in nodes:
            # spegel-node installed offline into the venv and linked onto PATH.
            version = node.run("spegel-node", "--version").stdout
            assert version.startswith("spegel-node "), version
            assert node.path("/usr/local/bin/spegel-node").is_symlink()
            config = tomllib.loads(node.path("/etc/spegel-node/config.toml").read_text())
            assert config["node_ip"] == "127.0.0.1" and config["registries"] == REGISTRIES
            assert node.path("/etc/spegel-node/config.toml").read_text().startswith("#")
            # The units are enabled and running.
            for unit in UNITS:
                assert node.systemctl("is-enabled", unit).stdout.strip() == "enabled", unit
                assert node.systemctl("is-active", unit).stdout.strip() == "active", unit
            # Every mirrored registry's hosts.toml lists the mirror first.
            for registry in REGISTRIES:
                text = hosts_toml(node, registry)
                assert mirror_first(text), (node.name, registry, text)
            # containerd restarted with config_path set (the role's opt-in).
            dump = node.run("containerd", "config", "dump").stdout
            assert f'config_path = "{HOSTS_DIR}"' in dump
            assert "discard_unpacked_layers = false" in dump
            assert node.systemctl("is-active", "containerd").stdout.strip() == "active"
            # doctor passes on the node, as the role checked.
            doctor = json.loads(node.run("spegel-node", "doctor", "--output", "json").stdout)
            assert doctor["ok"] is True, [c for c in doctor["checks"] if c["status"] == "fail"]

        # Drift in one node: a hosts.toml without the mirror renamed over the managed one.
        node1, node2 = nodes
        other_before = hosts_toml(node2, "https://ghcr.io")
        node1.wait_for(
            lambda: (
                node1.systemctl(
                    "show", "--property=SubState", "--value", "spegel-node-repair.service"
                ).stdout.strip()
                == "dead"
            ),
            timeout=30,
            what="spegel-node-repair.service idle",
        )
        t0 = time.monotonic()
        node1.replace_file(f"{HOSTS_DIR}/ghcr.io/hosts.toml", 'server = "https://ghcr.io"\n')
        assert not mirror_first(hosts_toml(node1, "https://ghcr.io"))
        try:
            node1.wait_for(
                lambda: mirror_first(hosts_toml(node1, "https://ghcr.io")),
                timeout=30,
                what="ghcr.io/hosts.toml repaired by the path unit",
                interval=0.05,
            )
        except TimeoutError as e:
            status = node1.systemctl("status", "--no-pager", *UNITS, check=False).stdout
            units = "\n".join(
                node1.path(f"/etc/systemd/system/{u}").read_text()
                for u in ("spegel-node-repair.service", "spegel-node-repair.path")
            )
            raise AssertionError(
                f"{e}\ntimings {timings}\n{status}\n{units}\n"
                f"{node1.journal('spegel-node-repair.service')[-4000:]}"
            ) from e
        timings["drift_repair"] = time.monotonic() - t0
        journal = node1.journal("spegel-node-repair.service")
        assert "ghcr.io/hosts.toml" in journal, journal  # the repair run's report
        assert hosts_toml(node2, "https://ghcr.io") == other_before

        # playbooks/doctor.yml: one summary, a row per node and the counts, changed=0.
        expected_rows, counts = [], {}
        for node in nodes:
            result = json.loads(
                node.run("spegel-node", "doctor", "--output", "json", check=False).stdout
            )
            ids = {
                status: [c["id"] for c in result["checks"] if c["status"] == status]
                for status in ("fail", "warn")
            }
            expected_rows.append(
                [node.name, result["flavor"], ",".join(ids["fail"]) or "-",
                 ",".join(ids["warn"]) or "-", "-"]
            )  # fmt: skip
            for status, found in ids.items():
                for check_id in found:
                    counts.setdefault(check_id, {"fail": 0, "warn": 0})[status] += 1
        t0 = time.monotonic()
        out4, recap4 = ansible.playbook(playbook=DOCTOR_PLAYBOOK)
        timings["doctor_playbook"] = time.monotonic() - t0
        assert set(recap4) == set(NODES)
        for name, counts4 in recap4.items():
            assert counts4["changed"] == 0 and counts4["failed"] == 0, (name, counts4)
        assert out4.count("TASK [Summarise the fleet]") == 1
        summary = fleet_summary(out4)
        print("\n".join(summary))
        assert [line.split() for line in summary[: len(nodes) + 1]] == [
            ["node", "flavor", "failed", "warned", "ignored"],
            *expected_rows,
        ]
        assert expected_rows[0][1] == "containerd"
        assert summary[len(nodes) + 1] == ""
        tail = [line.split() for line in summary[len(nodes) + 2 :]]
        assert tail[0] == ["check", "failed", "warned"]
        if counts:
            assert tail[1:] == [
                [check_id, str(n["fail"]), str(n["warn"])] for check_id, n in sorted(counts.items())
            ]
        else:
            assert summary[-1] == "(no check failed or warned on any node)"

        # playbooks/remove.yml --check: says what would go, touches nothing.
        rolled_out = {node.name: snapshot(node.path(HOSTS_DIR)) for node in nodes}
        _, recap_check = ansible.playbook("--check", playbook=REMOVE_PLAYBOOK)
        for node in nodes:
            assert recap_check[node.name]["changed"] > 0 and recap_check[node.name]["failed"] == 0
            assert snapshot(node.path(HOSTS_DIR)) == rolled_out[node.name], node.name
            for unit in UNITS:
                assert node.systemctl("is-active", unit).stdout.strip() == "active", unit
            assert node.path("/opt/spegel-node/bin/spegel-node").exists()

        # playbooks/remove.yml: every node as it was before the rollout.
        t0 = time.monotonic()
        out5, recap5 = ansible.playbook(playbook=REMOVE_PLAYBOOK)
        timings["remove_playbook"] = time.monotonic() - t0
        for name, counts5 in recap5.items():
            assert counts5["failed"] == 0 and counts5["changed"] > 0, (name, counts5)
        for node in nodes:
            after = snapshot(node.path(HOSTS_DIR))
            expected = dict(before[node.name])
            if node is node1:
                # The file a "person" renamed in after the rollout is theirs: kept as written.
                drift = after.pop("ghcr.io/hosts.toml", None)
                after.pop("ghcr.io", None)
                assert drift is not None and drift[1] == b'server = "https://ghcr.io"\n', drift
            assert after == expected, (node.name, set(after) ^ set(expected))
            for role_path in ROLE_PATHS:
                assert not os.path.lexists(node.path(role_path)), (node.name, role_path)
            listed = node.systemctl("list-unit-files", "--no-legend", "spegel-node*", check=False)
            assert listed.stdout.strip() == "", listed.stdout
            for unit in UNITS:
                state = node.systemctl("is-active", unit, check=False).stdout.strip()
                assert state == "inactive", (unit, state)
            assert node.systemctl("is-active", "containerd").stdout.strip() == "active"
        # A second remove: nothing left to do.
        out6, recap6 = ansible.playbook(playbook=REMOVE_PLAYBOOK)
        for name, counts6 in recap6.items():
            assert counts6["changed"] == 0 and counts6["failed"] == 0, (
                name, counts6, changed_tasks(out6),
            )  # fmt: skip

        runs = (("run1", out1), ("run2", out2), ("check", out3), ("doctor", out4),
                ("remove", out5), ("remove2", out6))  # fmt: skip
        for name, out in runs:
            for line in recap_lines(out):
                print(f"{name}: {line}")

    for key, seconds in timings.items():
        record_property(key, round(seconds, 2))
    print("ansible timing: " + ", ".join(f"{k}={v:.1f}s" for k, v in timings.items()))
    assert shutil.which("nsenter")
