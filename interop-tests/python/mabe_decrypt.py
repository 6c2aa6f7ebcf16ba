#!/usr/bin/env python3
"""An independent decryptor for mabe records, written from docs/FORMAT.md alone.

It reads what the real `mabe` binary writes:

  * `mabe inspect --json RECORD` output (FORMAT.md §9.2),
  * the record file itself (§9.1), for its payload and signature,
  * `mabe keys export` output (§9.5): the reader's 'K' keys and the verified 'P' public keys,

and writes the plaintext (to stdout or --out) only if every check passes. It uses py_ecc's
BLS12-381 arithmetic and pairing, whose pairing differs from arkworks' by a fixed exponent (§7),
and `cryptography` for AES-256-GCM and Ed25519. Any failure: a message on stderr, exit status
non-zero, no plaintext.

Section numbers (§) refer to docs/FORMAT.md.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import re
import struct
import sys
import unicodedata

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from py_ecc.bls.hash_to_curve import hash_to_G2
from py_ecc.bls.point_compression import compress_G1, compress_G2, decompress_G1, decompress_G2
from py_ecc.optimized_bls12_381 import (
    FQ12,
    G1,
    G2,
    Z1,
    add,
    curve_order as R,
    eq,
    field_modulus as P,
    final_exponentiate,
    is_inf,
    multiply,
    neg,
)
from py_ecc.optimized_bls12_381.optimized_pairing import exp_by_p, miller_loop


class Refused(Exception):
    """Any reason not to output a plaintext."""


def need(cond: bool, what: str) -> None:
    if not cond:
        raise Refused(what)


# ---------------------------------------------------------------------------------------------
# §1.1 integers and strings, §2.6 derived scalars
# ---------------------------------------------------------------------------------------------

def be16(x: int) -> bytes:
    return struct.pack(">H", x)


def be32(x: int) -> bytes:
    return struct.pack(">I", x)


def lp(b: bytes) -> bytes:
    return be32(len(b)) + b


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:  # RFC 5869
    return hmac.new(salt, ikm, hashlib.sha256).digest()


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:  # RFC 5869
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
        i += 1
    return out[:length]


def hkdf(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    return hkdf_expand(hkdf_extract(salt, ikm), info, length)


def hs(prk: bytes, info: bytes) -> int:
    """§2.6: HS(prk, info) = OS2IP(HKDF-Expand(prk, info, 64)) mod r (big-endian)."""
    return int.from_bytes(hkdf_expand(prk, info, 64), "big") % R


TAG_GID = b"MABE-V1-GID"
TAG_HDR = b"MABE-V1-HDR"
TAG_FO = b"MABE-V1-FO"
TAG_MASK = b"MABE-V1-MASK"
TAG_DEM = b"MABE-V1-DEM"
DST_GID = b"MABE-V01-CS01-with-BLS12381G2_XMD:SHA-256_SSWU_RO_GID_"
SIG_TAG = b"MABE-V1-RECORD-SIG"  # §9.1


# ---------------------------------------------------------------------------------------------
# §1.3 group elements: decoding with validation, and §7 the arkworks GT encoding
# ---------------------------------------------------------------------------------------------

def ser_g1(pt) -> bytes:
    return compress_G1(pt).to_bytes(48, "big")


def ser_g2(pt) -> bytes:
    z1, z2 = compress_G2(pt)  # z1 carries x.c1 and the flags, z2 is x.c0
    return z1.to_bytes(48, "big") + z2.to_bytes(48, "big")


def in_subgroup(pt) -> bool:
    return is_inf(multiply(pt, R))


def de_g1(b: bytes, what: str):
    need(len(b) == 48, f"{what}: a G1 point is 48 bytes")
    try:
        pt = decompress_G1(int.from_bytes(b, "big"))
    except ValueError as e:
        raise Refused(f"{what}: not a G1 point ({e})") from None
    need(not is_inf(pt), f"{what}: the identity is refused")
    need(ser_g1(pt) == b, f"{what}: non-canonical G1 encoding")
    need(in_subgroup(pt), f"{what}: G1 point outside the prime-order subgroup")
    return pt


def de_g2(b: bytes, what: str):
    need(len(b) == 96, f"{what}: a G2 point is 96 bytes")
    try:  # x.c1 first, then x.c0, each 48 bytes big-endian
        pt = decompress_G2((int.from_bytes(b[:48], "big"), int.from_bytes(b[48:], "big")))
    except ValueError as e:
        raise Refused(f"{what}: not a G2 point ({e})") from None
    need(not is_inf(pt), f"{what}: the identity is refused")
    need(ser_g2(pt) == b, f"{what}: non-canonical G2 encoding")
    need(in_subgroup(pt), f"{what}: G2 point outside the prime-order subgroup")
    return pt


# GT. arkworks stores 12 little-endian coefficients over the tower Fq2[v][w]; coefficient
# (i, j, k) of w^i v^j u^k sits at index 6i + 2j + k. py_ecc uses the flat basis
# Fq[w]/(w^12 - 2w^6 + 2) with v = w^2 and u = w^6 - 1 (§7), so the tower pair (a + b·u) of
# w^i v^j is a·w^t + b·(w^(t+6) - w^t) with t = i + 2j.

def gt_from_tower(c: list[int]) -> FQ12:
    d = [0] * 12
    for i in range(2):
        for j in range(3):
            a, b = c[6 * i + 2 * j], c[6 * i + 2 * j + 1]
            t = i + 2 * j
            d[t] = (a - b) % P
            d[t + 6] = b
    return FQ12(d)


def ser_gt(f: FQ12) -> bytes:
    d = [int(x) % P for x in f.coeffs]
    out = b""
    for i in range(2):
        for j in range(3):
            t = i + 2 * j
            out += ((d[t] + d[t + 6]) % P).to_bytes(48, "little") + d[t + 6].to_bytes(48, "little")
    return out


def gt_conj(f: FQ12) -> FQ12:
    """The conjugate w -> -w (the Frobenius f^(p^6)): negates the odd flat coefficients.
    It is the inverse of every element of the cyclotomic subgroup, GT included."""
    return FQ12([(-x if k % 2 else x) % P for k, x in enumerate(f.coeffs)])


BLS_X_ABS = 0xD201000000010000  # |x|, x = -0xd201000000010000 the BLS12-381 parameter


def gt_in_subgroup(f: FQ12) -> bool:
    """§1.3: M. Scott's test. (1) cyclotomic: f^(p^4)·f == f^(p^2); (2) f^p == f^x."""
    fp = exp_by_p(f)
    fp2 = exp_by_p(fp)
    fp4 = exp_by_p(exp_by_p(fp2))
    if fp4 * f != fp2:
        return False
    return fp == gt_conj(f ** BLS_X_ABS)


