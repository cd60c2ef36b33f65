import json
import subprocess
import sys

import pytest

from edgecut.cli import main
from edgecut.units import parse_bandwidth, parse_shape, parse_size, parse_time
from edgecut.errors import UsageError


def run(*args):
    return subprocess.run([sys.executable, "-m", "edgecut", *args], capture_output=True, text=True, timeout=300)


def test_inspect_json_totals():
    r = run("inspect", "edgecut.zoo:alexnet", "--input", "1x3x224x224", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["total"]["params"] == 61_100_840
    assert isinstance(d["total"]["macs"], int) and isinstance(d["total"]["activation_bytes"], int)
    assert {"name", "kind", "shape", "bytes", "macs", "params"} <= set(d["layers"][1])


def test_inspect_table(capsys):
    assert main(["inspect", "edgecut.zoo:tiny_chain"]) == 0
    out = capsys.readouterr().out
    assert "conv1" in out and "total:" in out


@pytest.mark.parametrize("args,needle", [
    (["inspect", "nonsense"], "expected 'edgecut.zoo:NAME'"),
    (["inspect", "edgecut.zoo:nope"], "unknown zoo model"),
    (["inspect", "missing.py:Net"], "neither"),
    (["inspect", "edgecut.zoo:alexnet", "--input", "1x3xabc"], "cannot read shape"),
])
def test_inspect_errors_are_one_line_exit_2(args, needle):
    r = run(*args)
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_help_everywhere():
    r = run("--help")
    assert r.returncode == 0 and "inspect" in r.stdout
    from edgecut.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert "inspect" in sub.choices
    for cmd in sub.choices:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0, cmd


def test_units():
    assert parse_time("100ms") == pytest.approx(0.1)
    assert parse_time("2s") == 2.0 and parse_time("250us") == pytest.approx(2.5e-4)
    assert parse_bandwidth("2mbit") == 2e6
    assert parse_bandwidth("1.5Mbps") == 1.5e6
    assert parse_bandwidth("500kbit") == 5e5
    assert parse_bandwidth("1MB/s") == 8e6
    assert parse_size("64MiB") == 64 * 2**20
    assert parse_shape("1x3x224x224") == (1, 3, 224, 224)
    for bad in ("fast", "10 parsecs"):
        with pytest.raises(UsageError):
            parse_bandwidth(bad)
    with pytest.raises(UsageError):
        parse_time("soon")
