"""`ca` and `client` files as containerd reads them: Go's encoding/pem, crypto/x509 and crypto/tls.

containerd (1.6.20 to 2.3.7 alike, `remotes/docker/config`) loads every `ca` file with
`x509.CertPool.AppendCertsFromPEM` and fails with "unable to load CA cert" when no block of it
is a certificate, and every `client` pair with `tls.X509KeyPair`, failing with "failed to load
X509 key pair" on a cert or key it cannot use or a key that is not the cert's. Either way
`ConfigureHosts` returns the error and every pull of that registry fails (not just that host).

Pure Python: PEM armor and base64 as Go's `pem.Decode` takes them, and just enough DER to see a
certificate (Certificate, TBSCertificate, SubjectPublicKeyInfo) and a private key (PKCS#1,
PKCS#8, SEC1, tried in Go's order whatever the block's type says). The key is matched to the
certificate as Go does: an RSA key must hold together (n = p*q, ...) and carry the cert's
modulus; a P-256 or P-384 key's public point is computed from its private scalar (Go ignores
the stored one). An Ed25519 key, or an EC key on another curve, is checked for its type (and
the stored public point) only: deriving those needs arithmetic left out here.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

MAX_PEM = 1 << 20  # bigger files are not read (validate's hosts.toml limit)

_BEGIN = re.compile(rb"(?:^|\n)-----BEGIN ([^\n]*?)-----[ \t\r]*(?=\n|$)")
_WS = re.compile(rb"[ \t\r\n]")
OID_RSA = bytes.fromhex("2a864886f70d010101")  # 1.2.840.113549.1.1.1 rsaEncryption
OID_EC = bytes.fromhex("2a8648ce3d0201")  # 1.2.840.10045.2.1 id-ecPublicKey
OID_ED25519 = bytes.fromhex("2b6570")  # 1.3.101.112


@dataclass(frozen=True)
class Block:
    type: str
    headers: bool  # "Proc-Type: 4,ENCRYPTED" and the like
    der: bytes


class _Bad(ValueError):
    """Not the DER structure expected."""


def blocks(data: bytes) -> list[Block]:
    """The PEM blocks Go's pem.Decode finds, in order; a block whose body is not base64 is
    skipped, as Go skips it."""
    found: list[Block] = []
    pos = 0
    while m := _BEGIN.search(data, pos):
        kind = m.group(1)
        end = re.compile(rb"(?:^|\n)-----END " + re.escape(kind) + rb"-----")
        e = end.search(data, m.end())
        if e is None:
            break
        body = data[m.end() : e.start()]
        pos = e.end()
        lines = body.lstrip(b"\r\n").split(b"\n")
        headers = bool(lines) and b":" in lines[0]
        if headers:
            while lines and b":" in lines[0]:
                lines.pop(0)
        try:
            der = base64.b64decode(_WS.sub(b"", b"\n".join(lines)), validate=True)
        except (binascii.Error, ValueError):
            continue
        found.append(Block(kind.decode("latin-1"), headers, der))
    return found


def ca_problem(data: bytes) -> str | None:
    """Why containerd cannot load this `ca` file (None: at least one certificate loads)."""
    found = blocks(data)
    certs = [b for b in found if b.type == "CERTIFICATE" and not b.headers]
    for block in certs:
        try:
            _certificate_spki(block.der)
            return None
        except _Bad:
            continue
    if certs:
        return "its CERTIFICATE block is not a valid certificate"
    if found:
        kinds = ", ".join(sorted({b.type for b in found}))
        return f"holds no CERTIFICATE PEM block (found {kinds})"
    return "is not a PEM file (no -----BEGIN CERTIFICATE----- block)"


def client_problem(cert_data: bytes, key_data: bytes) -> str | None:
    """Why tls.X509KeyPair refuses this cert and key (None: they load, and match where the key
    shows its public part)."""
    cert_blocks = blocks(cert_data)
    certs = [b for b in cert_blocks if b.type == "CERTIFICATE"]
    if not certs:
        if any(b.type.endswith("PRIVATE KEY") for b in cert_blocks):
            return "the certificate file holds a private key, not a certificate (cert and key swapped?)"
        return "the certificate file is not PEM (no -----BEGIN CERTIFICATE----- block)"
    keys = [
        b for b in blocks(key_data) if b.type == "PRIVATE KEY" or b.type.endswith(" PRIVATE KEY")
    ]
    if not keys:
        return "the key file has no PEM private key (-----BEGIN PRIVATE KEY-----)"
    key = keys[0]
    try:
        spki = _certificate_spki(certs[0].der)
    except _Bad:
        return "the certificate is not a valid certificate"
    try:
        algorithm, public = _key_public(key)
    except _Bad:
        return f"the {key.type} block is not a private key containerd can use (encrypted?)"
    cert_algorithm, cert_public = _spki_parts(spki)
    if algorithm != cert_algorithm:
        return "the private key's type does not match the certificate's public key"
    if public is not None and public != cert_public:
        return "the private key does not match the certificate's public key"
    return None


# ---------------------------------------------------------------- DER, just enough


def _tlv(b: bytes, i: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the element at i."""
    if i + 2 > len(b):
        raise _Bad("truncated")
    tag, first = b[i], b[i + 1]
    i += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or i + n > len(b):
            raise _Bad("bad length")
        length = int.from_bytes(b[i : i + n], "big")
        i += n
    if i + length > len(b):
        raise _Bad("truncated")
    return tag, i, i + length


