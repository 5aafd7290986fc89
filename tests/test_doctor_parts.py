"""doctor's parts on their own: image references, registries.yaml, Prometheus text, the runner,
the containerd socket client and the HTTP probe."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
from support.fake_containerd import FakeContainerd, cri_config
from support.sandbox import HangingServer, free_port

from spegel_node.doctor import cri
from spegel_node.doctor.checks.distro import registries_yaml_mirrors
from spegel_node.doctor.facts import Facts
from spegel_node.doctor.imageref import ImageRef, parse_image_ref
from spegel_node.doctor.model import Check, CheckResult, Status
from spegel_node.doctor.probes import http_request
from spegel_node.doctor.promtext import parse_samples, render_textfile
from spegel_node.doctor.runner import build_and_run, run_checks
from spegel_node.errors import BadInput
from spegel_node.node import Node
from spegel_node.settings import settings_from_mapping

DIGEST = "sha256:" + "a" * 64

# --- image references ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "registry", "repository", "tag", "digest"),
    [
        ("alpine", "docker.io", "library/alpine", "latest", None),
        ("alpine:3.20", "docker.io", "library/alpine", "3.20", None),
        ("library/alpine:3.20", "docker.io", "library/alpine", "3.20", None),
        ("docker.io/alpine", "docker.io", "library/alpine", "latest", None),
        ("index.docker.io/library/alpine:1", "docker.io", "library/alpine", "1", None),
        ("bitnami/redis:7.2", "docker.io", "bitnami/redis", "7.2", None),
        (f"ghcr.io/x/y@{DIGEST}", "ghcr.io", "x/y", None, DIGEST),
        (f"ghcr.io/x/y:v1@{DIGEST}", "ghcr.io", "x/y", "v1", DIGEST),
        ("ghcr.io/spegel-org/spegel:v0.7.4", "ghcr.io", "spegel-org/spegel", "v0.7.4", None),
        ("localhost:5000/x", "localhost:5000", "x", "latest", None),
        ("localhost/x:1", "localhost", "x", "1", None),
        ("127.0.0.1:5000/sandbox/hello:v1", "127.0.0.1:5000", "sandbox/hello", "v1", None),
        ("registry.k8s.io/pause:3.10", "registry.k8s.io", "pause", "3.10", None),
        ("Quay.IO/org/app", "quay.io", "org/app", "latest", None),
        ("[::1]:5000/x:2", "[::1]:5000", "x", "2", None),
        ("my-registry:5000/a/b/c:t_1.0-x", "my-registry:5000", "a/b/c", "t_1.0-x", None),
    ],
)
def test_image_reference_is_normalised_like_containerd(
    raw: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    assert parse_image_ref(raw) == ImageRef(registry, repository, tag, digest)


def test_manifest_request_names_digest_before_tag_and_the_registry() -> None:
    ref = parse_image_ref(f"ghcr.io/x/y:v1@{DIGEST}")
    assert ref.manifest_path == f"/v2/x/y/manifests/{DIGEST}?ns=ghcr.io"
    assert parse_image_ref("alpine:3.20").manifest_path == (
        "/v2/library/alpine/manifests/3.20?ns=docker.io"
    )
    assert str(parse_image_ref("alpine")) == "docker.io/library/alpine:latest"


@pytest.mark.parametrize(
    "raw",
    ["", "Alpine", "alpine:", "alpine:bad/tag", "a b", "x@sha256:zz", "ghcr.io/", "ghcr.io/UP/x"],
)
def test_invalid_image_reference_is_bad_input(raw: str) -> None:
    with pytest.raises(BadInput):
        parse_image_ref(raw)


# --- registries.yaml -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'mirrors:\n  docker.io:\n    endpoint:\n      - "https://a.example.com"\n',
            {"docker.io": ["https://a.example.com"]},
        ),
        (
            'mirrors:\n  "registry.example.com:5000":\n    endpoint: [\'http://x:1\', "http://y:2"]\n'
            "  '*':\n    endpoint:\n    - http://z:3  # comment\n"
            "configs:\n  docker.io:\n    auth:\n      username: u\n",
            {
                "registry.example.com:5000": ["http://x:1", "http://y:2"],
                "*": ["http://z:3"],
            },
        ),
        (
            "# nothing mirrored\nconfigs:\n  ghcr.io:\n    tls:\n      insecure_skip_verify: true\n",
            {},
        ),
        (
            "mirrors:\n  docker.io:\n    rewrite:\n      '^(.*)$': 'mirror/$1'\n    endpoint:\n"
            "      - https://m.example.com\n  quay.io: {}\n",
            {"docker.io": ["https://m.example.com"], "quay.io": []},
        ),
    ],
)
def test_registries_yaml_mirrors(text: str, expected: dict[str, list[str]]) -> None:
    assert registries_yaml_mirrors(text) == expected


# --- Prometheus text -----------------------------------------------------------------------------


def test_parse_samples_reads_labels_and_skips_junk() -> None:
    text = (
        "# HELP spegel_mirror_requests_total x\n"
        "# TYPE spegel_mirror_requests_total counter\n"
        'spegel_mirror_requests_total{cache="hit",registry="docker.io"} 12\n'
        'spegel_mirror_requests_total{registry="ghcr.io",cache="miss"} 3 1700000000000\n'
        "spegel_mirror_last_success_timestamp_seconds 1.7e+09\n"
        'odd{label="a \\"quoted\\" value"} NaN\n'
        "not a sample line\n"
    )
    samples = list(parse_samples(text))
    assert [(s.name, s.labels.get("cache"), s.value) for s in samples[:3]] == [
        ("spegel_mirror_requests_total", "hit", 12.0),
        ("spegel_mirror_requests_total", "miss", 3.0),
        ("spegel_mirror_last_success_timestamp_seconds", None, 1.7e9),
    ]
    assert samples[3].labels == {"label": 'a "quoted" value'}
    assert len(samples) == 4


def test_textfile_is_one_state_set_per_check() -> None:
    results = [
        CheckResult("spegel.v2", "spegel", Status.FAIL, "x", duration_s=0.25),
        CheckResult('hosts.a"b', "hosts", Status.PASS, "y"),
    ]
    text = render_textfile(results, 0.41, 1700000000.5, ok=False)
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in parse_samples(text)}
    key = ("spegel_node_check_status", (("id", "spegel.v2"), ("status", "fail")))
    assert values[key] == 1
    assert values[("spegel_node_check_status", (("id", "spegel.v2"), ("status", "pass")))] == 0
    assert values[("spegel_node_check_status", (("id", 'hosts.a"b'), ("status", "pass")))] == 1
    assert values[("spegel_node_doctor_ok", ())] == 0
    assert values[("spegel_node_doctor_duration_seconds", ())] == 0.41
    assert values[("spegel_node_doctor_last_run_timestamp_seconds", ())] == 1700000000.5
    assert values[("spegel_node_doctor_checks", (("status", "fail"),))] == 1
    assert sum(1 for s in parse_samples(text) if s.name == "spegel_node_check_status") == 8


# --- the runner ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fixed(Check):
    area: ClassVar[str] = "layout"
    name: str
    delay: float = 0.0
    crash: bool = False

    @property
    def id(self) -> str:
        return self.name

    def run(self, facts: Facts) -> CheckResult:
        time.sleep(self.delay)
        if self.crash:
            raise RuntimeError("boom: Authorization=https://user:pw@example.com/x")
        return self.passed(f"{self.name} ok")


@pytest.fixture
def facts(tmp_path: Path) -> Facts:
    return Facts(Node(tmp_path), settings_from_mapping({"node_ip": "127.0.0.1"}))


def test_a_crashing_check_is_its_own_failure_and_the_others_run(facts: Facts) -> None:
    checks = [_Fixed("a", 0.05), _Fixed("b", crash=True), _Fixed("c")]
    run = run_checks(checks, facts, deadline_s=2)
    assert [r.id for r in run.results] == ["a", "b", "c"]
    assert [r.status for r in run.results] == [Status.PASS, Status.FAIL, Status.PASS]
    crashed = run.results[1]
    assert crashed.summary.startswith("check crashed: RuntimeError: boom")
    assert "pw@" not in crashed.summary
    assert "bug in spegel-node" in crashed.remediation
    assert not run.ok


def test_checks_run_concurrently_and_print_in_fixed_order(facts: Facts) -> None:
    checks = [_Fixed(f"c{i}", delay=0.3 - i * 0.05) for i in range(6)]
    started = time.monotonic()
    run = run_checks(checks, facts, deadline_s=3)
    assert time.monotonic() - started < 0.6
    assert [r.id for r in run.results] == [f"c{i}" for i in range(6)]
    assert run.ok


def test_building_the_checks_runs_inside_the_crash_guard(facts: Facts) -> None:
    def crash(f: Facts) -> list[Check]:
        raise RuntimeError("detect broke: https://user:pw@example.com")

    run = build_and_run(crash, facts, 2, first=("layout.detected", "layout"))
    (only,) = run.results
    assert only.id == "layout.detected" and only.status is Status.FAIL
    assert only.summary.startswith("check crashed: RuntimeError: detect broke")
    assert "pw@" not in only.summary and not run.ok


def test_building_the_checks_runs_inside_the_deadline(facts: Facts) -> None:
    release = threading.Event()

    def hang(f: Facts) -> list[Check]:
        release.wait()
        return []

    try:
        run = build_and_run(hang, facts, 0.2, first=("layout.detected", "layout"))
    finally:
        release.set()
    (only,) = run.results
    assert only.status is Status.FAIL and "did not finish within 0.2s" in only.summary


def test_the_built_checks_share_the_remaining_deadline(facts: Facts) -> None:
    run = build_and_run(lambda f: [_Fixed("a"), _Fixed("b")], facts, 2, first=("x", "layout"))
    assert [r.id for r in run.results] == ["a", "b"] and run.ok


def test_an_unfinished_check_fails_at_the_deadline(facts: Facts) -> None:
    started = time.monotonic()
    run = run_checks([_Fixed("slow", delay=5), _Fixed("fast")], facts, deadline_s=0.3)
    assert time.monotonic() - started < 1
    slow, fast = run.results
    assert slow.status is Status.FAIL and slow.summary == "did not finish within 0.3s"
    assert fast.status is Status.PASS


# --- the containerd socket client ----------------------------------------------------------------


def test_socket_client_reads_version_and_live_cri_config(tmp_path: Path) -> None:
    sock = tmp_path / "c.sock"
    config = cri_config("/a:/b", discard_unpacked_layers=True, use_local_image_pull=False)
    with FakeContainerd(sock, version="v2.1.4", config=config) as fake:
        answer = cri.query(sock, 1.0)
    assert answer.state == "ok"
    assert (answer.version, answer.revision) == ("v2.1.4", "fake-revision")
    assert '"configPath": "/a:/b"' in answer.info["config"]
    assert sorted(fake.calls) == sorted([cri.VERSION_PATH, cri.STATUS_PATH])


def test_socket_client_on_a_long_path(tmp_path: Path) -> None:
    sock = tmp_path / ("d" * 120) / "containerd.sock"
    with FakeContainerd(sock):
        assert cri.query(sock, 1.0).state == "ok"


@pytest.mark.parametrize(
    ("mode", "state"),
    [("hang", "no_answer"), ("garbage", "error"), ("no_cri", "ok")],
)
def test_socket_client_misbehaving_servers(tmp_path: Path, mode: str, state: str) -> None:
    sock = tmp_path / "c.sock"
    with FakeContainerd(sock, mode=mode):
        started = time.monotonic()
        answer = cri.query(sock, 0.5)
    assert time.monotonic() - started < 0.9
    assert answer.state == state
    if mode == "no_cri":
        assert answer.version and not answer.info and "CRI" in answer.status_error


def test_socket_client_missing_placeholder_and_stale(tmp_path: Path) -> None:
    assert cri.query(tmp_path / "none.sock", 0.5).state == "missing"
    (tmp_path / "file.sock").touch()
    assert cri.query(tmp_path / "file.sock", 0.5).state == "not_socket"
    import socket as socket_mod

    stale = socket_mod.socket(socket_mod.AF_UNIX)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()  # the file stays, nobody listens
    assert cri.query(tmp_path / "stale.sock", 0.5).state == "refused"


# --- the HTTP probe ------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://192.0.2.1/elsewhere")
            self.end_headers()
            return
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def web() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_probe_outcomes(web: str, hanging_server: HangingServer) -> None:
    assert http_request(f"{web}/v2/", timeout=1).status == 200
    redirect = http_request(f"{web}/redirect", timeout=1)
    assert redirect.status == 302  # not followed
    refused = http_request(f"http://127.0.0.1:{free_port()}/v2/", timeout=1)
    assert (refused.status, refused.error) == (None, "connection refused")
    started = time.monotonic()
    hung = http_request(f"{hanging_server.url}/v2/", timeout=0.3)
    assert time.monotonic() - started < 0.8
    assert hung.timed_out and hung.error == "no answer within 0.3s"
    assert http_request("https://example.com/", timeout=1).error.startswith("cannot probe")


# --- live config fallback: crictl info -----------------------------------------------------------


def test_crictl_info_is_the_fallback_for_the_live_config(tmp_path: Path) -> None:
    root = tmp_path / "node"
    (root / "etc/containerd").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text("version = 2\n")
    crictl = tmp_path / "crictl"
    info = {"config": cri_config("/from/crictl", discard_unpacked_layers=True)}
    crictl.write_text(f"#!/bin/sh\ncat <<'EOF'\n{json.dumps(info)}\nEOF\n")
    crictl.chmod(0o755)
    node = Node(root)
    with FakeContainerd(root / "run/containerd/containerd.sock", mode="no_cri"):
        facts = Facts(
            node,
            settings_from_mapping({"node_ip": "127.0.0.1"}),
            live=True,
            processes=[],
            crictl_binaries=[str(crictl)],
        )
        live = facts.live_config
    assert live is not None
    assert live.config_path == "/from/crictl" and live.discard_unpacked_layers is True
    assert live.source == f"`{crictl} info`"
    assert facts.setting("discard_unpacked_layers").value is True