def de_gt(b: bytes, what: str) -> FQ12:
    need(len(b) == 576, f"{what}: a GT element is 576 bytes")
    c = [int.from_bytes(b[48 * k:48 * k + 48], "little") for k in range(12)]
    need(all(x < P for x in c), f"{what}: GT coefficient not below p")
    need(any(c), f"{what}: GT element is zero")
    f = gt_from_tower(c)
    need(gt_in_subgroup(f), f"{what}: GT element outside the order-r subgroup")
    need(ser_gt(f) == b, f"{what}: non-canonical GT encoding")
    return f


def gt_pow(f: FQ12, c: int) -> FQ12:
    """f^c for f in GT, with a negative exponent taken as the conjugate (c = -1 is common)."""
    c %= R
    return gt_conj(f ** (R - c)) if c > R // 2 else f ** c


def g1_mul(pt, c: int):
    c %= R
    return multiply(neg(pt), R - c) if c > R // 2 else multiply(pt, c)


def ark_multi_pairing(pairs) -> FQ12:
    """§7: Π e(P_i, Q_i) in arkworks' normalization, with e(P, Q) = py_ecc.pairing(Q, P)^(-3).
    One Miller loop per pair and one final exponentiation (py_ecc takes the G2 point first);
    the power -3 is the conjugate of the cube (GT elements are unitary)."""
    f = FQ12.one()
    for p1, q2 in pairs:
        f = f * miller_loop(q2, p1, final_exponentiate=False)
    f = final_exponentiate(f)
    return gt_conj(f * f * f)


EGG = None  # e(g1, g2) in arkworks' normalization, set by the known-answer check


# ---------------------------------------------------------------------------------------------
# §2.4 GID, §2.5 H(GID), §7 known answers
# ---------------------------------------------------------------------------------------------