_El = tuple[int, int, int, int]  # (tag, content start, content end, element start)


def _children(b: bytes, start: int, end: int) -> list[_El]:
    out = []
    i = start
    while i < end:
        tag, s, e = _tlv(b, i)
        if e > end:
            raise _Bad("overrun")
        out.append((tag, s, e, i))
        i = e
    return out


def _tags(elements: list[_El]) -> list[int]:
    return [el[0] for el in elements]


def _sequence(b: bytes) -> list[_El]:
    """The elements of the one SEQUENCE that is all of `b` (Go: no trailing data)."""
    tag, s, e = _tlv(b, 0)
    if tag != 0x30 or e != len(b):
        raise _Bad("not one SEQUENCE")
    return _children(b, s, e)


def _certificate_spki(der: bytes) -> bytes:
    """The SubjectPublicKeyInfo of a certificate (its DER)."""
    outer = _sequence(der)
    if _tags(outer) != [0x30, 0x30, 0x03]:
        raise _Bad("not a Certificate")
    tbs = _children(der, outer[0][1], outer[0][2])
    if tbs and tbs[0][0] == 0xA0:  # [0] version
        tbs = tbs[1:]
    if len(tbs) < 6 or _tags(tbs[:6]) != [0x02, 0x30, 0x30, 0x30, 0x30, 0x30]:
        raise _Bad("not a TBSCertificate")
    _, _, end, start = tbs[5]
    spki = der[start:end]
    _spki_parts(spki)
    return spki


def _spki_parts(spki: bytes) -> tuple[bytes, bytes]:
    """(algorithm OID, the public key: RSA modulus or EC point / raw key bytes)."""
    parts = _sequence(spki)
    if _tags(parts) != [0x30, 0x03]:
        raise _Bad("not a SubjectPublicKeyInfo")
    oid = _oid(spki, parts[0])
    key = spki[parts[1][1] + 1 : parts[1][2]]  # skip the unused-bits byte
    if oid == OID_RSA:
        return oid, _rsa_modulus(_sequence(key), key)
    return oid, key


def _oid(b: bytes, alg: _El) -> bytes:
    inner = _children(b, alg[1], alg[2])
    if not inner or inner[0][0] != 0x06:
        raise _Bad("no algorithm OID")
    return b[inner[0][1] : inner[0][2]]


def _rsa_modulus(elements: list[_El], b: bytes) -> bytes:
    if not elements or elements[0][0] != 0x02:
        raise _Bad("no modulus")
    return b[elements[0][1] : elements[0][2]].lstrip(b"\x00")


def _key_public(key: Block) -> tuple[bytes, bytes | None]:
    """(algorithm OID, public key if the private key carries it). As Go's tls parsePrivateKey:
    PKCS#1, then PKCS#8, then SEC1, whatever the block's type says."""
    try:
        return OID_RSA, _pkcs1_modulus(key.der)
    except _Bad:
        pass
    try:
        return _pkcs8_public(key.der)
    except _Bad:
        pass
    return OID_EC, _sec1_public(key.der)


def _pkcs8_public(der: bytes) -> tuple[bytes, bytes | None]:
    parts = _sequence(der)  # version, algorithm, privateKey OCTET STRING, ...
    if len(parts) < 3 or _tags(parts[:3]) != [0x02, 0x30, 0x04]:
        raise _Bad("not PKCS#8")
    oid = _oid(der, parts[1])
    inner = der[parts[2][1] : parts[2][2]]
    if oid == OID_RSA:
        return oid, _pkcs1_modulus(inner)
    if oid == OID_EC:
        alg = _children(der, parts[1][1], parts[1][2])
        curve = der[alg[1][1] : alg[1][2]] if len(alg) > 1 and alg[1][0] == 0x06 else None
        return oid, _sec1_public(inner, curve)
    if oid == OID_ED25519:
        return oid, None
    raise _Bad("unsupported PKCS#8 key algorithm")


