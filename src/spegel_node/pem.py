"""`ca` and `client` files as containerd reads them: Go's encoding/pem, crypto/x509 and crypto/tls.

containerd (1.6.20 to 2.3.7 alike, `remotes/docker/config`) loads every `ca` file with
`x509.CertPool.AppendCertsFromPEM` and fails with "unable to load CA cert" when no block of it
is a certificate, and every `client` pair with `tls.X509KeyPair`, failing with "failed to load
X509 key pair" on a cert or key it cannot use or a key that is not the cert's. Either way
`ConfigureHosts` returns the error and every pull of that registry fails (not just that host).

Pure Python: PEM armor and base64 as Go's `pem.Decode` takes them, and DER read as strictly as
Go's x509 parser reads a certificate (minimal lengths and integers, version, serial, inner =
outer signature algorithm, names and their string types, validity times, the public key: RSA
with NULL parameters, an EC point on its curve; extension framing and the usual extensions).
Keys: PKCS#1, PKCS#8, SEC1, tried in Go's order whatever the block's type says. The key is
matched to the certificate as Go does: an RSA key must hold together (n = p*q, d, the CRT
values) and carry the cert's modulus; a P-256 or P-384 key's public point is computed from its
private scalar (Go ignores the stored one). An Ed25519 key, or an EC key on P-224/P-521, is
checked for its type (and the stored public point) only: that arithmetic is left out.
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
    if tag & 0x1F == 0x1F:
        raise _Bad("high tag number")
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or i + n > len(b) or b[i] == 0:
            raise _Bad("bad length")
        length = int.from_bytes(b[i : i + n], "big")
        if length < 0x80:  # DER: the short form where it fits
            raise _Bad("non-minimal length")
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
    """The SubjectPublicKeyInfo (its DER) of a certificate Go's x509.ParseCertificate takes:
    its structure, version, serial, algorithm identifiers (inner = outer), names, validity,
    public key and extension framing (as crypto/x509's parser.go reads them)."""
    outer = _sequence(der)
    if len(outer) < 3 or _tags(outer[:3]) != [0x30, 0x30, 0x03]:
        raise _Bad("not a Certificate")
    tbs = _children(der, outer[0][1], outer[0][2])
    version = 0
    if tbs and tbs[0][0] == 0xA0:  # [0] EXPLICIT version
        inner = _children(der, tbs[0][1], tbs[0][2])
        if len(inner) != 1 or inner[0][0] != 0x02:
            raise _Bad("malformed version")
        version = _integer(der, inner[0])
        tbs = tbs[1:]
    if not 0 <= version <= 2:
        raise _Bad("invalid version")
    if len(tbs) < 6 or _tags(tbs[:6]) != [0x02, 0x30, 0x30, 0x30, 0x30, 0x30]:
        raise _Bad("not a TBSCertificate")
    if _integer(der, tbs[0]) < 0:
        raise _Bad("negative serial number")
    if der[tbs[1][1] : tbs[1][2]] != der[outer[1][1] : outer[1][2]]:
        raise _Bad("inner and outer signature algorithm identifiers differ")
    _algorithm(der, tbs[1])
    for name in (tbs[2], tbs[4]):
        _name(der, name)
    times = _children(der, tbs[3][1], tbs[3][2])
    if len(times) < 2:
        raise _Bad("malformed validity")
    for t in times[:2]:
        _time(der, t)
    spki = der[tbs[5][3] : tbs[5][2]]
    _spki_parts(spki)
    rest = tbs[6:]
    if version >= 1:
        rest = [el for el in rest if el[0] not in (0x81, 0xA1, 0x82, 0xA2)][:1] or []
        if version == 2 and rest and rest[0][0] == 0xA3:
            _extensions(der, rest[0])
    _bit_string(der, outer[2])
    return spki


def _integer(b: bytes, el: _El) -> int:
    """A DER INTEGER (minimal encoding), signed."""
    raw = b[el[1] : el[2]]
    if el[0] != 0x02 or not raw:
        raise _Bad("not an INTEGER")
    if len(raw) > 1 and ((raw[0] == 0 and raw[1] < 0x80) or (raw[0] == 0xFF and raw[1] >= 0x80)):
        raise _Bad("non-minimal INTEGER")
    return int.from_bytes(raw, "big", signed=True)


def _bit_string(b: bytes, el: _El) -> bytes:
    raw = b[el[1] : el[2]]
    if el[0] != 0x03 or not raw or raw[0] > 7 or (len(raw) == 1 and raw[0]):
        raise _Bad("malformed BIT STRING")
    if len(raw) > 1 and raw[-1] & ((1 << raw[0]) - 1):
        raise _Bad("malformed BIT STRING")
    return raw[1:]


def _object_identifier(b: bytes, el: _El) -> bytes:
    raw = b[el[1] : el[2]]
    if el[0] != 0x06 or not raw or raw[-1] & 0x80:
        raise _Bad("malformed OID")
    start = True
    for byte in raw:  # base-128 components, minimal (no leading 0x80)
        if start and byte == 0x80:
            raise _Bad("malformed OID")
        start = not byte & 0x80
    return raw


def _algorithm(b: bytes, el: _El) -> tuple[bytes, _El | None]:
    """(OID, parameters element) of an AlgorithmIdentifier."""
    parts = _children(b, el[1], el[2])
    if not parts:
        raise _Bad("malformed algorithm identifier")
    return _object_identifier(b, parts[0]), parts[1] if len(parts) > 1 else None


_PRINTABLE = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 '()+,-./:=?*&"
)


