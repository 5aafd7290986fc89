"""End to end on a real containerd: spegel-node writes the sandbox's hosts dir, containerd pulls.

Every proof comes from the registries' access logs: requests whose user agent is containerd's
(`containerd/<version>`) show which host really served a pull; requests to the Spegel stand-in
carry `?ns=<upstream>`, as containerd sends to any mirror. Pulls use `ctr images pull
--hosts-dir`, which reads hosts.toml with containerd's own parser.

The agent runs on the live root (`--root /`) with the sandbox's paths as overrides, like an
operator on a node whose layout is not a known one. Its record (normally under
/var/lib/spegel-node) is pointed into the test's temp dir so the tests never touch this
machine's record and can run side by side.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.cli import Result, run_cli, tree_state
from support.sandbox import RegistryProc, Request, Sandbox, free_port

from spegel_node import state

pytestmark = pytest.mark.sandbox

# A real (self-signed, EC P-256) certificate: containerd loads every `ca` file before it dials,
# and a file it cannot read or parse fails the pull outright.
PERSON_CA = """\
-----BEGIN CERTIFICATE-----
MIIBijCCATGgAwIBAgIUOkjpu2/Y+bS6CR1y4WzGFVNk/+owCgYIKoZIzj0EAwIw
GjEYMBYGA1UEAwwPcGVyc29uLWNhY2hlLWNhMCAXDTI2MTEyNzE2MDAyMFoYDzIx
MjYxMTAzMTYwMDIwWjAaMRgwFgYDVQQDDA9wZXJzb24tY2FjaGUtY2EwWTATBgcq
hkjOPQIBBggqhkjOPQMBBwNCAAQfMxPwVAqwoqxLGxuu0oNi6Hojy6zxJRVfBwyk
El819ct0fJLrkKkUB3PXT1Bw4fb9+0bVgQ83BV/Jo2N5tkhSo1MwUTAdBgNVHQ4E
FgQUzGtdDp2gg3yR9ixCdJQ3Dly3FT4wHwYDVR0jBBgwFoAUzGtdDp2gg3yR9ixC
dJQ3Dly3FT4wDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNHADBEAiAx+tRN
ru2+idRPqwlxpR7FNpDFkIkZfYka/iC1rVat+wIgAWgsbZ7Ei3OjWOpDHWJeu2vG
GF2dPoYEViIAQSmC8xA=
-----END CERTIFICATE-----
"""
SECRET = "Bearer s3cr3t-t0ken-do-not-print"
BLOBS_PER_PULL = 2  # the sandbox image: one config blob, one layer


@dataclass
class Agent:
    """spegel-node configured for the sandbox, run in-process."""

    sandbox: Sandbox
    capsys: pytest.CaptureFixture[str]
    config: Path
    state_dir: Path

    def configure(self, **keys: object) -> None:
        """Write the config file: the sandbox's registry and mirror, then `keys` on top."""
        values: dict[str, object] = {
            "registries": [self.sandbox.upstream.url],
            "node_ip": "127.0.0.1",
            "host_port": self.sandbox.spegel.port,
            **keys,
        }
        self.config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))

    def __call__(self, *args: str) -> Result:
        sb = self.sandbox
        return run_cli(
            self.capsys,
            *args,
            "--config",
            str(self.config),
            "--hosts-dir",
            str(sb.hosts_dir),
            "--containerd-socket",
            str(sb.containerd.socket),
            "--containerd-config",
            str(sb.containerd.config_path),
        )

    @property
    def record(self) -> Path:
        return self.state_dir / state.STATE_FILE