def _pkcs1_modulus(der: bytes) -> bytes:
    """The modulus of an RSAPrivateKey that holds together as Go's rsa.Validate checks it
    (n = p*q, d inverts e modulo p-1 and q-1, the CRT values consistent)."""
    parts = _sequence(der)  # version, n, e, d, p, q, dp, dq, qinv
    if len(parts) < 9 or _tags(parts[:9]) != [0x02] * 9:
        raise _Bad("not an RSAPrivateKey")
    _, n, e, d, p, q, dp, dq, qinv = (int.from_bytes(der[s:t], "big") for _, s, t, _ in parts[:9])
    if p < 2 or q < 2 or n != p * q or (d * e) % (p - 1) != 1 or (d * e) % (q - 1) != 1:
        raise _Bad("inconsistent RSA key")
    if dp != d % (p - 1) or dq != d % (q - 1) or (qinv * q) % p != 1:
        raise _Bad("inconsistent RSA CRT values")
    return _rsa_modulus(parts[1:], der)


def _sec1_public(der: bytes, curve_oid: bytes | None = None) -> bytes | None:
    """The public point of an ECPrivateKey, computed from the private scalar as Go does (it
    ignores the stored `publicKey`); the stored one for a curve left out here; None if neither."""
    parts = _sequence(der)  # version, privateKey, [0] parameters, [1] publicKey
    if len(parts) < 2 or _tags(parts[:2]) != [0x02, 0x04]:
        raise _Bad("not an ECPrivateKey")
    stored = None
    for tag, s, e, _ in parts[2:]:
        inner = _children(der, s, e)
        if tag == 0xA0 and inner and inner[0][0] == 0x06:
            curve_oid = der[inner[0][1] : inner[0][2]]
        elif tag == 0xA1 and inner and inner[0][0] == 0x03:
            stored = der[inner[0][1] + 1 : inner[0][2]]
    curve = _CURVES.get(curve_oid or b"")
    if curve is None:
        return stored
    scalar = int.from_bytes(der[parts[1][1] : parts[1][2]], "big")
    if not 0 < scalar < curve.n:
        raise _Bad("EC private key out of range")
    x, y = curve.multiply(scalar)
    size = (curve.p.bit_length() + 7) // 8
    return b"\x04" + x.to_bytes(size, "big") + y.to_bytes(size, "big")


@dataclass(frozen=True)
class _Curve:
    """A NIST prime curve y^2 = x^3 - 3x + b (affine arithmetic: slow, but one multiplication)."""

    p: int
    n: int
    gx: int
    gy: int

    def multiply(self, k: int) -> tuple[int, int]:
        result: tuple[int, int] | None = None
        point: tuple[int, int] | None = (self.gx, self.gy)
        while k:
            if k & 1:
                result = self._add(result, point)
            point = self._add(point, point)
            k >>= 1
        if result is None:
            raise _Bad("point at infinity")
        return result

    def _add(self, a: tuple[int, int] | None, b: tuple[int, int] | None) -> tuple[int, int] | None:
        if a is None:
            return b
        if b is None:
            return a
        p = self.p
        if a[0] == b[0] and (a[1] + b[1]) % p == 0:
            return None
        if a == b:
            slope = (3 * a[0] * a[0] - 3) * pow(2 * a[1], -1, p) % p
        else:
            slope = (b[1] - a[1]) * pow(b[0] - a[0], -1, p) % p
        x = (slope * slope - a[0] - b[0]) % p
        return x, (slope * (a[0] - x) - a[1]) % p


_CURVES = {
    bytes.fromhex("2a8648ce3d030107"): _Curve(  # P-256 (1.2.840.10045.3.1.7)
        p=2**256 - 2**224 + 2**192 + 2**96 - 1,
        n=0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
        gx=0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
        gy=0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5,
    ),
    bytes.fromhex("2b81040022"): _Curve(  # P-384 (1.3.132.0.34)
        p=2**384 - 2**128 - 2**96 + 2**32 - 1,
        n=int(
            "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
            "581A0DB248B0A77AECEC196ACCC52973",
            16,
        ),
        gx=int(
            "AA87CA22BE8B05378EB1C71EF320AD746E1D3B628BA79B9859F741E082542A38"
            "5502F25DBF55296C3A545E3872760AB7",
            16,
        ),
        gy=int(
            "3617DE4A96262C6F5D9E98BF9292DC29F8F41DBD289A147CE9DA3113B5F0B8C0"
            "0A60B1CE1D7E819D7A431D7C90EA0E5F",
            16,
        ),
    ),
}