def _name(b: bytes, el: _El) -> None:
    """An RDNSequence whose attribute values Go's parseASN1String takes."""
    for rdn in _children(b, el[1], el[2]):
        if rdn[0] != 0x31:
            raise _Bad("invalid RDNSequence")
        for atav in _children(b, rdn[1], rdn[2]):
            parts = _children(b, atav[1], atav[2]) if atav[0] == 0x30 else []
            if len(parts) < 2:
                raise _Bad("invalid attribute")
            _object_identifier(b, parts[0])
            tag, value = parts[1][0], b[parts[1][1] : parts[1][2]]
            if tag == 0x13 and not set(value) <= _PRINTABLE:  # PrintableString
                raise _Bad("invalid PrintableString")
            if tag == 0x0C:  # UTF8String
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise _Bad("invalid UTF-8 string") from e
            elif tag == 0x16 and any(c > 0x7F for c in value):  # IA5String
                raise _Bad("invalid IA5String")
            elif tag == 0x12 and not set(value) <= frozenset(b"0123456789 "):
                raise _Bad("invalid NumericString")
            elif tag == 0x1E and len(value) % 2:  # BMPString
                raise _Bad("invalid BMPString")
            elif tag not in (0x13, 0x0C, 0x16, 0x12, 0x1E, 0x14):  # 0x14 T61String
                raise _Bad("unsupported string type")


_UTC = re.compile(rb"(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})?(Z|[+-]\d{4})")
_GENERALIZED = re.compile(rb"(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})(Z|[+-]\d{4})")


def _time(b: bytes, el: _El) -> None:
    """UTCTime or GeneralizedTime as Go reads them (the text must round-trip)."""
    import datetime

    raw = b[el[1] : el[2]]
    m = _UTC if el[0] == 0x17 else _GENERALIZED if el[0] == 0x18 else None
    if m is None:
        raise _Bad("unsupported time format")
    found = m.fullmatch(raw)
    if found is None:
        raise _Bad("malformed time")
    year, month, day, hour, minute = (int(g) for g in found.groups()[:5])
    second = int(found.group(6) or b"0")
    zone = found.group(7)
    if zone != b"Z" and (zone[1:] == b"0000" or int(zone[1:3]) > 23 or int(zone[3:]) > 59):
        raise _Bad("malformed time zone")  # +0000 would be written back as Z
    try:
        datetime.datetime(year if el[0] == 0x18 else 2000 + year, month, day, hour, minute, second)
    except ValueError as e:
        raise _Bad("malformed time") from e


def _extensions(b: bytes, el: _El) -> None:
    inner = _children(b, el[1], el[2])
    if len(inner) != 1 or inner[0][0] != 0x30:
        raise _Bad("malformed extensions")
    seen: set[bytes] = set()
    for ext in _children(b, inner[0][1], inner[0][2]):
        parts = _children(b, ext[1], ext[2]) if ext[0] == 0x30 else []
        if not parts:
            raise _Bad("malformed extension")
        oid = _object_identifier(b, parts[0])
        if oid in seen:
            raise _Bad("duplicate extension")
        seen.add(oid)
        critical = False
        rest = parts[1:]
        if rest and rest[0][0] == 0x01:
            raw = b[rest[0][1] : rest[0][2]]
            if raw not in (b"\x00", b"\xff"):
                raise _Bad("malformed extension critical field")
            critical, rest = raw == b"\xff", rest[1:]
        if not rest or rest[0][0] != 0x04:
            raise _Bad("malformed extension value field")
        _extension_value(oid, critical, b[rest[0][1] : rest[0][2]])