# Unicode White_Space (what Rust's str::trim and the policy lexer of §2.2 use).
WHITE_SPACE = set(
    "\u0009\u000a\u000b\u000c\u000d\u0020\u0085\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
    "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)


def derive_gid(registry: str, subject: str) -> bytes:
    registry = unicodedata.normalize("NFC", registry.strip("".join(WHITE_SPACE))).lower()
    subject = unicodedata.normalize("NFC", subject.strip("".join(WHITE_SPACE)))
    for s in (registry, subject):
        need(s != "" and len(s.encode()) <= 1024, "GID input empty or too long")
        need(not any(unicodedata.category(ch) == "Cc" for ch in s),
             "control character in GID input")
    return hashlib.sha256(TAG_GID + lp(registry.encode()) + lp(subject.encode())).digest()


def hash_gid(gid: bytes):
    return hash_to_G2(gid, DST_GID, hashlib.sha256)


KAT_EGG_SHA256 = "ff9912603bb02b77bc6ec1deaeddf9d1fee40ac17a781fb13c9c6e7a9f74d22b"
# The first and last coefficients of egg (big-endian), from the table of §7.
KAT_EGG_C000 = int("1250ebd871fc0a92a7b2d83168d0d727272d441befa15c503dd8e90c"
                   "e98db3e7b6d194f60839c508a84305aaca1789b6", 16)
KAT_EGG_C121 = int("0f41e58663bf08cf068672cbd01a7ec73baca4d72ca93544deff686b"
                   "fd6df543d48eaa24afe47e1efde449383b676631", 16)
KAT_GID = "8ad87d6315ac6996c56d043625569d9604db5bae67bda6186db07eaacd42714a"
KAT_HGID = (
    "b05b4ebe55653dbb041e817b86b5fea82bfd24e3755aecac5a114912fa9b19e8"
    "36f636f67c331714e9efcf455fd93299108cd979004c35ea74ea2d57c32ad974"
    "cb452c1aa5e594b921e5b73f50d27f22a8b1fef80b5f60dddc60eebad839ad34"
)


def check_known_answers() -> None:
    """Before anything else (§7): egg, the GID and H(GID). Refuse to go on if one differs."""
    global EGG
    need(ser_g1(G1).hex().startswith("97f1d3a7") and ser_g2(G2).hex().startswith("93e02b60"),
         "known answer: generators")
    egg = ark_multi_pairing([(G1, G2)])
    enc = ser_gt(egg)
    need(hashlib.sha256(enc).hexdigest() == KAT_EGG_SHA256, "known answer: SHA-256 of egg")
    need(int.from_bytes(enc[:48], "little") == KAT_EGG_C000, "known answer: egg c0.c0.c0")
    need(int.from_bytes(enc[-48:], "little") == KAT_EGG_C121, "known answer: egg c1.c2.c1")
    need(de_gt(enc, "egg") == egg, "known answer: egg round trip")
    gid = derive_gid("test-register", "alice")
    need(gid.hex() == KAT_GID, "known answer: GID")
    need(ser_g2(hash_gid(gid)).hex() == KAT_HGID, "known answer: H(GID)")
    EGG = egg


# ---------------------------------------------------------------------------------------------
# §2.1 attributes, §2.2 policy text
# ---------------------------------------------------------------------------------------------

ATTRIBUTE_RE = re.compile(r"[a-z0-9][a-z0-9_.:-]{0,127}@[a-z0-9][a-z0-9-]{0,62}")
MAX_POLICY_LEN, MAX_LEAVES, MAX_DEPTH = 65536, 1024, 64


def canonical_attribute(text: str) -> bool:
    return ATTRIBUTE_RE.fullmatch(text) is not None


class Node:
    """kind: 'leaf' (attr), 'and' / 'or' (children), 'of' (k, children). row: leaf's row."""

    def __init__(self, kind: str, children=(), attr: str = "", k: int = 0):
        self.kind, self.children, self.attr, self.k = kind, list(children), attr, k
        self.row = -1


WORD_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:@-")


def lex(text: str) -> list[tuple[str, str]]:
    tokens, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch in WHITE_SPACE:
            i += 1
        elif ch in "(),":
            tokens.append((ch, ch))
            i += 1
        elif ch in WORD_CHARS:
            j = i
            while j < len(text) and text[j] in WORD_CHARS:
                j += 1
            word = text[i:j]
            i = j
            if "@" in word:
                attr = word.lower()  # only ASCII letters can be here
                need(canonical_attribute(attr), f"policy: invalid attribute {word!r}")
                tokens.append(("ATTR", attr))
            elif word.isdigit():
                tokens.append(("NUM", word))
            elif word.lower() in ("and", "or", "of"):
                tokens.append((word.lower(), word))
            else:
                raise Refused(f"policy: unexpected word {word!r}")
        else:
            raise Refused(f"policy: unexpected character {ch!r}")
    return tokens


def parse_policy(text: str) -> Node:
    """§2.2 grammar: expr := and_expr (OR and_expr)*; and_expr := primary (AND primary)*;
    primary := '(' expr ')' | NUMBER OF '(' expr (',' expr)* ')' | ATTRIBUTE."""
    need(len(text.encode()) <= MAX_POLICY_LEN, "policy: text too long")
    toks = lex(text)
    pos = 0

    def peek():
        return toks[pos][0] if pos < len(toks) else None

    def take(kind: str) -> str:
        nonlocal pos
        need(peek() == kind, f"policy: expected {kind} at token {pos}")
        pos += 1
        return toks[pos - 1][1]

    def expr(depth: int) -> Node:
        need(depth <= MAX_DEPTH, "policy: nested too deeply")
        children = [and_expr(depth)]
        while peek() == "or":
            take("or")
            children.append(and_expr(depth))
        return children[0] if len(children) == 1 else Node("or", children)

    def and_expr(depth: int) -> Node:
        children = [primary(depth)]
        while peek() == "and":
            take("and")
            children.append(primary(depth))
        return children[0] if len(children) == 1 else Node("and", children)

    def primary(depth: int) -> Node:
        if peek() == "(":
            take("(")
            node = expr(depth + 1)
            take(")")
            return node
        if peek() == "NUM":
            k = int(take("NUM"))
            take("of")
            take("(")
            children = [expr(depth + 1)]
            while peek() == ",":
                take(",")
                children.append(expr(depth + 1))
            take(")")
            need(1 <= k <= len(children), "policy: threshold k outside 1..n")
            return Node("of", children, k=k)
        return Node("leaf", attr=take("ATTR"))

    tree = expr(1)
    need(pos == len(toks), "policy: trailing tokens")
    need(tree_depth(tree) <= MAX_DEPTH, "policy: tree too deep")
    need(len(leaves(tree)) <= MAX_LEAVES, "policy: too many leaves")
    return tree


def tree_depth(n: Node) -> int:
    return 1 + max((tree_depth(c) for c in n.children), default=0)


def leaves(n: Node) -> list[Node]:
    return [n] if n.kind == "leaf" else [leaf for c in n.children for leaf in leaves(c)]


def print_policy(n: Node) -> str:
    """§2.2 canonical printing."""
    if n.kind == "leaf":
        return n.attr
    if n.kind == "of":
        return f"{n.k} of (" + ", ".join(print_policy(c) for c in n.children) + ")"
    sep = " AND " if n.kind == "and" else " OR "
    return sep.join(
        f"({print_policy(c)})" if c.kind in ("and", "or") else print_policy(c) for c in n.children
    )


# ---------------------------------------------------------------------------------------------
# §2.3 LSSS matrix and §3.4 step 3 the choice of rows
# ---------------------------------------------------------------------------------------------

def build_lsss(tree: Node) -> tuple[list[dict[int, int]], int]:
    """Rows as sparse vectors {column: value mod r}, in leaf order, and the column count ℓ.
    Depth-first, pre-order, left to right; AND and `k of` nodes allocate their columns on entry,
    before visiting any child (column numbers follow the pre-order of those nodes)."""
    rows: list[dict[int, int]] = []
    next_col = 1

    def plus(v: dict[int, int], extra: dict[int, int]) -> dict[int, int]:
        out = dict(v)
        for j, x in extra.items():
            out[j] = (out.get(j, 0) + x) % R
        return {j: x for j, x in out.items() if x}

    def walk(n: Node, v: dict[int, int]) -> None:
        nonlocal next_col
        if n.kind == "leaf":
            n.row = len(rows)
            rows.append(v)
        elif n.kind == "or":
            for c in n.children:
                walk(c, v)
        elif n.kind == "and":  # Lewko–Waters chain over m - 1 fresh columns
            m = len(n.children)
            cols = list(range(next_col, next_col + m - 1))
            next_col += m - 1
            for i, c in enumerate(n.children):  # i is 0-based here
                if i == 0:
                    walk(c, plus(v, {cols[0]: 1}))
                elif i < m - 1:
                    walk(c, {cols[i - 1]: R - 1, cols[i]: 1})
                else:
                    walk(c, {cols[m - 2]: R - 1})
        else:  # `k of`: Vandermonde over k - 1 fresh columns; child i (1-based) adds i^t at j_t
            cols = list(range(next_col, next_col + n.k - 1))
            next_col += n.k - 1
            for i, c in enumerate(n.children, start=1):
                walk(c, plus(v, {j: pow(i, t, R) for t, j in enumerate(cols, start=1)}))

    walk(tree, {0: 1})
    return rows, next_col


def choose_rows(tree: Node, usable: set[int]) -> dict[int, int] | None:
    """Fewest rows by dynamic programming (§3.4 step 3): AND all children, OR the cheapest
    child, `k of` the k cheapest satisfiable children (ties to the leftmost); coefficients per
    §2.3 (Lagrange at 0 for thresholds, multiplied along the path). None if unsatisfiable."""
    if tree.kind == "leaf":
        return {tree.row: 1} if tree.row in usable else None
    subs = [choose_rows(c, usable) for c in tree.children]
    if tree.kind == "and":
        if any(s is None for s in subs):
            return None
        return {x: c for s in subs for x, c in s.items()}
    if tree.kind == "or":
        ok = [s for s in subs if s is not None]
        return min(ok, key=len) if ok else None  # min keeps the leftmost of equal sizes
    ok = sorted(((len(s), i, s) for i, s in enumerate(subs, start=1) if s is not None),
                key=lambda t: (t[0], t[1]))
    if len(ok) < tree.k:
        return None
    chosen = ok[: tree.k]
    positions = [i for _, i, _ in chosen]
    out: dict[int, int] = {}
    for _, i, s in chosen:
        lag = 1
        for j in positions:
            if j != i:
                lag = lag * j * pow(j - i, -1, R) % R
        for x, c in s.items():
            out[x] = c * lag % R
    return out


# ---------------------------------------------------------------------------------------------
# §5 keys and §9.5 the key export
# ---------------------------------------------------------------------------------------------

class Reader:
    """Reads an object exactly: truncation and trailing bytes are errors (§1.3)."""

    def __init__(self, b: bytes, what: str):
        self.b, self.pos, self.what = b, 0, what

    def take(self, n: int) -> bytes:
        need(self.pos + n <= len(self.b), f"{self.what}: truncated")
        self.pos += n
        return self.b[self.pos - n:self.pos]

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def header(self, kind: bytes) -> None:  # §1.2
        need(self.take(4) == b"MABE", f"{self.what}: bad magic")
        need(self.take(1) == kind, f"{self.what}: not a {kind.decode()!r} object")
        need(self.take(1) == b"\x01", f"{self.what}: format version is not 1")

    def attribute(self) -> str:
        n = self.u32()
        need(n <= 192, f"{self.what}: attribute too long")
        text = self.take(n).decode("ascii", errors="replace")
        need(canonical_attribute(text), f"{self.what}: attribute not canonical")
        return text

    def version(self) -> int:
        v = self.u32()
        need(v != 0, f"{self.what}: version 0")
        return v

    def end(self) -> None:
        need(self.pos == len(self.b), f"{self.what}: trailing bytes")


def parse_public_key(b: bytes, what: str) -> tuple[str, int, bytes, bytes]:
    """§5.1 'P': lp(attribute) ‖ be32(version) ‖ E (GT, 576) ‖ Y (G1, 48)."""
    need(len(b) <= 1024, f"{what}: too long")
    r = Reader(b, what)
    r.header(b"P")
    attr, version = r.attribute(), r.version()
    e, y = r.take(576), r.take(48)
    r.end()
    return attr, version, e, y


def parse_user_key(b: bytes, what: str) -> tuple[bytes, str, int, bytes]:
    """§5.3 'K': GID (32) ‖ lp(attribute) ‖ be32(version) ‖ K (G2, 96)."""
    need(len(b) <= 512, f"{what}: too long")
    r = Reader(b, what)
    r.header(b"K")
    gid = r.take(32)
    attr, version = r.attribute(), r.version()
    k = r.take(96)
    r.end()
    return gid, attr, version, k


def unhex(s, n: int | None, what: str) -> bytes:
    need(isinstance(s, str) and re.fullmatch(r"(?:[0-9a-f]{2})*", s) is not None,
         f"{what}: not lowercase hex")
    b = bytes.fromhex(s)
    need(n is None or len(b) == n, f"{what}: expected {n} bytes")
    return b


def integer(v, what: str) -> int:
    need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"{what}: not an integer")
    return v


