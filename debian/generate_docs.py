"""Write mailwatchd(8), sendmail(8) and the bash completion of `mailwatchd` from the program's own definitions.

Run at package build time (debian/rules) with the package's virtual environment, which has mailwatchd
installed: `python debian/generate_docs.py OUTDIR`. mailwatchd(8) and the completion come from the argparse
parser (mailwatchd.cli.build_parser) and the exit statuses from mailwatchd.exitcodes; sendmail(8) from the text
`sendmail --help` prints (mailwatchd.submission.sendmail.USAGE). Nothing here is written twice by hand, so a
page cannot drift from the command line it documents.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from pathlib import Path

from mailwatchd import __version__, exitcodes
from mailwatchd.cli import build_parser
from mailwatchd.submission import sendmail

FOOTER = f"mailwatchd {__version__}"
ENV_FILE = "/etc/mailwatchd/mailwatchd.env"
SPOOL = "/var/spool/mailwatchd"
# An option and its text in `sendmail --help`: two spaces of indent, the option, two or more spaces, the text.
# Options the parser gives no help text.
UNDESCRIBED = {"--json": "print the result as JSON"}
USAGE_ENTRY = re.compile(r"^  (\S.*?)(?:\s{2,}(\S.*))?$")


def roff(text: str) -> str:
    """Text safe in a roff line: backslashes and hyphens escaped, no control character at the start."""
    escaped = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + escaped if escaped.startswith((".", "'")) else escaped


def bold(text: str) -> str:
    return f"\\fB{roff(text)}\\fR"


def header(name: str, summary: str) -> list[str]:
    return [f'.TH {name.upper()} 8 "" "{FOOTER}" "System Administration"', ".nh", ".SH NAME",
            f"{roff(name)} \\- {roff(summary)}"]


# -- mailwatchd(8) -----------------------------------------------------------------------------------------------

def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each command, in the order `mailwatchd --help` lists them."""
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
    return [(name, helps[name], sub) for name, sub in action.choices.items()]