@pytest.fixture
def agent(
    sandbox: Sandbox,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Iterator[Agent]:
    state_dir = tmp_path / "var-lib-spegel-node"
    monkeypatch.setattr(state, "STATE_DIR", str(state_dir))
    configured = Agent(sandbox, capsys, tmp_path / "config.toml", state_dir)
    configured.configure()
    sandbox.mark_logs()
    yield configured


@dataclass(frozen=True)
class PersonsFile:
    """A hosts.toml a person wrote for the upstream registry before spegel-node came along."""

    path: Path
    text: str
    ca: Path
    cache_url: str  # their own mirror (an https cache that is down: connection refused)


def write_persons_file(sb: Sandbox) -> PersonsFile:
    cache = f"https://127.0.0.1:{free_port()}"
    text = (
        "# Team cache in front of our registry; ticket OPS-42. Do not remove.\n"
        f'server = "{sb.upstream.url}"\n'
        "\n"
        f'[host."{cache}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
        '  ca = "ca.crt"\n'
        f'  [host."{cache}".header]\n'
        f'    Authorization = "{SECRET}"\n'
    )
    path = sb.write_hosts_toml(text)
    ca = path.parent / "ca.crt"
    ca.write_text(PERSON_CA)
    return PersonsFile(path, text, ca, cache)


def hosts_of(path: Path) -> dict[str, dict[str, object]]:
    """The `[host."URL"]` tables of a hosts.toml, in file order."""
    hosts: dict[str, dict[str, object]] = tomllib.loads(path.read_text()).get("host", {})
    return hosts


def blob_gets(requests: list[Request]) -> int:
    return sum(r.from_containerd and r.method == "GET" and "/blobs/" in r.path for r in requests)


def served_by(registry: RegistryProc) -> list[Request]:
    """containerd's requests for one whole pull (manifest and every blob) in `registry`'s log."""
    requests = registry.wait_for_requests(lambda found: blob_gets(found) >= BLOBS_PER_PULL)
    return [r for r in requests if r.from_containerd]


def assert_served_by_spegel(sb: Sandbox) -> list[Request]:
    mirror = served_by(sb.spegel)
    assert {r.ns for r in mirror} == {sb.upstream.host}  # `?ns=` on every mirror request
    assert any("/manifests/" in r.path for r in mirror)
    assert all(r.status == 200 for r in mirror), mirror
    assert sb.upstream.containerd_requests() == []
    return mirror


def assert_served_by_upstream(sb: Sandbox) -> list[Request]:
    direct = served_by(sb.upstream)
    assert all(r.ns is None for r in direct)
    assert sb.spegel.containerd_requests() == []
    return direct


def pull(sb: Sandbox) -> str:
    """Pull the sandbox image afresh (logs marked first); the pull must succeed. Returns stderr."""
    sb.mark_logs()
    result = sb.pull()
    assert result.returncode == 0, result.stderr
    return result.stderr


def content_and_mode(tree: dict[str, tuple[str, int, int]]) -> dict[str, tuple[str, int]]:
    return {path: (content, mode) for path, (content, mode, _) in tree.items()}


# --- 1. merge into a person's file; the pull goes through Spegel --------------------------------


def test_apply_merges_a_persons_file_and_spegel_serves_the_pull(
    sandbox: Sandbox, agent: Agent
) -> None:
    person = write_persons_file(sandbox)
    result = agent("apply", "--no-gate")
    assert result.code == 0, result.err
    assert f"update {person.path}" in result.out
    assert SECRET not in result.out + result.err

    merged = person.path.read_text()
    assert merged.startswith(person.text.splitlines(keepends=True)[0])  # the comment line
    assert tomllib.loads(merged)["server"] == sandbox.upstream.url
    hosts = hosts_of(person.path)
    assert list(hosts) == [sandbox.spegel.url, person.cache_url]  # Spegel first, theirs kept
    assert hosts[sandbox.spegel.url] == {
        "capabilities": ["pull", "resolve"],
        "dial_timeout": "200ms",
    }
    assert hosts[person.cache_url]["ca"] == "ca.crt"
    assert hosts[person.cache_url]["header"] == {"Authorization": SECRET}
    assert person.ca.read_text() == PERSON_CA

    checked = agent("validate")  # containerd's rules, ca file resolved beside the file
    assert checked.code == 0, checked.out
    assert "0 error(s)" in checked.out
    assert SECRET not in checked.out + checked.err

    stderr = pull(sandbox)
    mirror = assert_served_by_spegel(sandbox)
    assert blob_gets(mirror) == BLOBS_PER_PULL
    assert {r.user_agent for r in mirror} == {sandbox.containerd.user_agent}
    assert person.cache_url.removeprefix("https://") not in stderr  # never needed their cache


# --- 2. apply again: nothing to do, nothing touched ------------------------------------------


def test_apply_again_changes_nothing(sandbox: Sandbox, agent: Agent) -> None:
    write_persons_file(sandbox)
    assert agent("apply", "--no-gate").code == 0
    before = tree_state(sandbox.hosts_dir)
    record_mtime = agent.record.stat().st_mtime_ns

    again = agent("apply", "--no-gate")
    assert again.code == 0, again.err
    assert again.out.strip().splitlines()[-1] == "nothing to change"
    assert tree_state(sandbox.hosts_dir) == before  # same bytes, modes and mtimes
    assert agent.record.stat().st_mtime_ns == record_mtime

    gated = agent("apply")  # what the timer runs: probe /v2/, then the same plan
    assert gated.code == 0, gated.err
    assert "HTTP 200; mirror advertised" in gated.out
    assert gated.out.strip().splitlines()[-1] == "nothing to change"
    assert tree_state(sandbox.hosts_dir) == before


# --- 3. remove: the person's file back byte for byte, the pull goes upstream -------------------


def test_remove_restores_the_persons_file_and_the_pull_goes_upstream(
    sandbox: Sandbox, agent: Agent
) -> None:
    # A second registry that has no dir yet: apply creates it, remove must delete it.
    agent.configure(registries=[sandbox.upstream.url, "https://ghcr.io"])
    person = write_persons_file(sandbox)
    original = tree_state(sandbox.hosts_dir)
    applied = agent("apply", "--no-gate")
    assert applied.code == 0, applied.err
    assert (sandbox.hosts_dir / "ghcr.io/hosts.toml").is_file()
    pull(sandbox)
    assert_served_by_spegel(sandbox)

    removed = agent("remove")
    assert removed.code == 0, removed.err
    assert f"restore {person.path}" in removed.out
    assert f"delete {sandbox.hosts_dir}/ghcr.io/hosts.toml" in removed.out
    assert person.path.read_bytes() == person.text.encode()
    after = tree_state(sandbox.hosts_dir)
    assert content_and_mode(after) == content_and_mode(original)  # ghcr.io/ is gone too
    ca_key = f"{sandbox.upstream.host}/ca.crt"
    assert after[ca_key] == original[ca_key]  # not even its mtime moved
    assert not agent.record.exists()

    stderr = pull(sandbox)
    direct = assert_served_by_upstream(sandbox)
    assert blob_gets(direct) == BLOBS_PER_PULL
    # containerd read the restored file: it tried the person's cache (down) before upstream
    assert "trying next host" in stderr
    assert person.cache_url.removeprefix("https://") in stderr


# --- 4. Spegel down: fallback, then the gate withdraws the mirror and restores it -------------


def test_stopped_mirror_falls_back_and_the_gate_withdraws_and_restores_it(
    sandbox: Sandbox, agent: Agent
) -> None:
    failures = 3
    agent.configure(gate_failures=failures)
    assert agent("apply", "--no-gate").code == 0
    managed = sandbox.registry_dir() / "hosts.toml"
    assert list(hosts_of(managed)) == [sandbox.spegel.url]

    sandbox.spegel.stop()
    stderr = pull(sandbox)  # still succeeds: containerd skips the refused mirror
    assert "trying next host" in stderr
    assert f"dial tcp {sandbox.spegel.host}: connect: connection refused" in stderr
    assert blob_gets(assert_served_by_upstream(sandbox)) == BLOBS_PER_PULL

    for attempt in range(1, failures):
        kept = agent("apply")
        assert kept.code == 0, kept.err
        assert f"mirror advertised ({attempt} failures in a row)" in kept.out
        assert list(hosts_of(managed)) == [sandbox.spegel.url]
    withdrawn = agent("apply")
    assert withdrawn.code == 0, withdrawn.err
    assert f"mirror withdrawn ({failures} failures in a row)" in withdrawn.out
    assert f"update {managed}" in withdrawn.out
    assert "gate: withdrawing mirror" in withdrawn.err
    assert hosts_of(managed) == {}
    assert tomllib.loads(managed.read_text())["server"] == sandbox.upstream.url

    stderr = pull(sandbox)
    assert_served_by_upstream(sandbox)
    assert sandbox.spegel.host not in stderr  # straight upstream: the mirror was not tried
    assert "trying next host" not in stderr

    sandbox.spegel.start()
    restored = agent("apply")
    assert restored.code == 0, restored.err
    assert "HTTP 200; mirror advertised" in restored.out
    assert f"update {managed}" in restored.out
    assert "answers again" in restored.err
    assert list(hosts_of(managed)) == [sandbox.spegel.url]

    pull(sandbox)
    assert blob_gets(assert_served_by_spegel(sandbox)) == BLOBS_PER_PULL


# --- 5. _default mode -------------------------------------------------------------------------


def test_default_mode_mirrors_every_registry_through_default(
    sandbox: Sandbox, agent: Agent
) -> None:
    agent.configure(registries=[])
    result = agent("apply", "--no-gate")
    assert result.code == 0, result.err
    default = sandbox.hosts_dir / "_default/hosts.toml"
    assert f"create {default}" in result.out
    assert os.listdir(sandbox.hosts_dir) == ["_default"]  # no per-registry dir needed
    assert "server" not in tomllib.loads(default.read_text())
    assert list(hosts_of(default)) == [sandbox.spegel.url]

    pull(sandbox)
    assert blob_gets(assert_served_by_spegel(sandbox)) == BLOBS_PER_PULL

    assert agent("remove").code == 0
    assert os.listdir(sandbox.hosts_dir) == []


# --- 6. helm-values for this node -------------------------------------------------------------


def test_helm_values_match_the_sandbox_node(sandbox: Sandbox, agent: Agent) -> None:
    text = agent("helm-values")
    assert text.code == 0, text.err
    assert f'containerdSock: "{sandbox.containerd.socket}"' in text.out
    assert f'containerdRegistryConfigPath: "{sandbox.hosts_dir}"' in text.out
    assert "containerdMirrorAdd: false" in text.out
    assert f"hostPort: {sandbox.spegel.port}" in text.out

    values = json.loads(agent("helm-values", "--output", "json").out)
    assert values["spegel"]["containerdSock"] == str(sandbox.containerd.socket)
    assert values["spegel"]["containerdRegistryConfigPath"] == str(sandbox.hosts_dir)
    # the content store of the sandbox's containerd, from its config's `root`
    assert values["spegel"]["containerdContentPath"] == str(
        sandbox.containerd.dir / "root/io.containerd.content.v1.content"
    )
    assert values["spegel"]["containerdMirrorAdd"] is False
    assert values["spegel"]["mirroredRegistries"] == [sandbox.upstream.url]
    assert values["service"]["registry"]["hostPort"] == sandbox.spegel.port