class KeyExport:
    """§9.5. Objects are parsed structurally here; group elements are decoded (with all the
    checks of §1.3) only for the entries a decryption needs."""

    def __init__(self, doc):
        need(isinstance(doc, dict) and doc.get("format") == "mabe-key-export-v1",
             "key export: format is not mabe-key-export-v1")
        self.gid = unhex(doc.get("gid"), 32, "key export gid")
        self.keys: dict[tuple[str, int], bytes] = {}
        self.public: dict[tuple[str, int], tuple[bytes, bytes]] = {}
        for n, e in enumerate(doc.get("keys") or []):
            what = f"key export: keys[{n}]"
            gid, attr, version, k = parse_user_key(unhex(e.get("object"), None, what), what)
            need(gid == self.gid, f"{what}: key for another GID")
            need((attr, version) == (e.get("attribute"), integer(e.get("version"), what)),
                 f"{what}: attribute or version differs from its object")
            need((attr, version) not in self.keys, f"{what}: duplicate key")
            # expires_at is informational: an expired grant is revoked by rotation (§6),
            # which moves records to a version this key does not have.
            self.keys[(attr, version)] = k
        for n, e in enumerate(doc.get("public_keys") or []):
            what = f"key export: public_keys[{n}]"
            attr, version, big_e, y = parse_public_key(unhex(e.get("object"), None, what), what)
            need((attr, version) == (e.get("attribute"), integer(e.get("version"), what)),
                 f"{what}: attribute or version differs from its object")
            prev = self.public.get((attr, version))
            need(prev is None or prev == (big_e, y), f"{what}: two public keys for one version")
            self.public[(attr, version)] = (big_e, y)

    def public_key(self, attr: str, version: int):
        enc = self.public.get((attr, version))
        need(enc is not None, f"no public key for {attr} version {version} in the key export")
        e = de_gt(enc[0], f"public key {attr}#{version} E")
        need(e != FQ12.one(), f"public key {attr}#{version}: E is 1")
        return e, de_g1(enc[1], f"public key {attr}#{version} Y")

    def user_key(self, attr: str, version: int):
        return de_g2(self.keys[(attr, version)], f"key {attr}#{version}")


