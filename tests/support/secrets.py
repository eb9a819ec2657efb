"""URL cases with credentials in awkward places, and the check that a text holds none of their secrets."""

from __future__ import annotations

import re
from urllib.parse import quote

SLASHY = "Xq7/Zk9?Mv3#Wp5=="  # like a/b?c#d==


AT_COLON = "Pq8@Ss2:Wr4/Rd6"  # like p@ss:w/rd


PLAIN = "sekretQ1zz"


CASES = [
    ("redis://:{pw}@127.0.0.1:{port}/0", SLASHY),
    ("redis://:{pw}@127.0.0.1:{port}/0", AT_COLON),
    ("redis://:{enc}@127.0.0.1:{port}/0", SLASHY),
    ("redis://:{enc}@127.0.0.1:{port}/0", AT_COLON),
    ("redis://alice:{pw}@127.0.0.1:{port}/0", SLASHY),
    ("redis://alice:{enc}@127.0.0.1:{port}/0", AT_COLON),
    ("redis://{pw}@127.0.0.1:{port}/0", SLASHY),  # password-only, no colon
    ("redis://{enc}@127.0.0.1:{port}/0", PLAIN),
    ("redis://127.0.0.1:{port}/0?password={enc}", PLAIN),
    ("redis://127.0.0.1:{port}/0?password={enc}", SLASHY),
    ("redis://127.0.0.1:{port}/0?password={pw}", PLAIN),
    ("rediss://alice:{pw}@127.0.0.1:{port}/0", PLAIN),
]


def _url(template: str, secret: str, port: int) -> str:
    return template.format(pw=secret, enc=quote(secret, safe=""), port=port)


def _pieces(secret: str) -> set[str]:
    """The secret, its encoded form, and every chunk between special characters (each >= 3 chars)."""
    chunks = {c for c in re.split(r"[/?#@:=]+", secret) if len(c) >= 3}
    return {secret, quote(secret, safe=""), *chunks}


def assert_no_secret(text: str, *secrets: str) -> None:
    for secret in secrets:
        leaked = [piece for piece in _pieces(secret) if piece in text]
        assert not leaked, f"{leaked} leaked in {text!r}"


SENTINEL_CASES = [
    ("redis+sentinel://:{enc}@127.0.0.1:{port}/mymaster/0?sentinel_password={senc}", SLASHY, AT_COLON),
    ("redis+sentinel://alice:{enc}@127.0.0.1:{port},127.0.0.1:1/mymaster?sentinel_password={senc}", AT_COLON, PLAIN),
    ("rediss+sentinel://{enc}@127.0.0.1:{port}/mymaster?sentinel_username=s&sentinel_password={senc}", PLAIN, SLASHY),
    ("redis+sentinel://:{pw}@127.0.0.1:{port}/mymaster?sentinel_password={senc}", SLASHY, PLAIN),  # unencoded
    ("redis+sentinel://:{pw}@127.0.0.1:{port}/mymaster?sentinel_password={senc}", AT_COLON, SLASHY),
    ("redis+sentinel://127.0.0.1:{port}/mymaster?sentinel_password={spw}", PLAIN, PLAIN),
    ("redis+sentinel://:{enc}@127.0.0.1:{port}/mymaster?sentinel_password={spw}&bogus=1", PLAIN, "Zz9Yy8Xx7"),
]


def _sentinel_url(template: str, secret: str, sentinel_secret: str, port: int) -> str:
    return template.format(pw=secret, enc=quote(secret, safe=""), spw=sentinel_secret,
                           senc=quote(sentinel_secret, safe=""), port=port)