_EXT = bytes.fromhex("551d")  # 2.5.29


def _extension_value(oid: bytes, critical: bool, value: bytes) -> None:
    """The few extensions a CA or client certificate usually has, read as Go reads them."""
    if len(oid) != 3 or oid[:2] != _EXT:
        return
    kind = oid[2]
    if kind in (14, 35) and critical:  # subject / authority key identifier
        raise _Bad("key identifier marked critical")
    first = _tlv(value, 0) if value else None
    if kind == 14 and (first is None or first[0] != 0x04):
        raise _Bad("invalid subject key identifier")
    if kind in (19, 35) and (first is None or first[0] != 0x30):
        raise _Bad("invalid basic constraints / authority key identifier")
    if kind == 19 and first is not None:
        for el in _children(value, first[1], first[2])[:2]:
            if el[0] == 0x01 and value[el[1] : el[2]] not in (b"\x00", b"\xff"):
                raise _Bad("invalid basic constraints")
            if el[0] == 0x02 and _integer(value, el) < 0:
                raise _Bad("invalid basic constraints")
    if kind == 15:
        if first is None:
            raise _Bad("invalid key usage")
        _bit_string(value, (first[0], first[1], first[2], 0))


def _spki_parts(spki: bytes) -> tuple[bytes, bytes]:
    """(algorithm OID, the public key: RSA modulus, EC point, raw key), checked as Go's
    parsePublicKey checks them."""
    parts = _sequence(spki)
    if _tags(parts) != [0x30, 0x03]:
        raise _Bad("not a SubjectPublicKeyInfo")
    oid, params = _algorithm(spki, parts[0])
    key = _bit_string(spki, parts[1])
    if oid == OID_RSA:
        if params is None or spki[params[3] : params[2]] != b"\x05\x00":
            raise _Bad("RSA key missing NULL parameters")
        elements = _sequence(key)
        if len(elements) < 2 or _integer(key, elements[0]) <= 0 or _integer(key, elements[1]) <= 0:
            raise _Bad("invalid RSA public key")
        return oid, _rsa_modulus(elements, key)
    if oid == OID_EC:
        curve_oid = _object_identifier(spki, params) if params is not None else b""
        curve = _CURVES.get(curve_oid)
        if curve is not None:
            curve.check_point(key)
        elif curve_oid not in _OTHER_CURVES:
            raise _Bad("unsupported elliptic curve")
    elif oid == OID_ED25519 and (params is not None or len(key) != 32):
        raise _Bad("invalid Ed25519 key")
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
    if _integer(der, parts[0]) != 1:
        raise _Bad("unknown EC private key version")
    stored = None
    for tag, s, e, _ in parts[2:]:  # Go's asn1 skips what follows; an explicit tag holds one
        if tag not in (0xA0, 0xA1):
            continue
        inner = _children(der, s, e)
        if len(inner) != 1:
            raise _Bad("malformed ECPrivateKey")
        if tag == 0xA0:
            curve_oid = _object_identifier(der, inner[0])
        else:
            stored = _bit_string(der, inner[0])
    curve = _CURVES.get(curve_oid or b"")
    if curve is None:
        if curve_oid not in _OTHER_CURVES:
            raise _Bad("unknown elliptic curve")
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
    b: int
    gx: int
    gy: int

    def check_point(self, point: bytes) -> None:
        """An uncompressed point on the curve (Go's ParseUncompressedPublicKey)."""
        size = (self.p.bit_length() + 7) // 8
        if len(point) != 1 + 2 * size or point[0] != 4:
            raise _Bad("not an uncompressed point")
        x = int.from_bytes(point[1 : 1 + size], "big")
        y = int.from_bytes(point[1 + size :], "big")
        if x >= self.p or y >= self.p or (y * y - (x * x * x - 3 * x + self.b)) % self.p:
            raise _Bad("point not on the curve")

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
        b=0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B,
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
        b=int(
            "B3312FA7E23EE7E4988E056BE3F82D19181D9C6EFE8141120314088F5013875A"
            "C656398D8A2ED19D2A85C8EDD3EC2AEF",
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
_OTHER_CURVES = (  # Go knows them too; their points are not checked here
    bytes.fromhex("2b81040021"),  # P-224
    bytes.fromhex("2b81040023"),  # P-521
)