# ---------------------------------------------------------------------------------------------
# §3.1 header (from the JSON of §9.2) and §9.1 the record container
# ---------------------------------------------------------------------------------------------

class Row:
    def __init__(self, attr: str, version: int, c1: bytes, c2: bytes, c3: bytes):
        self.attr, self.version, self.c1, self.c2, self.c3 = attr, version, c1, c2, c3


class Header:
    def __init__(self, h):
        need(isinstance(h, dict), "inspect JSON: no header")
        need(h.get("suite") == 1, "header: suite is not 1")
        self.rid = unhex(h.get("rid"), 16, "header rid")
        self.policy = h.get("policy")
        need(isinstance(self.policy, str), "header: no policy")
        self.rows = []
        for x, r in enumerate(h.get("rows") or []):
            what = f"header row {x}"
            need(r.get("index") == x, f"{what}: index out of order")
            need(isinstance(r.get("attribute"), str), f"{what}: no attribute")
            version = integer(r.get("version"), what)
            need(1 <= version <= 0xFFFFFFFF, f"{what}: version outside 1..2^32-1")
            self.rows.append(Row(r["attribute"], version, unhex(r.get("c1"), 576, what + " c1"),
                                 unhex(r.get("c2"), 48, what + " c2"),
                                 unhex(r.get("c3"), 48, what + " c3")))
        self.c0 = unhex(h.get("c0"), 32, "header c0")
        self.nonce_prefix = unhex(h.get("nonce_prefix"), 7, "header nonce_prefix")
        self.segment_size = integer(h.get("segment_size"), "header segment_size")
        need(1024 <= self.segment_size <= 16 * 1024 * 1024, "header: segment size out of range")
        self.kc = unhex(h.get("key_commitment"), 32, "header key_commitment")
        self.json_h_imm = unhex(h.get("h_imm"), 32, "header h_imm")
        self.json_h_auth = unhex(h.get("h_auth"), 32, "header h_auth")

    def to_bytes(self) -> bytes:
        """§3.1 layout: what the record must hold, byte for byte."""
        out = b"MABEH\x01" + be16(1) + self.rid + lp(self.policy.encode()) + be32(len(self.rows))
        for r in self.rows:
            out += be32(r.version) + r.c1 + r.c2 + r.c3
        return out + self.c0 + self.nonce_prefix + be32(self.segment_size) + self.kc

    def h_imm(self) -> bytes:  # §3.2 step 3
        return hashlib.sha256(
            TAG_HDR + be16(1) + self.rid + lp(self.policy.encode()) + be32(len(self.rows))
            + b"".join(lp(r.attr.encode()) for r in self.rows)
        ).digest()

    def h_auth(self, h_imm: bytes) -> bytes:  # §3.2 step 8
        return hashlib.sha256(
            h_imm + self.c0 + b"".join(r.c2 for r in self.rows) + self.nonce_prefix
            + be32(self.segment_size)
        ).digest()