def option_entries(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """(spelling, help) of a parser's options and arguments, --help and --config left out (said once)."""
    entries = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or "--config" in action.option_strings:
            continue
        if action.option_strings:
            value = "" if action.nargs == 0 else f" {action.metavar or action.dest.upper()}"
            spelling = ", ".join(f"{option}{value}" for option in action.option_strings)
        elif not action.help:
            continue  # an argument the usage line shows well enough (ID...)
        else:
            spelling = str(action.metavar or action.dest.upper())
            if action.nargs in ("*", "+"):
                spelling += "..."
        entries.append((spelling, action.help or ""))
    return entries


def usage_of(parser: argparse.ArgumentParser) -> str:
    """A command's usage line without the options every command has (--help, --config: said once)."""
    usage = " ".join(parser.format_usage().removeprefix("usage: ").split())
    return re.sub(r" \[[-+]h\]| \[--config CONFIG\]", "", usage)


def exit_statuses() -> list[tuple[int, str]]:
    """Each status in mailwatchd.exitcodes with the comment that explains it."""
    found = []
    for line in inspect.getsource(exitcodes).splitlines():
        match = re.match(r"^([A-Z]+): Final = (\d+)(?:\s+# (.*))?$", line)
        if match:
            found.append((int(match.group(2)), match.group(3) or match.group(1).lower()))
    return found


def mailwatchd_page() -> str:
    parser = build_parser()
    lines = header("mailwatchd", "crash-safe outbound-mail daemon: spool, relays, probes")
    lines += [".SH SYNOPSIS", f"{bold('mailwatchd')} [{bold('--config')} \\fIFILE\\fR] \\fICOMMAND\\fR "
              "[\\fIOPTION\\fR...]", ".SH DESCRIPTION",
              roff("mailwatchd is this host's mail transport agent for outgoing mail only. Programs submit mail "
                   "with sendmail(8), with SMTP on localhost port 25 (mailwatchd.socket), or by writing into the "
                   f"spool ({SPOOL}); the daemon (mailwatchd.service, \"mailwatchd run\") hands each message to "
                   "the configured SMTP relays or HTTPS mail APIs, with failover and retries, and removes it "
                   "only once a relay has accepted it. It never delivers mail locally."),
              ".PP",
              roff(f"Settings are KEY=value lines in {ENV_FILE}; every key is listed there, commented, with what it "
                   "does. After editing it, \"systemctl reload mailwatchd\" checks the file and applies it; a bad "
                   "file fails the reload and the running settings are kept. Passwords live in root-only files "
                   "under /etc/mailwatchd that systemd hands to the daemon as credentials."),
              ".SH COMMANDS"]
    for name, summary, sub in subcommands(parser):
        if name == "sendmail":  # its arguments are sendmail's own, not argparse's
            lines += [".TP", bold("mailwatchd sendmail [OPTION...] [RECIPIENT...]"), roff(summary),
                      "as \\fBsendmail\\fR(8) describes"]
            continue
        lines += [".TP", bold(usage_of(sub)), roff(summary)]
        for spelling, text in option_entries(sub):
            lines += [".RS", ".TP", bold(spelling), roff(text or UNDESCRIBED.get(spelling, "")), ".RE"]
    lines += [".SH OPTIONS", ".TP", f"{bold('--config')} \\fIFILE\\fR, {bold('-c')} \\fIFILE\\fR",
              roff(f"the env file to read (default: $MAILWATCHD_CONFIG, else {ENV_FILE} when it exists); "
                   "every command takes it"),
              ".TP", bold("--version"), "print the version and exit",
              ".TP", bold("--help"), "print the usage of mailwatchd or of one command"]
    lines += [".SH FILES"]
    for path, text in (
            (ENV_FILE, "the settings (a conffile: local edits survive upgrades)"),
            ("/etc/mailwatchd/email-host-password", "the relay's password, root-only, loaded as a credential "
             "(also oauth-client-secret, oauth-certificate, oauth-refresh-token)"),
            (SPOOL, "the spool: tmp/ and new/ for submitters, queue/, deferred/, failed/ and meta/ for the "
             "daemon, outbox/ when no relay is set"),
            ("/run/mailwatchd/submit.sock", "the local submission socket sendmail uses when it may not write "
             "to the spool"),
            ("/run/mailwatchd/status/status.json", "the running daemon's health, read by \"mailwatchd status\""),
            ("/lib/systemd/system/mailwatchd.service", "the service (local changes: \"systemctl edit "
             "mailwatchd\")"),
            ("/lib/systemd/system/mailwatchd.socket", "SMTP on localhost:25 and the submission socket")):
        lines += [".TP", bold(path), roff(text)]
    lines += [".SH EXIT STATUS", roff("check and status are monitoring plugins: 0 OK, 1 WARNING, 2 CRITICAL, "
                                      "3 UNKNOWN. The other commands exit with sysexits(3) statuses:")]
    for status, text in exit_statuses():
        lines += [".TP", bold(str(status)), roff(text)]
    lines += [".SH SEE ALSO", "\\fBsendmail\\fR(8), \\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1), "
              "\\fBsystemd.exec\\fR(5)", ""]
    return "\n".join(lines)


# -- sendmail(8) -------------------------------------------------------------------------------------------------

def usage_sections() -> tuple[list[str], list[str], list[tuple[str, list[str]]]]:
    """`sendmail --help` as (synopsis lines, description lines, [(section title, its lines)])."""
    blocks = [block.splitlines() for block in sendmail.USAGE.strip("\n").split("\n\n")]
    synopsis = [line.removeprefix("usage:").strip() for line in blocks[0]]
    sections: list[tuple[str, list[str]]] = []
    for block in blocks[2:]:
        for line in block:
            title, colon, rest = line.partition(":")
            if colon and not line.startswith(" ") and re.fullmatch(r"[A-Z][a-z ]*(\([^)]*\))?", title):
                sections.append((title, [rest.strip()] if rest.strip() else []))
            else:
                sections[-1][1].append(line)
    return synopsis, blocks[1], sections


def usage_section(lines: list[str]) -> list[str]:
    """One section's lines as .TP entries (an option, then its text) or, lacking options, a paragraph."""
    out: list[str] = []
    entries: list[tuple[str, list[str]]] = []
    for index, line in enumerate(lines):
        match = USAGE_ENTRY.match(line)
        continued = index + 1 < len(lines) and lines[index + 1].startswith("   ")
        if match and not line.startswith("   ") and (match.group(2) or continued):
            entries.append((match.group(1), [match.group(2)] if match.group(2) else []))
        elif entries and (line.startswith("   ") or not entries[-1][0]):
            entries[-1][1].append(line.strip())  # an option's text goes on, or a paragraph does
        else:
            entries.append(("", [line.strip()]))
    for spelling, text in entries:
        if spelling:
            out += [".TP", bold(spelling), roff(" ".join(text)) if text else "."]
        else:
            out += [roff(" ".join(text))]
    return out


def sendmail_page() -> str:
    synopsis, description, sections = usage_sections()
    lines = header("sendmail", "queue mail for mailwatchd (also mailq and newaliases)")
    lines += [".SH SYNOPSIS", ".nf", *(roff(line) for line in synopsis), ".fi", ".SH DESCRIPTION",
              roff(" ".join(line.strip() for line in description)), ".PP",
              roff("In this package /usr/sbin/sendmail, /usr/bin/mailq and /usr/bin/newaliases are links to "
                   "mailwatchd(8), which answers as sendmail when it is called by one of those names. Any local "
                   "user may send mail: root and members of the group mailwatchd-submit write into "
                   f"{SPOOL} directly, everyone else goes through the socket that mailwatchd.socket holds "
                   "open, even while the daemon restarts.")]
    for title, body in sections:
        heading = re.sub(r"\s*\(.*\)$", "", title).upper()
        lines += [f".SH {roff(heading)}"]
        note = re.search(r"\((.*)\)$", title)
        if note:
            lines += [roff(note.group(1)[0].upper() + note.group(1)[1:] + ".")]
        lines += usage_section(body)
    lines += [".SH SEE ALSO", "\\fBmailwatchd\\fR(8)", ""]
    return "\n".join(lines)


# -- bash completion ---------------------------------------------------------------------------------------------

def completion() -> str:
    parser = build_parser()
    commands = subcommands(parser)
    cases = []
    for name, _, sub in commands:
        words = sorted({option for action in sub._actions for option in action.option_strings
                        if option.startswith("--")})
        cases.append(f"        {name}) words={' '.join(words)!r} ;;")
    names = " ".join(name for name, _, _ in commands)
    return "\n".join([
        "# bash completion for mailwatchd: generated from its command line (debian/generate_docs.py)",
        "_mailwatchd() {",
        '    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]} command="" words i',
        '    case $prev in',
        '        -c|--config) COMPREPLY=($(compgen -f -- "$cur")); return ;;',
        '    esac',
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        "        case ${COMP_WORDS[i]} in",
        "            -c|--config) ((i++)) ;;",
        "            -*) ;;",
        "            *) command=${COMP_WORDS[i]}; break ;;",
        "        esac",
        "    done",
        "    case $command in",
        f"        '') words='{names} --config --help --version' ;;",
        *cases,
        "        *) words='' ;;",
        "    esac",
        '    COMPREPLY=($(compgen -W "$words" -- "$cur"))',
        "}",
        "complete -F _mailwatchd mailwatchd",
        ""])


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: generate_docs.py OUTDIR", file=sys.stderr)
        return 64
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    (out / "mailwatchd.8").write_text(mailwatchd_page())
    (out / "sendmail.8").write_text(sendmail_page())
    (out / "mailwatchd.bash-completion").write_text(completion())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
