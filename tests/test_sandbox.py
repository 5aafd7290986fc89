"""Facts the project relies on, pinned against a real containerd and real registries."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
from support.sandbox import (
    PROXY_USER_AGENT,
    HangingServer,
    Request,
    Sandbox,
    missing_binaries,
    parse_access_log,
)

pytestmark = pytest.mark.sandbox

CONTAINERD_LINE = (
    '127.0.0.1 - - [27/Nov/2026:15:47:17 +0000] "HEAD /v2/demo/hello/manifests/v1'
    '?ns=127.0.0.1%3A15001 HTTP/1.1" 200 401 "" "containerd/1.6.20~ds1"'
)


def mirror_hosts_toml(sb: Sandbox, extra: str = "") -> str:
    """REFERENCE section 2's shape: server = upstream, the Spegel stand-in first."""
    return (
        f'server = "{sb.upstream.url}"\n\n'
        f'[host."{sb.spegel.url}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
        f"{extra}"
    )


def assert_pulled(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr


def assert_served_by_mirror(sb: Sandbox) -> None:
    mirror = sb.spegel.containerd_requests()
    assert mirror, sb.spegel.requests()
    assert sb.upstream.containerd_requests() == []
    assert {r.ns for r in mirror} == {sb.upstream.host}
    assert any("/blobs/sha256:" in r.path for r in mirror)


def assert_served_by_upstream(sb: Sandbox) -> None:
    assert sb.upstream.containerd_requests()
    assert sb.spegel.containerd_requests() == []


def test_parse_access_log_keeps_query_and_user_agent() -> None:
    noise = 'time="..." level=info msg="listening on 127.0.0.1:5000"'
    requests = parse_access_log(f"{noise}\n\x00\x00{CONTAINERD_LINE}\n")
    assert requests == [
        Request(
            method="HEAD",
            path="/v2/demo/hello/manifests/v1?ns=127.0.0.1%3A15001",
            status=200,
            user_agent="containerd/1.6.20~ds1",
        )
    ]
    assert requests[0].ns == "127.0.0.1:15001"
    assert requests[0].from_containerd


def test_mirror_listed_first_serves_the_pull(sandbox: Sandbox) -> None:
    sandbox.write_hosts_toml(mirror_hosts_toml(sandbox))
    assert_pulled(sandbox.pull())
    assert_served_by_mirror(sandbox)
    # containerd's user agent names its version; the cache fetches upstream as Go's default.
    agents = {r.user_agent for r in sandbox.spegel.containerd_requests()}
    assert agents == {sandbox.containerd.user_agent}
    assert sandbox.containerd.user_agent.startswith("containerd/1.6.")
    assert PROXY_USER_AGENT in {r.user_agent for r in sandbox.upstream.requests()}


def test_without_hosts_toml_the_pull_goes_upstream(sandbox: Sandbox) -> None:
    assert_pulled(sandbox.pull())
    assert_served_by_upstream(sandbox)
    assert all(r.ns is None for r in sandbox.upstream.containerd_requests())


def test_stopped_mirror_falls_back_to_upstream_and_comes_back(sandbox: Sandbox) -> None:
    sandbox.write_hosts_toml(mirror_hosts_toml(sandbox))
    sandbox.spegel.stop()
    result = sandbox.pull()
    assert_pulled(result)
    assert "trying next host" in result.stderr
    assert "connection refused" in result.stderr
    assert_served_by_upstream(sandbox)

    sandbox.spegel.start()
    sandbox.mark_logs()
    assert_pulled(sandbox.pull())
    assert_served_by_mirror(sandbox)


def test_malformed_hosts_toml_is_dropped_silently(sandbox: Sandbox) -> None:
    text = f'server = "{sandbox.upstream.url}"\n\n[host."{sandbox.spegel.url}"]\n'
    sandbox.write_hosts_toml(text + '  capabilities = "pull"\n')
    result = sandbox.pull()
    assert_pulled(result)
    # ctr parses --hosts-dir client-side: the error lands on its stderr, the pull goes on.
    assert "failed to decode hosts.toml" in result.stderr
    assert "Can't convert pull(string) to []string(slice)" in result.stderr
    assert_served_by_upstream(sandbox)


def test_dial_timeout_is_accepted_and_ignored_by_containerd_1_6(sandbox: Sandbox) -> None:
    sandbox.write_hosts_toml(mirror_hosts_toml(sandbox, '  dial_timeout = "200ms"\n'))
    result = sandbox.pull()
    assert_pulled(result)
    assert "failed to decode hosts.toml" not in result.stderr
    assert_served_by_mirror(sandbox)


def test_dial_timeout_is_not_honoured_by_containerd_1_6(sandbox: Sandbox) -> None:
    # A dead mirror (SYNs dropped): honoured, 200ms per request would fall back in well under
    # a second; containerd 1.6 keeps waiting its default 30 s per request (measured: 3 x 30 s).
    with HangingServer(complete_handshake=False) as dead:
        sandbox.write_hosts_toml(
            f'server = "{sandbox.upstream.url}"\n\n'
            f'[host."{dead.url}"]\n'
            '  capabilities = ["pull", "resolve"]\n'
            '  dial_timeout = "200ms"\n'
        )
        with pytest.raises(subprocess.TimeoutExpired):
            sandbox.containerd.pull(sandbox.image_ref, timeout=2.5)
    assert sandbox.upstream.containerd_requests() == []


def test_forget_forces_a_real_refetch_but_a_new_namespace_does_not(sandbox: Sandbox) -> None:
    sandbox.write_hosts_toml(mirror_hosts_toml(sandbox))

    def blob_gets(requests: list[Request]) -> int:
        return sum(r.method == "GET" and "/blobs/" in r.path for r in requests)

    assert_pulled(sandbox.pull(keep=True))
    first = blob_gets(sandbox.spegel.wait_for_requests(lambda rs: blob_gets(rs) >= 2))
    assert first == 2  # config + layer

    assert_pulled(sandbox.pull(namespace="elsewhere"))  # blobs are shared across namespaces
    assert blob_gets(sandbox.spegel.requests()) == first

    sandbox.containerd.forget(sandbox.image_ref)
    assert sandbox.containerd.content_digests() == []
    assert_pulled(sandbox.pull())
    total = blob_gets(sandbox.spegel.wait_for_requests(lambda rs: blob_gets(rs) >= 2 * first))
    assert total == 2 * first


def test_pushed_images_are_distinct(sandbox: Sandbox) -> None:
    other = sandbox.push_image("team/other", "v2")
    assert other == f"{sandbox.upstream.host}/team/other:v2"
    sandbox.write_hosts_toml(mirror_hosts_toml(sandbox))
    assert_pulled(sandbox.pull(other))
    assert all("/team/other/" in r.path for r in sandbox.spegel.containerd_requests())


def test_restart_keeps_port_and_storage(sandbox: Sandbox) -> None:
    port = sandbox.spegel.port
    sandbox.spegel.stop()
    assert not sandbox.spegel.running
    sandbox.spegel.start()
    assert sandbox.spegel.port == port
    assert sandbox.spegel.running


def test_hanging_server_accepts_and_never_answers(hanging_server: HangingServer) -> None:
    with socket.create_connection(("127.0.0.1", hanging_server.port), timeout=2) as conn:
        conn.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        conn.settimeout(0.3)
        with pytest.raises(TimeoutError):
            conn.recv(1)
    assert hanging_server.connections == 1


def test_dead_server_never_completes_a_handshake() -> None:
    with HangingServer(complete_handshake=False) as dead, socket.socket() as conn:
        conn.settimeout(0.3)
        with pytest.raises(TimeoutError):
            conn.connect(("127.0.0.1", dead.port))


@pytest.mark.skipif(bool(missing_binaries()), reason="needs containerd, docker-registry, skopeo")
def test_sandbox_cleans_up_everything() -> None:
    with Sandbox() as sb:
        pids = [p.pid for p in (sb.containerd, sb.upstream, sb.spegel)]
        root = sb.root
        text = sb.describe()
        assert sb.upstream.url in text
        assert str(sb.containerd.socket) in text
    assert not root.exists()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()


@pytest.mark.skipif(bool(missing_binaries()), reason="needs containerd, docker-registry, skopeo")
def test_sandbox_cleans_up_on_error() -> None:
    with pytest.raises(RuntimeError, match="boom"), Sandbox() as sb:
        root = sb.root
        raise RuntimeError("boom")
    assert not root.exists()