def split_record(record: bytes, doc, header: Header) -> tuple[bytes, bytes, bytes, bytes]:
    """§9.1: check the container against the JSON; return (writer GID, writer key, payload,
    signature). The payload starts at payload_offset (§9.2) and the signature is the last 64
    bytes."""
    need(doc.get("object") == "record", "inspect JSON: not a record")
    need(record[:6] == b"MABER\x01", "record: bad magic, kind or version")
    need(len(record) >= 10, "record: truncated")
    L = struct.unpack(">I", record[6:10])[0]
    need(L <= 1 << 20 and L == doc.get("header_length"), "record: header length")
    need(record[10:10 + L] == header.to_bytes(), "record: its header differs from the JSON")
    need(len(record) > 10 + L, "record: truncated")
    signer = record[10 + L]
    need(signer != 0, "record: unsigned (refused)")
    need(signer == 1, "record: unknown signer type")
    gid, key = record[11 + L:43 + L], record[43 + L:75 + L]
    s = doc.get("signer") or {}
    need(s.get("type") == "ed25519" and unhex(s.get("gid"), 32, "signer gid") == gid
         and unhex(s.get("public_key"), 32, "signer key") == key,
         "record: signer differs from the JSON")
    offset = integer(doc.get("payload_offset"), "payload_offset")
    need(offset == 75 + L, "record: payload_offset")
    length = integer(doc.get("payload_length"), "payload_length")
    need(len(record) == offset + length + 64, "record: length differs from the JSON")
    sig = record[offset + length:]
    need(unhex(doc.get("signature"), 64, "signature") == sig,
         "record: signature differs from the JSON")
    return gid, key, record[offset:offset + length], sig


