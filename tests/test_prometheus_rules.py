"""The shipped alerting rules pass Debian's `promtool check rules`, and `promtool test rules` on
tests/prometheus/mailwatchd.rules.test.yml: series that fire each alert and series that must not.

promtool comes from Debian 12's `prometheus` package. Without it these tests skip with the
reason; with MAILWATCHD_REQUIRE_SYSTEMD=1 (CI) they fail instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "packaging" / "prometheus" / "mailwatchd.rules.yml"
RULES_TEST = ROOT / "tests" / "prometheus" / "mailwatchd.rules.test.yml"
ALERTS = {"MailwatchdDown", "MailwatchdRelayDown", "MailwatchdQueueStuck", "MailwatchdMessagesFailed",
          "MailwatchdCertificateExpiring"}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is not None:
        return found
    message = "promtool not found: apt-get install -y --no-install-recommends prometheus"
    if os.environ.get("MAILWATCHD_REQUIRE_SYSTEMD") == "1":
        pytest.fail(message)
    pytest.skip(message)


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)


def test_rules_file_is_valid() -> None:
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout


def test_every_alert_fires_and_stays_quiet_as_the_series_say() -> None:
    result = run_promtool("test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_unit_tests_cover_every_alert_the_rules_define() -> None:
    rules, tests = RULES.read_text(), RULES_TEST.read_text()
    defined = {line.split(":", 1)[1].strip() for line in rules.splitlines() if line.strip().startswith("- alert:")}
    assert defined == ALERTS
    for alert in ALERTS:
        assert f"alertname: {alert}\n        exp_alerts:\n          - exp_labels" in tests, f"{alert} never fires"
        quiet = (f"alertname: {alert}\n        exp_alerts: []", f"alertname: {alert}, exp_alerts: []")
        assert any(form in tests for form in quiet), f"{alert} is never checked quiet"


def test_a_broken_threshold_is_caught(tmp_path: Path) -> None:
    """The unit test can fail: the same series against a rule whose threshold moved."""
    (tmp_path / "packaging" / "prometheus").mkdir(parents=True)
    (tmp_path / "tests" / "prometheus").mkdir(parents=True)
    broken = RULES.read_text().replace("mailwatchd_oldest_message_age_seconds > 3600",
                                       "mailwatchd_oldest_message_age_seconds > 7200")
    assert broken != RULES.read_text()
    (tmp_path / "packaging" / "prometheus" / "mailwatchd.rules.yml").write_text(broken)
    copied = tmp_path / "tests" / "prometheus" / RULES_TEST.name
    copied.write_text(RULES_TEST.read_text())
    result = run_promtool("test", "rules", str(copied))
    assert result.returncode != 0
    assert "alertname: MailwatchdQueueStuck" in result.stdout + result.stderr
