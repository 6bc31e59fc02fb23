"""Command-line plumbing shared by the programs (configs/cli.py)."""

import math

from configs.cli import format_duration


def test_format_duration():
    cases = {0: "0s", 59.9: "59s", 60: "1m00s", 61: "1m01s", 3599: "59m59s", 3600: "1h00m00s",
             3723.5: "1h02m03s", 100 * 3600 + 5: "100h00m05s", -5: "0s", math.nan: "?", math.inf: "?"}
    assert {s: format_duration(s) for s in cases} == cases
