"""HTTPS API relay URLs in MAILWATCHD_RELAYS: hosts, regions, keys and what each provider needs."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailwatchd.errors import ConfigError
from mailwatchd.settings.apirelays import ApiKind
from mailwatchd.settings.relays import TlsMode, parse_relay_url

KEY = "key-3f9a-not-to-be-seen"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "api-key").write_text(KEY + "\n")
    return {"CREDENTIALS_DIRECTORY": str(tmp_path)}


@pytest.mark.parametrize(("url", "kind", "base_url", "extra"), [
    ("mailgun://?domain=mg.example.com&password_file=api-key", ApiKind.MAILGUN, "https://api.mailgun.net",
     {"domain": "mg.example.com"}),
    ("mailgun://?region=eu&domain=mg.example.com&password_file=api-key", ApiKind.MAILGUN,
     "https://api.eu.mailgun.net", {}),
    ("ses://AKIDEXAMPLE@email.eu-west-1.amazonaws.com?password_file=api-key", ApiKind.SES,
     "https://email.eu-west-1.amazonaws.com", {"region": "eu-west-1", "key_id": "AKIDEXAMPLE"}),
    ("ses://AKIDEXAMPLE@?region=us-east-1&password_file=api-key", ApiKind.SES, "https://email.us-east-1.amazonaws.com",
     {"region": "us-east-1"}),
    ("ses://AKIDEXAMPLE@127.0.0.1:8443?region=us-east-1&password_file=api-key", ApiKind.SES,
     "https://127.0.0.1:8443", {"region": "us-east-1"}),
    ("sendgrid://?password_file=api-key", ApiKind.SENDGRID, "https://api.sendgrid.com", {}),
    ("sendgrid://?region=eu&password_file=api-key", ApiKind.SENDGRID, "https://api.eu.sendgrid.com", {}),
    ("postmark://?password_file=api-key&message_stream=broadcast", ApiKind.POSTMARK, "https://api.postmarkapp.com",
     {"message_stream": "broadcast"}),
])
def test_api_relay_urls(env: dict[str, str], url: str, kind: ApiKind, base_url: str, extra: dict[str, str]) -> None:
    relay = parse_relay_url("MAILWATCHD_RELAYS", url, env)
    api = relay.api
    assert api is not None and api.kind is kind and api.base_url == base_url
    assert api.key.reveal() == KEY and KEY not in repr(relay)
    for field, value in extra.items():
        assert getattr(api, field) == value
    (endpoint,) = relay.endpoints
    assert endpoint.tls is TlsMode.HTTPS and f"https://{endpoint.host}" in base_url
    assert relay.name == kind.value and relay.password is None


@pytest.mark.parametrize(("url", "words"), [
    ("mailgun://?password_file=api-key", "no sending domain"),
    ("mailgun://?region=ap&domain=d&password_file=api-key", "use region=us or eu"),
    ("mailgun://?domain=d", "no API key"),
    ("ses://?region=eu-west-1&password_file=api-key", "no access key id"),
    ("ses://AKID@?password_file=api-key", "names no AWS region"),
    ("ses://AKID@127.0.0.1?password_file=api-key", "no valid AWS region"),
    ("sendgrid://?password_file=api-key&domain=x", "a Mailgun option"),
    ("sendgrid://user@?password_file=api-key", "does not use"),
    ("postmark://?password_file=api-key&ports=587", "unknown option 'ports'"),
    ("postmark://?password_file=missing", "missing"),
])
def test_bad_api_relay_urls_name_the_problem(env: dict[str, str], url: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_relay_url("MAILWATCHD_RELAYS", url, env)
    assert info.value.key == "MAILWATCHD_RELAYS" and words in str(info.value)
    assert KEY not in str(info.value)
