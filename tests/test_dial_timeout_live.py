"""What a real containerd (2.3.7, which honours dial_timeout) does with the dial_timeout values
validate warns about, pulling through a mirror that works: a negative one makes every dial to
the mirror fail at once, so the pull goes upstream (`dial_timeout.negative`); zero is no dial
timeout at all, and a mirror that answers is used (`dial_timeout.zero`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from peers.build import CONTAINERD_VERSIONS
from support.sandbox import Sandbox

pytestmark = pytest.mark.sandbox


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(containerd_version=CONTAINERD_VERSIONS["2.3"]) as sb:
        yield sb


def hosts_toml(sb: Sandbox, dial_timeout: str) -> str:
    return (
        f'server = "{sb.upstream.url}"\n\n'
        f'[host."{sb.spegel.url}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
        f'  dial_timeout = "{dial_timeout}"\n'
    )


@pytest.mark.parametrize(("value", "via_mirror"), [("-1s", False), ("0s", True), ("1s", True)])
def test_negative_dial_timeout_skips_the_mirror(
    sandbox: Sandbox, value: str, via_mirror: bool
) -> None:
    sandbox.reset()
    sandbox.write_hosts_toml(hosts_toml(sandbox, value))
    sandbox.mark_logs()
    result = sandbox.pull()
    assert result.returncode == 0, result.stderr
    mirror = sandbox.spegel.containerd_requests()
    upstream = sandbox.upstream.containerd_requests()
    if via_mirror:
        assert mirror and not upstream, (mirror, upstream)
    else:
        assert upstream and not mirror, (mirror, upstream)
