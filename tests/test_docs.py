"""The reference pages in docs/ and the CLI's help keep their promises (issue 20).

Generated pages (docs/cli.md, docs/python-api.md) must equal what `python -m edgecut.docgen`
makes now; hand-written ones must name every error class and every protocol message type.
"""
from __future__ import annotations

import argparse
import inspect
import re
from pathlib import Path

import pytest

from edgecut import docgen, errors
from edgecut.cli import HelpFormatter, build_parser
from edgecut.runtime import protocol

DOCS = Path(__file__).resolve().parent.parent / "docs"
SCREEN = 50          # lines of a --help that still fits one screen (at docgen.WIDTH columns)


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("page", sorted(docgen.PAGES))
def test_generated_page_is_current(page):
    want = docgen.PAGES[page]()
    have = (DOCS / page).read_text()
    assert have == want, f"docs/{page} is out of date: run `python -m edgecut.docgen` and commit it"


def test_docgen_check_exit_code(tmp_path):
    assert docgen.stale(tmp_path) == sorted(docgen.PAGES, key=list(docgen.PAGES).index)
    (tmp_path / "cli.md").write_text(docgen.cli_markdown())
    assert docgen.stale(tmp_path) == ["python-api.md"]


def test_help_fits_one_screen():
    for name, text in docgen.help_texts().items():
        n = len(text.rstrip().splitlines())
        assert n <= SCREEN, f"`{name} --help` is {n} lines at {docgen.WIDTH} columns; keep it under {SCREEN}"


def test_help_shows_every_default():
    for cmd, p in _subparsers().items():
        for a in p._actions:
            d = a.default
            if not a.option_strings or d in (None, False, argparse.SUPPRESS) or d == []:
                continue
            text = HelpFormatter(p.prog)._expand_help(a)
            forms = {str(d)} | ({f"{d:g}"} if isinstance(d, float) else set())
            assert "default" in text and any(f in text for f in forms), \
                f"edgecut {cmd} {a.option_strings[-1]}: help {text!r} does not show its default {d!r}"


_EXTERNAL = re.compile(r"(python [^,;)`]*|scripts/[^,;)`]*)")      # other programs' options
_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
_COMMAND_SPAN = re.compile(r"`edgecut (\w+)([^`]*)`")


def _mentioned(text: str, own: str, subs: dict) -> list[tuple[str, str]]:
    """(command, option) for every option a help text names: in `edgecut CMD ...` spans the
    option belongs to CMD, elsewhere to the command whose help it is; other programs' skipped."""
    out = []
    for m in _COMMAND_SPAN.finditer(text):
        out += [(m.group(1), o) for o in _OPTION.findall(m.group(2))]
    text = _EXTERNAL.sub("", _COMMAND_SPAN.sub("", text))
    return out + [(own, o) for o in _OPTION.findall(text)]


def test_every_option_a_help_text_mentions_exists():
    subs = _subparsers()
    assert "--list-targets" in subs["compile"]._option_string_actions
    for cmd, p in subs.items():
        texts = [p.description or "", p.epilog or ""] + [a.help or "" for a in p._actions] + \
                [g.title or "" for g in p._action_groups]
        for text in texts:
            for owner, opt in _mentioned(text, cmd, subs):
                assert owner in subs, f"edgecut {cmd}: help mentions `edgecut {owner}`, which does not exist"
                assert opt in subs[owner]._option_string_actions, \
                    f"edgecut {cmd}: help text {text!r} mentions {opt}, which `edgecut {owner}` does not have"


def test_list_targets(capsys):
    from edgecut import targets
    from edgecut.cli import main

    with pytest.raises(SystemExit) as e:
        main(["compile", "--list-targets"])            # no MODEL nor -o needed
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in targets.known())


# ----------------------------------------------------------------------- hand-written pages
def _headings(page: str) -> str:
    return "\n".join(ln for ln in (DOCS / page).read_text().splitlines() if ln.startswith("#"))


def test_troubleshooting_has_every_error_class():
    classes = [n for n, c in inspect.getmembers(errors, inspect.isclass)
               if c.__module__ == errors.__name__ and issubclass(c, (Exception, Warning))]
    assert len(classes) >= 10
    heads = _headings("troubleshooting.md")
    missing = [n for n in classes if not re.search(rf"`{n}`", heads)]
    assert not missing, f"docs/troubleshooting.md has no entry (heading) for {missing}"


def _error_codes() -> list[str]:
    """The values of the names assigned in protocol.py's block of error codes (it starts at the
    comment '# error codes' and ends at the first blank line), so a new code is found."""
    lines = inspect.getsource(protocol).splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("# error codes"))
    block = lines[start + 1:lines.index("", start)]
    names = [n.strip() for ln in block for n in ln.split("=")[0].split(",")]
    return [getattr(protocol, n) for n in names]


CODES = _error_codes()


def test_troubleshooting_has_every_error_code():
    assert len(CODES) >= 13 and "bad_frame" in CODES and "internal" in CODES
    text = (DOCS / "troubleshooting.md").read_text()
    assert [c for c in CODES if f"`{c}`" not in text] == []


def _message_types() -> set[str]:
    """Every message type the protocol module, the server or the client writes."""
    from edgecut.runtime import client, server

    src = "".join(inspect.getsource(m) for m in (protocol, server, client))
    return set(re.findall(r'"type": "(\w+)"', src)) | set(protocol._TEMPLATE_FIELDS)


def test_protocol_page_has_every_message_type_and_code():
    types = _message_types()
    assert {"challenge", "hello", "welcome", "infer", "result", "error", "ping", "pong", "probe",
            "probe_ack"} <= types
    heads = _headings("protocol.md")
    text = (DOCS / "protocol.md").read_text()
    assert [t for t in sorted(types) if f"`{t}`" not in heads] == []
    assert [c for c in CODES if f"`{c}`" not in text] == []
    assert all(d in text for d in protocol.DTYPES)
    assert f"version {protocol.PROTOCOL_VERSION}" in text.lower() or \
        f"`version`: {protocol.PROTOCOL_VERSION}" in text


def test_benchmarks_page_has_every_bench():
    benches = sorted(p.name for p in (DOCS.parent / "bench").glob("*.py"))
    heads = _headings("benchmarks.md")
    assert [b for b in benches if f"bench/{b}" not in heads] == []


def test_long_signatures_one_parameter_per_line():
    params, ret = docgen._split_params("(a, b: 'dict[str, int]' = {'x': (1, 2)}, *, c='a,b') -> 'X'")
    assert params == ["a", "b: 'dict[str, int]' = {'x': (1, 2)}", "*", "c='a,b'"] and ret == " -> 'X'"

    def f(alpha_parameter_name: int = 1, beta_parameter_name: str = "b", *, gamma_parameter_name=None,
          delta_parameter_name=2):
        pass
    assert docgen.signature(f, "f").splitlines() == [
        "f(", "    alpha_parameter_name: 'int' = 1,", "    beta_parameter_name: 'str' = 'b',", "    *,",
        "    gamma_parameter_name=None,", "    delta_parameter_name=2,", ")"]
