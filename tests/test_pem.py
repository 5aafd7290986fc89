"""`ca` and `client` files: validate calls an error exactly what containerd cannot load.

containerd (every version in the matrix) fails ConfigureHosts, so every pull of the registry,
on a `ca` file with no loadable certificate ("unable to load CA cert") and on a `client`
cert/key it cannot load or that do not match ("failed to load X509 key pair"): judged here by
each version's own code (tests/judge).
"""

from __future__ import annotations

import base64
import random
import subprocess
from pathlib import Path

import pytest
from support import pki
from support.judge import judge_dir
from support.peers import CONTAINERD_VERSIONS

from spegel_node import pem
from spegel_node.validate import parse_containerd_version, validate_file

VERSIONS = ("1.6.20", *CONTAINERD_VERSIONS.values())


def _corrupt(text: str) -> str:
    """The same PEM with one base64 character of its DER changed (still valid base64)."""
    lines = text.splitlines(keepends=True)
    body = lines[1]
    lines[1] = body[:10] + ("A" if body[10] != "A" else "B") + body[11:]
    return "".join(lines)


def _truncated(text: str) -> str:
    der = pem.blocks(text.encode())[0].der[:-20]
    b64 = base64.b64encode(der).decode()
    return "-----BEGIN CERTIFICATE-----\n" + b64 + "\n-----END CERTIFICATE-----\n"


CA_CASES: dict[str, tuple[str, bool]] = {  # name: (file content, usable)
    "ec": (pki.EC_CERT, True),
    "rsa": (pki.RSA_CERT, True),
    "bundle": (pki.EC_CERT + pki.RSA_CERT, True),
    "junk_then_cert": ("# a comment\n" + pki.RSA_CERT, True),
    "key_then_cert": (pki.EC_KEY + pki.EC_CERT, True),
    "not_pem": ("PEM\n", False),
    "empty": ("", False),
    "a_key": (pki.EC_KEY, False),
    "begin_only": ("-----BEGIN CERTIFICATE-----\n", False),
    "bad_base64": ("-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n", False),
    "truncated_der": (_truncated(pki.EC_CERT), False),
    "trusted_certificate": (pki.EC_CERT.replace("CERTIFICATE", "TRUSTED CERTIFICATE"), False),
    "headers": (pki.EC_CERT.replace("-----\n", "-----\nX-Note: hi\n\n", 1), False),
}

CLIENT_CASES: dict[str, tuple[str, str | None, bool]] = {  # (cert, key or None: one file, ok)
    "ec_pkcs8": (pki.EC_CERT, pki.EC_KEY, True),
    "ec_sec1": (pki.EC_CERT, pki.EC_SEC1_KEY, True),
    "rsa_pkcs8": (pki.RSA_CERT, pki.RSA_KEY, True),
    "rsa_pkcs1": (pki.RSA_CERT, pki.RSA_PKCS1_KEY, True),
    "combined": (pki.EC_CERT + pki.EC_KEY, None, True),
    "other_ec_key": (pki.EC_CERT, pki.OTHER_EC_KEY, False),
    "rsa_cert_ec_key": (pki.RSA_CERT, pki.EC_KEY, False),
    "ed25519_key": (pki.EC_CERT, pki.ED_KEY, False),
    "swapped": (pki.EC_KEY, pki.EC_CERT, False),
    "cert_only": (pki.EC_CERT, None, False),
    "key_not_pem": (pki.EC_CERT, "key\n", False),
    "cert_not_pem": ("cert\n", pki.EC_KEY, False),
    # Go takes any "... PRIVATE KEY" block and parses its DER whatever the type says
    "renamed_key": (pki.EC_CERT, pki.EC_KEY.replace("PRIVATE", "ENCRYPTED PRIVATE"), True),
    "corrupt_key": (pki.EC_CERT, _corrupt(pki.EC_SEC1_KEY), None),
    "garbled_key": (pki.EC_CERT, pki.EC_KEY.replace("MIGHAgEA", "MIGHAgEB"), None),
    "corrupt_cert": (_corrupt(pki.EC_CERT), pki.EC_KEY, None),  # judged: whatever Go says
}


@pytest.mark.parametrize("name", sorted(CA_CASES))
def test_ca_problem(name: str) -> None:
    text, usable = CA_CASES[name]
    assert (pem.ca_problem(text.encode()) is None) is usable


@pytest.mark.parametrize("name", sorted(n for n, c in CLIENT_CASES.items() if c[2] is not None))
def test_client_problem(name: str) -> None:
    cert, key, ok = CLIENT_CASES[name]
    problem = pem.client_problem(cert.encode(), (key or cert).encode())
    assert (problem is None) is ok, problem


def _write_cases(root: Path) -> dict[str, str]:
    """One registry dir per case; returns registry -> case name."""
    registries: dict[str, str] = {}
    for name, (text, _) in CA_CASES.items():
        d = root / f"ca-{name.replace('_', '-')}.test"
        d.mkdir()
        (d / "ca.pem").write_text(text)
        (d / "hosts.toml").write_text('[host."https://m.test"]\n  ca = "ca.pem"\n')
        registries[d.name] = f"ca:{name}"
    for name, (cert, key, _) in CLIENT_CASES.items():
        d = root / f"client-{name.replace('_', '-')}.test"
        d.mkdir()
        (d / "c.pem").write_text(cert)
        entry = '"c.pem"'
        if key is not None:
            (d / "k.pem").write_text(key)
            entry = '[["c.pem", "k.pem"]]'
        (d / "hosts.toml").write_text(f'[host."https://m.test"]\n  client = {entry}\n')
        registries[d.name] = f"client:{name}"
    return registries


