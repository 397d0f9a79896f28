"""The SigV4 signer against AWS's published test vectors: the aws-sig-v4-test-suite (Apache-2.0, Copyright Amazon.com,
Inc.; the copy in botocore's tests/unit/auth/aws4_testsuite, which botocore runs), each request with its expected
canonical request, string to sign and Authorization header; plus the signing-key example of AWS's "Examples of how
to derive a signing key for Signature Version 4"."""

from __future__ import annotations

import calendar
import hashlib
from typing import NamedTuple

import pytest

from mailwatchd.settings.credentials import Secret
from mailwatchd.transports.api.sigv4 import (
    amz_date,
    authorization,
    canonical_headers,
    canonical_request,
    host_header,
    sign,
    signing_key,
    string_to_sign,
)

KEY_ID = "AKIDEXAMPLE"
SECRET = Secret("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
REGION, SERVICE = "us-east-1", "service"
DATE_TIME = "20150830T123600Z"
NOW = float(calendar.timegm((2015, 8, 30, 12, 36, 0)))
SCOPE = "20150830/us-east-1/service/aws4_request"


class Vector(NamedTuple):
    name: str
    request: str  # the .req file: request line, headers, blank line and body
    canonical: str  # the .creq file
    canonical_hash: str  # the last line of the .sts file
    signed_headers: str  # from the .authz file
    signature: str  # from the .authz file

    @property
    def string_to_sign(self) -> str:
        return f"AWS4-HMAC-SHA256\n{DATE_TIME}\n{SCOPE}\n{self.canonical_hash}"

    @property
    def authorization(self) -> str:
        return (f"AWS4-HMAC-SHA256 Credential={KEY_ID}/{SCOPE}, SignedHeaders={self.signed_headers}, "
                f"Signature={self.signature}")

    def parsed(self) -> tuple[str, str, str, list[tuple[str, str]], bytes]:
        """(method, path, query, headers, body) of the raw request."""
        head, _, body = self.request.partition("\n\n")
        request_line, *header_lines = head.split("\n")
        method, _, target = request_line.partition(" ")
        target = target.rsplit(" ", 1)[0]  # "HTTP/1.1"; a path may hold a space (get-space)
        path, _, query = target.partition("?")
        headers = [(name, value) for name, _, value in (line.partition(":") for line in header_lines if line)]
        return method, path, query, headers, body.encode()


VECTORS = [
    Vector(
        "get-vanilla",
        "GET / HTTP/1.1\n"
        "Host:example.amazonaws.com\n"
        "X-Amz-Date:20150830T123600Z",
        "GET\n"
        "/\n"
        "\n"
        "host:example.amazonaws.com\n"
        "x-amz-date:20150830T123600Z\n"
        "\n"
        "host;x-amz-date\n"
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "bb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63",
        "host;x-amz-date",
        "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
    ),
    Vector(
        "post-vanilla",
        "POST / HTTP/1.1\n"
        "Host:example.amazonaws.com\n"
        "X-Amz-Date:20150830T123600Z",
        "POST\n"
        "/\n"
        "\n"
        "host:example.amazonaws.com\n"
        "x-amz-date:20150830T123600Z\n"
        "\n"
        "host;x-amz-date\n"
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "553f88c9e4d10fc9e109e2aeb65f030801b70c2f6468faca261d401ae622fc87",
        "host;x-amz-date",
        "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b",
    ),
    Vector(
        "get-vanilla-query",
        "GET / HTTP/1.1\n"
        "Host:example.amazonaws.com\n"
        "X-Amz-Date:20150830T123600Z",
        "GET\n"
        "/\n"
        "\n"
        "host:example.amazonaws.com\n"
        "x-amz-date:20150830T123600Z\n"
        "\n"
        "host;x-amz-date\n"
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "bb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63",
        "host;x-amz-date",
        "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
    ),
    Vector(
        "post-vanilla-query",
        "POST /?Param1=value1 HTTP/1.1\n"
        "Host:example.amazonaws.com\n"
        "X-Amz-Date:20150830T123600Z",
        "POST\n"
        "/\n"
        "Param1=value1\n"
        "host:example.amazonaws.com\n"
        "x-amz-date:20150830T123600Z\n"
        "\n"
        "host;x-amz-date\n"
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "9d659678c1756bb3113e2ce898845a0a79dbbc57b740555917687f1b3340fbbd",
        "host;x-amz-date",
        "28038455d6de14eafc1f9222cf5aa6f1a96197d7deb8263271d420d138af7f11",
    ),
    Vector(
        "get-vanilla-empty-query-key",
        "GET /?Param1=value1 HTTP/1.1\n"
        "Host:example.amazonaws.com\n"
        "X-Amz-Date:20150830T123600Z",
        "GET\n"
        "/\n"
        "Param1=value1\n"
        "host:example.amazonaws.com\n"
        "x-amz-date:20150830T123600Z\n"
        "\n"
        "host;x-amz-date\n"
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "1e24db194ed7d0eec2de28d7369675a243488e08526e8c1c73571282f7c517ab",
        "host;x-amz-date",
        "a67d582fa61cc504c4bae71f336f98b97f1ea3c7a6bfe1b6e45aec72011b9aeb",
    ),
    Vector(
        "get-vanilla-query-order-key-case",
        "GET /?Param2=value2&Param1=value1 HTTP/1.1\n"
        "Host:example.amazonaws.com\n"
        "X-Amz-Date:20150830T123600Z",
        "GET\n"
        "/\n"
        "Param1=value1&Param2=value2\n"
        "host:example.amazonaws.com\n"
        "x-amz-date:20150830T123600Z\n"
        "\n"
        "host;x-amz-date\n"
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "816cd5b414d056048ba4f7c5386d6e0533120fb1fcfa93762cf0fc39e2cf19e0",
        "host;x-amz-date",
        "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
    ),
    Vector(
        "get-vanilla-query-order-value",
        "GET /?Param1=value2&Param1=value1 HTTP/1.1\n"
        "Host:example.amazonaws.com\n"
        "X-Amz-Date:20150830T123600Z",
        "GET\n"
        "/\n"
        "Param1=value1&Param1=value2\n"
        "host:example.amazonaws.com\n"
        "x-amz-date:20150830T123600Z\n"
        "\n"
        "host;x-amz-date\n"
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "c968629d70850097a2d8781c9bf7edcb988b04cac14cca9be4acc3595f884606",
        "host;x-amz-date",
        "5772eed61e12b33fae39ee5e7012498b51d56abc0abb7c60486157bd471c4694",
    ),
    Vector(
        "get-vanilla-query-order-encoded",
        "GET /?Param-3=Value3&Param=Value2&%E1%88%B4=Value1 HTTP/1.1\n"
        "Host:example.amazonaws.com\n"
        "X-Amz-Date:20150830T123600Z\n",
        "GET\n"
        "/\n"
        "%E1%88%B4=Value1&Param=Value2&Param-3=Value3\n"
        "host:example.amazonaws.com\n"
        "x-amz-date:20150830T123600Z\n"
        "\n"
        "host;x-amz-date\n"
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "868294f5c38bd141c4972a373a76654f1418a8e4fc18b2e7903ae45e8ae0ec71",
        "host;x-amz-date",
        "371d3713e185cc334048618a97f809c9ffe339c62934c032af5a0e595648fcac",
    ),
    Vector(
        "get-vanilla-query-unreserved",
        "GET /?-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz=-._~0123456789ABC"
        "DEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz HTTP/1.1\n"
        "Host:example.amazonaws.com\n"
        "X-Amz-Date:20150830T123600Z",
        "GET\n"
        "/\n"
        "-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz=-._~0123456789ABCDEFGHI"
        "JKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\n"
        "host:example.amazonaws.com\n"
        "x-amz-date:20150830T123600Z\n"
        "\n"
        "host;x-amz-date\n"
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "c30d4703d9f799439be92736156d47ccfb2d879ddf56f5befa6d1d6aab979177",
        "host;x-amz-date",
        "9c3e54bfcdf0b19771a7f523ee5669cdf59bc7cc0884027167c21bb143a40197",
    ),
    Vector(
        "get-vanilla-utf8-query",
        "GET /?ሴ=bar HTTP/1.1\n"
        "Host:example.amazonaws.com\n"
        "X-Amz-Date:20150830T123600Z",
        "GET\n"
        "/\n"
        "%E1%88%B4=bar\n"
        "host:example.amazonaws.com\n"
        "x-amz-date:20150830T123600Z\n"
        "\n"
        "host;x-amz-date\n"
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "eb30c5bed55734080471a834cc727ae56beb50e5f39d1bff6d0d38cb192a7073",
        "host;x-amz-date",
        "2cdec8eed098649ff3a119c94853b13c643bcf08f8b0a1d91e12c9027818dd04",
    ),
    Vector(
        "get-utf8",
        "GET /ሴ HTTP/1.1\n"
        "Host:example.amazonaws.com\n"
        "X-Amz-Date:20150830T123600Z",
        "GET\n"
        "/%E1%88%B4\n"
        "\n"
        "host:example.amazonaws.com\n"
        "x-amz-date:20150830T123600Z\n"
        "\n"
        "host;x-amz-date\n"
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "2a0a97d02205e45ce2e994789806b19270cfbbb0921b278ccf58f5249ac42102",
        "host;x-amz-date",
        "8318018e0b0f223aa2bbf98705b62bb787dc9c0e678f255a891fd03141be5d85",
    ),
    Vector(
        "get-unreserved",
        "GET /-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz HTTP/1.1\n"
        "Host:example.amazonaws.com\n"
        "X-Amz-Date:20150830T123600Z",
        "GET\n"
        "/-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\n"
        "\n"
        "host:example.amazonaws.com\n"
        "x-amz-date:20150830T123600Z\n"
        "\n"
        "host;x-amz-date\n"
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6a968768eefaa713e2a6b16b589a8ea192661f098f37349f4e2c0082757446f9",
        "host;x-amz-date",
        "07ef7494c76fa4850883e2b006601f940f8a34d404d0cfa977f52a65bbf5f24f",
    ),
    Vector(
        "get-space",
        "GET /example space/ HTTP/1.1\n"
        "Host:example.amazonaws.com\n"
        "X-Amz-Date:20150830T123600Z",
        "GET\n"
        "/example%20space/\n"
        "\n"
        "host:example.amazonaws.com\n"
        "x-amz-date:20150830T123600Z\n"
        "\n"
        "host;x-amz-date\n"
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "63ee75631ed7234ae61b5f736dfc7754cdccfedbff4b5128a915706ee9390d86",
        "host;x-amz-date",
        "652487583200325589f1fba4c7e578f72c47cb61beeca81406b39ddec1366741",
    ),
    Vector(
        "get-header-value-trim",
        "GET / HTTP/1.1\n"
        "Host:example.amazonaws.com\n"
        "My-Header1: value1\n"
        "My-Header2: \"a   b   c\"\n"
        "X-Amz-Date:20150830T123600Z",
        "GET\n"
        "/\n"
        "\n"
        "host:example.amazonaws.com\n"
        "my-header1:value1\n"
        "my-header2:\"a b c\"\n"
        "x-amz-date:20150830T123600Z\n"
        "\n"
        "host;my-header1;my-header2;x-amz-date\n"
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "a726db9b0df21c14f559d0a978e563112acb1b9e05476f0a6a1c7d68f28605c7",
        "host;my-header1;my-header2;x-amz-date",
        "acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736",
    ),
    Vector(
        "get-header-value-order",
        "GET / HTTP/1.1\n"
        "Host:example.amazonaws.com\n"
        "My-Header1:value4\n"
        "My-Header1:value1\n"
        "My-Header1:value3\n"
        "My-Header1:value2\n"
        "X-Amz-Date:20150830T123600Z",
        "GET\n"
        "/\n"
        "\n"
        "host:example.amazonaws.com\n"
        "my-header1:value4,value1,value3,value2\n"
        "x-amz-date:20150830T123600Z\n"
        "\n"
        "host;my-header1;x-amz-date\n"
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "31ce73cd3f3d9f66977ad3dd957dc47af14df92fcd8509f59b349e9137c58b86",
        "host;my-header1;x-amz-date",
        "08c7e5a9acfcfeb3ab6b2185e75ce8b1deb5e634ec47601a50643f830c755c01",
    ),
    Vector(
        "get-header-key-duplicate",
        "GET / HTTP/1.1\n"
        "Host:example.amazonaws.com\n"
        "My-Header1:value2\n"
        "My-Header1:value2\n"
        "My-Header1:value1\n"
        "X-Amz-Date:20150830T123600Z",
        "GET\n"
        "/\n"
        "\n"
        "host:example.amazonaws.com\n"
        "my-header1:value2,value2,value1\n"
        "x-amz-date:20150830T123600Z\n"
        "\n"
        "host;my-header1;x-amz-date\n"
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "dc7f04a3abfde8d472b0ab1a418b741b7c67174dad1551b4117b15527fbe966c",
        "host;my-header1;x-amz-date",
        "c9d5ea9f3f72853aea855b47ea873832890dbdd183b4468f858259531a5138ea",
    ),
    Vector(
        "post-header-key-case",
        "POST / HTTP/1.1\n"
        "Host:example.amazonaws.com\n"
        "X-Amz-Date:20150830T123600Z",
        "POST\n"
        "/\n"
        "\n"
        "host:example.amazonaws.com\n"
        "x-amz-date:20150830T123600Z\n"
        "\n"
        "host;x-amz-date\n"
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "553f88c9e4d10fc9e109e2aeb65f030801b70c2f6468faca261d401ae622fc87",
        "host;x-amz-date",
        "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b",
    ),
    Vector(
        "post-header-key-sort",
        "POST / HTTP/1.1\n"
        "Host:example.amazonaws.com\n"
        "My-Header1:value1\n"
        "X-Amz-Date:20150830T123600Z",
        "POST\n"
        "/\n"
        "\n"
        "host:example.amazonaws.com\n"
        "my-header1:value1\n"
        "x-amz-date:20150830T123600Z\n"
        "\n"
        "host;my-header1;x-amz-date\n"
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "9368318c2967cf6de74404b30c65a91e8f6253e0a8659d6d5319f1a812f87d65",
        "host;my-header1;x-amz-date",
        "c5410059b04c1ee005303aed430f6e6645f61f4dc9e1461ec8f8916fdf18852c",
    ),
    Vector(
        "post-header-value-case",
        "POST / HTTP/1.1\n"
        "Host:example.amazonaws.com\n"
        "My-Header1:VALUE1\n"
        "X-Amz-Date:20150830T123600Z",
        "POST\n"
        "/\n"
        "\n"
        "host:example.amazonaws.com\n"
        "my-header1:VALUE1\n"
        "x-amz-date:20150830T123600Z\n"
        "\n"
        "host;my-header1;x-amz-date\n"
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "d51ced243e649e3de6ef63afbbdcbca03131a21a7103a1583706a64618606a93",
        "host;my-header1;x-amz-date",
        "cdbc9802e29d2942e5e10b5bccfdd67c5f22c7c4e8ae67b53629efa58b974b7d",
    ),
    Vector(
        "post-x-www-form-urlencoded",
        "POST / HTTP/1.1\n"
        "Content-Type:application/x-www-form-urlencoded\n"
        "Host:example.amazonaws.com\n"
        "X-Amz-Date:20150830T123600Z\n"
        "\n"
        "Param1=value1",
        "POST\n"
        "/\n"
        "\n"
        "content-type:application/x-www-form-urlencoded\n"
        "host:example.amazonaws.com\n"
        "x-amz-date:20150830T123600Z\n"
        "\n"
        "content-type;host;x-amz-date\n"
        "9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e",
        "42a5e5bb34198acb3e84da4f085bb7927f2bc277ca766e6d19c73c2154021281",
        "content-type;host;x-amz-date",
        "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a",
    ),
    Vector(
        "post-x-www-form-urlencoded-parameters",
        "POST / HTTP/1.1\n"
        "Content-Type:application/x-www-form-urlencoded; charset=utf8\n"
        "Host:example.amazonaws.com\n"
        "X-Amz-Date:20150830T123600Z\n"
        "\n"
        "Param1=value1",
        "POST\n"
        "/\n"
        "\n"
        "content-type:application/x-www-form-urlencoded; charset=utf8\n"
        "host:example.amazonaws.com\n"
        "x-amz-date:20150830T123600Z\n"
        "\n"
        "content-type;host;x-amz-date\n"
        "9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e",
        "2e1cf7ed91881a30569e46552437e4156c823447bf1781b921b5d486c568dd1c",
        "content-type;host;x-amz-date",
        "1a72ec8f64bd914b0e42e42607c7fbce7fb2c7465f63e3092b3b0d39fa77a6fe",
    ),
]


@pytest.mark.parametrize("vector", VECTORS, ids=[vector.name for vector in VECTORS])
def test_every_step_matches_the_published_vector(vector: Vector) -> None:
    method, path, query, headers, body = vector.parsed()
    canonical, signed = canonical_request(method, path, query, headers, hashlib.sha256(body).hexdigest())
    assert canonical == vector.canonical
    assert signed == vector.signed_headers
    assert string_to_sign(DATE_TIME, SCOPE, canonical) == vector.string_to_sign
    assert authorization(KEY_ID, SECRET, DATE_TIME, REGION, SERVICE, canonical, signed) == vector.authorization


def _signable(vector: Vector) -> bool:
    """A vector `sign` can take: its URL in wire form, no header given twice."""
    _, path, query, headers, _ = vector.parsed()
    names = [name.lower() for name, _ in headers]
    return (path + query).isascii() and " " not in path and len(set(names)) == len(names)


@pytest.mark.parametrize("vector", [v for v in VECTORS if _signable(v)], ids=[v.name for v in VECTORS if _signable(v)])
def test_sign_adds_the_published_authorization_header(vector: Vector) -> None:
    method, path, query, headers, body = vector.parsed()
    url = f"https://example.amazonaws.com{path}" + (f"?{query}" if query else "")
    given = {name: value for name, value in headers if name.lower() not in ("host", "x-amz-date")}
    signed = sign(method, url, given, body, key_id=KEY_ID, secret=SECRET, region=REGION, service=SERVICE, now=NOW)
    assert signed["Authorization"] == vector.authorization
    assert signed["Host"] == "example.amazonaws.com"
    assert signed["X-Amz-Date"] == DATE_TIME
    assert {name: signed[name] for name in given} == given


def test_the_signing_key_matches_the_documented_derivation() -> None:
    key = signing_key(SECRET, "20120215", "us-east-1", "iam")
    assert key.hex() == "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"


def test_the_date_is_utc_in_basic_format() -> None:
    assert amz_date(NOW) == DATE_TIME
    assert amz_date(calendar.timegm((2015, 8, 30, 23, 59, 59)) + 0.9) == "20150830T235959Z"


def test_a_new_signature_replaces_an_old_one_and_the_date() -> None:
    first = sign("POST", "https://example.amazonaws.com/", {}, b"", key_id=KEY_ID, secret=SECRET, region=REGION,
                 service=SERVICE, now=NOW)
    again = sign("POST", "https://example.amazonaws.com/", {**first, "x-amz-date": "19700101T000000Z"}, b"",
                 key_id=KEY_ID, secret=SECRET, region=REGION, service=SERVICE, now=NOW)
    assert again == first
    assert VECTORS[1].name == "post-vanilla" and first["Authorization"] == VECTORS[1].authorization


def _ses_authorization(*, method: str = "POST", url: str = "https://email.eu-west-1.amazonaws.com/v2/email/account",
                       content_type: str = "application/json", body: bytes = b"{}", secret: Secret = SECRET,
                       region: str = "eu-west-1", service: str = "ses", now: float = NOW) -> str:
    return sign(method, url, {"Content-Type": content_type}, body, key_id=KEY_ID, secret=secret, region=region,
                service=service, now=now)["Authorization"]


def test_scope_body_and_every_signed_header_change_the_signature() -> None:
    base = _ses_authorization()
    variants = [_ses_authorization(region="us-east-1"), _ses_authorization(service="email"),
                _ses_authorization(body=b"{ }"), _ses_authorization(content_type="text/plain"),
                _ses_authorization(secret=Secret("other")), _ses_authorization(now=NOW + 1),
                _ses_authorization(url="https://email.eu-west-1.amazonaws.com:8443/v2/email/account"),
                _ses_authorization(method="GET")]
    assert len({base, *variants}) == len(variants) + 1
    assert "Credential=AKIDEXAMPLE/20150830/eu-west-1/ses/aws4_request" in base
    assert "SignedHeaders=content-type;host;x-amz-date," in base


def test_the_secret_never_shows_in_the_headers() -> None:
    signed = sign("GET", "https://example.amazonaws.com/", {}, b"", key_id=KEY_ID, secret=SECRET, region=REGION,
                  service=SERVICE, now=NOW)
    assert SECRET.reveal() not in repr(signed)


@pytest.mark.parametrize("url", ["https://example.amazonaws.com/a b", "https://example.amazonaws.com/\u1234",
                                 "https://example.amazonaws.com/?q=a b"])
def test_a_url_not_in_wire_form_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="percent-encoded"):
        sign("GET", url, {}, b"", key_id=KEY_ID, secret=SECRET, region=REGION, service=SERVICE, now=NOW)


def test_an_encoded_path_is_encoded_again_as_aws_wants_for_all_but_s3() -> None:
    canonical, _ = canonical_request("GET", "/a%20b", "", [("Host", "h")], "x")
    assert canonical.split("\n")[1] == "/a%2520b"


def test_header_values_are_trimmed_and_repeated_ones_joined() -> None:
    block, signed = canonical_headers([("B", "  x   y "), ("a", "1"), ("b", "z")])
    assert (block, signed) == ("a:1\nb:x y,z\n", "a;b")


@pytest.mark.parametrize(("url", "host"), [("https://Email.US-East-1.amazonaws.com", "email.us-east-1.amazonaws.com"),
                                           ("https://example.com:443/x", "example.com"),
                                           ("https://127.0.0.1:8443", "127.0.0.1:8443"),
                                           ("https://[::1]:8443/", "[::1]:8443"), ("https://[::1]/", "[::1]")])
def test_the_host_header_drops_only_the_default_port(url: str, host: str) -> None:
    assert host_header(url) == host
