"""AWS Signature Version 4 for one HTTPS request (header form, AWS4-HMAC-SHA256), as Amazon SES API v2 needs it.

The steps and their names follow AWS's "Create a signed AWS API request" and the aws-sig-v4-test-suite, against
whose published vectors tests/test_sigv4.py checks every step:

    canonical request = method, canonical URI, canonical query, canonical headers, signed headers, payload hash
    string to sign    = "AWS4-HMAC-SHA256", X-Amz-Date, scope (date/region/service/aws4_request), hash of the above
    signing key       = HMAC-SHA256 chain "AWS4"+secret -> date -> region -> service -> "aws4_request"

Every header handed to `sign` is signed (with Host and X-Amz-Date, which it adds); the HTTP client may add
others (User-Agent, Accept-Encoding), which stay unsigned and which AWS then ignores. Temporary credentials
(X-Amz-Security-Token) are not supported. The path is not normalised (no "." or ".." segments, no "//"):
SES paths are fixed.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping
from urllib.parse import quote, unquote, urlsplit

from mailwatchd.settings.credentials import Secret

ALGORITHM = "AWS4-HMAC-SHA256"
TERMINATOR = "aws4_request"
_UNRESERVED = "-_.~"  # RFC 3986 unreserved, besides letters and digits: never percent-encoded
# What may stand in a URL path as it goes on the wire (RFC 3986 pchar and "/"): a path holding anything else
# would be re-encoded by the HTTP client after signing, and AWS would compute another signature.
_WIRE_PATH = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@/%")


def amz_date(now: float) -> str:
    """X-Amz-Date for `now` (epoch seconds): ISO 8601 basic format in UTC, 20150830T123600Z."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))


def credential_scope(date: str, region: str, service: str) -> str:
    """date (YYYYMMDD) / region / service / aws4_request."""
    return f"{date}/{region}/{service}/{TERMINATOR}"


def canonical_uri(path: str) -> str:
    """The path URI-encoded once more (AWS: twice for every service but S3, the client having encoded it once)."""
    return quote(path or "/", safe="/~")


def canonical_query(query: str) -> str:
    """Name=value pairs decoded, re-encoded with only unreserved characters left bare, sorted by name then value."""
    if not query:
        return ""
    pairs = []
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        pairs.append((quote(unquote(name), safe=_UNRESERVED), quote(unquote(value), safe=_UNRESERVED)))
    return "&".join(f"{name}={value}" for name, value in sorted(pairs))


def canonical_headers(headers: Iterable[tuple[str, str]]) -> tuple[str, str]:
    """(canonical header block, signed header list): names in lower case and sorted, each value trimmed with
    inner runs of white space made one space, a repeated header's values joined by "," in the order given."""
    values: dict[str, list[str]] = {}
    for name, value in headers:
        values.setdefault(name.strip().lower(), []).append(" ".join(value.split()))
    names = sorted(values)
    block = "".join(f"{name}:{','.join(values[name])}\n" for name in names)
    return block, ";".join(names)


def canonical_request(method: str, path: str, query: str, headers: Iterable[tuple[str, str]],
                      payload_hash: str) -> tuple[str, str]:
    """(canonical request, signed header list) for a request whose body hashes (hex SHA-256) to `payload_hash`."""
    block, signed = canonical_headers(headers)
    text = "\n".join((method.upper(), canonical_uri(path), canonical_query(query), block, signed, payload_hash))
    return text, signed


def string_to_sign(date_time: str, scope: str, canonical: str) -> str:
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    return f"{ALGORITHM}\n{date_time}\n{scope}\n{digest}"


def signing_key(secret: Secret, date: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret.reveal()).encode("utf-8")
    for part in (date, region, service, TERMINATOR):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return key


def signature(secret: Secret, date_time: str, region: str, service: str, canonical: str) -> str:
    """The hex signature of a canonical request made at `date_time` (X-Amz-Date form)."""
    date = date_time[:8]
    text = string_to_sign(date_time, credential_scope(date, region, service), canonical)
    return hmac.new(signing_key(secret, date, region, service), text.encode("utf-8"), hashlib.sha256).hexdigest()


def authorization(key_id: str, secret: Secret, date_time: str, region: str, service: str, canonical: str,
                  signed_headers: str) -> str:
    """The Authorization header's value."""
    scope = credential_scope(date_time[:8], region, service)
    return (f"{ALGORITHM} Credential={key_id}/{scope}, SignedHeaders={signed_headers}, "
            f"Signature={signature(secret, date_time, region, service, canonical)}")


def host_header(url: str) -> str:
    """The Host header for `url`: host in lower case, with the port unless it is the scheme's default."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    default = {"https": 443, "http": 80}.get(parts.scheme)
    return host if parts.port is None or parts.port == default else f"{host}:{parts.port}"


def sign(method: str, url: str, headers: Mapping[str, str], body: bytes, *, key_id: str, secret: Secret,
         region: str, service: str, now: float) -> dict[str, str]:
    """`headers` with Host, X-Amz-Date and Authorization added: the request signed for `service` in `region`
    at `now` (epoch seconds). The Host header must go out as given here, since it is signed."""
    parts = urlsplit(url)
    if not _WIRE_PATH.issuperset(parts.path) or not _WIRE_PATH.issuperset(parts.query):
        raise ValueError("the URL's path and query must be in their percent-encoded form to be signed")
    signed = {name: value for name, value in headers.items()
              if name.lower() not in ("authorization", "host", "x-amz-date")}
    date_time = amz_date(now)
    signed = {"Host": host_header(url), **signed, "X-Amz-Date": date_time}
    canonical, signed_headers = canonical_request(method, parts.path, parts.query, signed.items(),
                                                  hashlib.sha256(body).hexdigest())
    signed["Authorization"] = authorization(key_id, secret, date_time, region, service, canonical, signed_headers)
    return signed