# ---------------------------------------------------------------------------------------------
# §9.1 the writer's signature (Ed25519, verified strictly)
# ---------------------------------------------------------------------------------------------

ED_P = 2**255 - 19
ED_D = -121665 * pow(121666, -1, ED_P) % ED_P


def ed_small_order(enc: bytes) -> bool:
    """Whether a point encoding decodes to a point of order dividing 8 (or does not decode):
    what verify_strict refuses for the key and for R, on top of RFC 8032's checks."""
    y = int.from_bytes(enc, "little") & ((1 << 255) - 1)
    y %= ED_P
    x2 = (y * y - 1) * pow(ED_D * y * y + 1, -1, ED_P) % ED_P
    x = pow(x2, (ED_P + 3) // 8, ED_P)
    if x * x % ED_P != x2:
        x = x * pow(2, (ED_P - 1) // 4, ED_P) % ED_P
    if x * x % ED_P != x2:
        return True
    pt = (x, y)
    for _ in range(3):  # 8·pt by three doublings (a = -1 twisted Edwards addition law)
        (x1, y1) = pt
        t = ED_D * x1 * x1 * y1 * y1 % ED_P
        pt = (2 * x1 * y1 * pow(1 + t, -1, ED_P) % ED_P,
              (y1 * y1 + x1 * x1) * pow(1 - t, -1, ED_P) % ED_P)
    return pt == (0, 1)


def verify_signature(header: Header, h_imm: bytes, h_auth: bytes, gid: bytes, key: bytes,
                     payload: bytes, sig: bytes) -> None:
    need(len(payload) >= 16, "record: payload shorter than one tag")
    msg = (SIG_TAG + h_imm + h_auth + gid + key + hashlib.sha256(payload).digest()
           + payload[-16:])
    assert len(msg) == 194
    need(not ed_small_order(key) and not ed_small_order(sig[:32]),
         "record: signature refused (small-order key or R)")
    try:  # RFC 8032 verification, which also requires a canonical S
        Ed25519PublicKey.from_public_bytes(key).verify(sig, msg)
    except (InvalidSignature, ValueError):
        raise Refused("record: the writer's signature does not verify") from None


# ---------------------------------------------------------------------------------------------
# §3.4 decapsulation with the full FO re-encryption check
# ---------------------------------------------------------------------------------------------

def decapsulate(header: Header, keys: KeyExport, h_imm: bytes, h_auth: bytes) -> bytes:
    """Returns DEK, or raises Refused."""
    # §2.2: the header's policy is canonical, and its leaves are the rows' attributes.
    tree = parse_policy(header.policy)
    need(print_policy(tree) == header.policy, "header: policy text is not canonical")
    leaf_nodes = leaves(tree)
    need(len(leaf_nodes) == len(header.rows), "header: row count differs from the leaves")
    need(all(n.attr == r.attr for n, r in zip(leaf_nodes, header.rows)),
         "header: a row's attribute differs from its leaf")
    matrix, ell = build_lsss(tree)

    # §3.4 steps 1-2: decode every row with validation, and every row's public key.
    for x, r in enumerate(header.rows):
        r.C1 = de_gt(r.c1, f"row {x} C1")
        r.C2 = de_g1(r.c2, f"row {x} C2")
        r.C3 = de_g1(r.c3, f"row {x} C3")
    pks = {(r.attr, r.version): None for r in header.rows}
    for a, v in pks:
        pks[(a, v)] = keys.public_key(a, v)

    # Step 3: usable rows are those whose (attribute, version) we hold a key for.
    usable = {x for x, r in enumerate(header.rows) if (r.attr, r.version) in keys.keys}
    chosen = choose_rows(tree, usable)
    if chosen is None:
        held = ", ".join(f"{a}#{v}" for a, v in sorted(keys.keys)) or "none"
        need_ = ", ".join(sorted({f"{r.attr}#{r.version}" for r in header.rows}))
        raise Refused(f"the keys in the export do not satisfy the policy {header.policy!r} "
                      f"(rows need {need_}; keys held: {held})")
    total = {}
    for x, c in chosen.items():  # Σ c_x·A_x must be e_0
        for j, a in matrix[x].items():
            total[j] = (total.get(j, 0) + c * a) % R
    need({j: a for j, a in total.items() if a} == {0: 1},
         "internal: the coefficients do not reconstruct e_0")

    # Step 4: Z = Π C1^c · e(Σ c·C3, H(GID)) · Π e(−c·C2, K), one multi-pairing.
    hg = hash_gid(keys.gid)
    prod, sum_c3, pairs = FQ12.one(), Z1, []
    for x, c in sorted(chosen.items()):
        r = header.rows[x]
        prod = prod * gt_pow(r.C1, c)
        sum_c3 = add(sum_c3, g1_mul(r.C3, c))
        pairs.append((g1_mul(r.C2, -c), keys.user_key(r.attr, r.version)))
    if not is_inf(sum_c3):
        pairs.append((sum_c3, hg))
    z = prod * ark_multi_pairing(pairs)

    # Step 5: unmask m.
    m = bytes(a ^ b for a, b in zip(header.c0, hkdf(ser_gt(z), TAG_MASK, h_imm, 32)))

    # Step 6: FO re-encryption check of every row, with its public key at its version (§3.2).
    prk = hkdf_extract(TAG_FO, m)
    s = hs(prk, h_imm + b"s")
    u = [s] + [hs(prk, h_imm + b"v" + be32(k)) for k in range(2, ell + 1)]
    w = [0] + [hs(prk, h_imm + b"w" + be32(k)) for k in range(2, ell + 1)]
    ok = EGG ** s == z
    for x, r in enumerate(header.rows):
        if not ok:
            break
        rx = hs(prk, h_imm + b"r" + be32(x + 1))
        lam = sum(a * u[j] for j, a in matrix[x].items()) % R
        omega = sum(a * w[j] for j, a in matrix[x].items()) % R
        e, y = pks[(r.attr, r.version)]
        ok = (eq(multiply(G1, rx), r.C2)
              and eq(add(multiply(y, rx), multiply(G1, omega)), r.C3)
              and gt_pow(EGG, lam) * e ** rx == r.C1)

    # Step 7: key commitment, in constant time.
    okm = hkdf(m, h_auth, TAG_DEM, 64)
    ok = hmac.compare_digest(okm[32:], header.kc) and ok
    need(ok, "cannot decrypt (the re-encryption check or the key commitment failed)")
    return okm[:32]


# ---------------------------------------------------------------------------------------------
# §4 payload: STREAM over AES-256-GCM
# ---------------------------------------------------------------------------------------------

def open_payload(dek: bytes, header: Header, h_auth: bytes, payload: bytes) -> bytes:
    seg = header.segment_size + 16
    aead, out, pos, i = AESGCM(dek), [], 0, 0
    while True:
        need(i < 2**32, "payload: too many segments")
        last = len(payload) - pos <= seg  # no byte after this segment
        chunk = payload[pos:pos + seg]
        need(len(chunk) >= 16, "payload: truncated segment")
        need(not (last and len(chunk) == 16 and i > 0), "payload: empty last segment")
        nonce = header.nonce_prefix + be32(i) + (b"\x01" if last else b"\x00")
        try:
            out.append(aead.decrypt(nonce, chunk, h_auth))
        except InvalidTag:
            raise Refused(f"payload: segment {i} does not authenticate") from None
        if last:
            return b"".join(out)
        pos += seg
        i += 1


# ---------------------------------------------------------------------------------------------

def decrypt(inspect_doc, record: bytes, export_doc) -> bytes:
    header = Header(inspect_doc.get("header"))
    keys = KeyExport(export_doc)
    gid, key, payload, sig = split_record(record, inspect_doc, header)
    h_imm = header.h_imm()
    h_auth = header.h_auth(h_imm)
    need(h_imm == header.json_h_imm, "header: h_imm differs from the recomputed one")
    need(h_auth == header.json_h_auth, "header: h_auth differs from the recomputed one")
    verify_signature(header, h_imm, h_auth, gid, key, payload, sig)
    dek = decapsulate(header, keys, h_imm, h_auth)
    return open_payload(dek, header, h_auth, payload)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inspect", help="output of `mabe inspect --json RECORD`")
    ap.add_argument("--record", help="the record file")
    ap.add_argument("--keys", help="output of `mabe keys export`")
    ap.add_argument("--out", help="plaintext file (default: stdout)")
    ap.add_argument("--known-answers", action="store_true",
                    help="only check the known answers of FORMAT.md §2.4, §2.5 and §7")
    args = ap.parse_args()
    if not args.known_answers and not (args.inspect and args.record and args.keys):
        ap.error("--inspect, --record and --keys are required")
    try:
        check_known_answers()
        if args.known_answers:
            print("known answers: ok (egg, GID, H(GID))", file=sys.stderr)
            return 0
        with open(args.inspect, encoding="utf-8") as f:
            inspect_doc = json.load(f)
        with open(args.record, "rb") as f:
            record = f.read()
        with open(args.keys, encoding="utf-8") as f:
            export_doc = json.load(f)
        need(isinstance(inspect_doc, dict), "inspect JSON: not an object")
        plaintext = decrypt(inspect_doc, record, export_doc)
    except Refused as e:
        print(f"mabe_decrypt: refused: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        print(f"mabe_decrypt: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if args.out:
        with open(args.out, "wb") as f:
            f.write(plaintext)
    else:
        sys.stdout.buffer.write(plaintext)
        sys.stdout.buffer.flush()
    print(f"mabe_decrypt: decrypted {len(plaintext)} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