@pytest.mark.parametrize("version", VERSIONS)
def test_validate_agrees_with_each_version_on_ca_and_client_files(
    tmp_path: Path, version: str
) -> None:
    registries = _write_cases(tmp_path)
    judged = judge_dir(version, tmp_path, list(registries))
    disagree = []
    for (registry, case), judgement in zip(registries.items(), judged, strict=True):
        findings = validate_file(
            tmp_path / registry / "hosts.toml",
            display_path=f"/certs.d/{registry}/hosts.toml",
            containerd_version=parse_containerd_version(version),
            root=tmp_path,
        )
        errors = [f.code for f in findings if f.severity == "error"]
        if bool(errors) != judgement.rejected:
            disagree.append((case, errors, judgement.status, judgement.error))
        if judgement.rejected:
            assert judgement.status == "error", (case, judgement)  # the pull fails outright
            assert errors in (["ca.invalid"], ["client.invalid"]), (case, errors)
    assert disagree == []


def test_findings_name_the_file_and_what_containerd_does(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("PEM\n")
    (tmp_path / "c.pem").write_text(pki.EC_CERT)
    (tmp_path / "k.pem").write_text(pki.OTHER_EC_KEY)
    f = tmp_path / "hosts.toml"
    f.write_text('[host."https://m.test"]\n  ca = "ca.crt"\n  client = [["c.pem", "k.pem"]]\n')
    ca, client = validate_file(f, display_path="/h/hosts.toml", root=tmp_path)
    assert (ca.code, ca.line, ca.severity) == ("ca.invalid", 2, "error")
    assert "'ca.crt' is not a PEM file" in ca.message and "unable to load CA cert" in ca.message
    assert client.code == "client.invalid" and client.line == 3
    assert "does not match the certificate's public key" in client.message
    assert "MII" not in ca.message + client.message  # no file content in a finding


def _openssl_pair(tmp_path: Path, name: str, *algorithm: str) -> tuple[bytes, bytes]:
    key, crt = tmp_path / f"{name}.key", tmp_path / f"{name}.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", *algorithm, "-nodes", "-keyout", str(key),
         "-out", str(crt), "-days", "2", "-subj", f"/CN={name}"],
        capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    return crt.read_bytes(), key.read_bytes()


def test_keys_of_other_curves_match_their_certificates(tmp_path: Path) -> None:
    p384 = _openssl_pair(tmp_path, "p384", "ec", "-pkeyopt", "ec_paramgen_curve:P-384")
    other = _openssl_pair(tmp_path, "other", "ec", "-pkeyopt", "ec_paramgen_curve:P-384")
    ed = _openssl_pair(tmp_path, "ed", "ed25519")
    assert pem.client_problem(*p384) is None
    assert pem.client_problem(*ed) is None  # type only: Ed25519 is not derived here
    assert "does not match" in str(pem.client_problem(p384[0], other[1]))
    assert "type does not match" in str(pem.client_problem(p384[0], ed[1]))


# ---------------------------------------------------------------- mutations, judged


def _mutations(seed: int, n: int) -> list[tuple[str, str, str]]:
    """(kind, cert text, key text) with one DER byte of a certificate or key changed; kind
    "ca" uses the cert text as a `ca` file."""
    rng = random.Random(seed)
    pairs = ((pki.EC_CERT, pki.EC_KEY), (pki.RSA_CERT, pki.RSA_KEY))
    out = []
    for _ in range(n):
        kind = rng.choice(["ca", "cert", "key"])
        cert, key = rng.choice(pairs)
        source = key if kind == "key" else cert
        der = bytearray(pem.blocks(source.encode())[0].der)
        der[rng.randrange(len(der))] = rng.randrange(256)
        label = "PRIVATE KEY" if kind == "key" else "CERTIFICATE"
        b64 = base64.b64encode(bytes(der)).decode()
        text = f"-----BEGIN {label}-----\n{b64}\n-----END {label}-----\n"
        out.append((kind, text if kind != "key" else cert, text if kind == "key" else key))
    return out


MUTATIONS = 300


@pytest.mark.parametrize("version", VERSIONS)
def test_mutated_certificates_and_keys_agree_with_each_version(
    tmp_path: Path, version: str
) -> None:
    """300 one-byte DER mutations (seed 12): validate never calls usable what containerd
    cannot load; the few it refuses that Go takes are on the safe side."""
    registries = []
    for i, (kind, cert, key) in enumerate(_mutations(12, MUTATIONS)):
        d = tmp_path / f"m{i}.test"
        d.mkdir()
        registries.append(d.name)
        if kind == "ca":
            (d / "ca.pem").write_text(cert)
            (d / "hosts.toml").write_text('[host."https://m.test"]\n  ca = "ca.pem"\n')
        else:
            (d / "c.pem").write_text(cert)
            (d / "k.pem").write_text(key)
            (d / "hosts.toml").write_text(
                '[host."https://m.test"]\n  client = [["c.pem", "k.pem"]]\n'
            )
    unsafe, agree = [], 0
    for registry, judgement in zip(
        registries, judge_dir(version, tmp_path, registries), strict=True
    ):
        findings = validate_file(
            tmp_path / registry / "hosts.toml",
            display_path="h",
            containerd_version=parse_containerd_version(version),
            root=tmp_path,
        )
        errors = any(f.severity == "error" for f in findings)
        agree += errors == judgement.rejected
        if judgement.rejected and not errors:
            unsafe.append((registry, judgement.error))
    print(f"containerd {version}: ca/client mutations agree on {agree}/{MUTATIONS}")
    assert unsafe == []
    assert agree >= MUTATIONS * 0.97
