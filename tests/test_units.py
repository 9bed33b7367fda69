"""Every flag that takes a size reads it the same way (one parser in strata/units.py)."""

import pytest

from strata.analysis.hwspec import parse_spec
from strata.commands.engine_args import parse_size as engine_flag
from strata.errors import ConfigError
from strata.tiers.budget import parse_size as budget_flag
from strata.units import format_size, parse_size
from strata.weights.quant_plan import parse_size as quant_budget_flag


@pytest.mark.parametrize("text", ["3G", "3GiB", "512MB", "1.5 GiB", "4096", "2mib", "4GB", "4096MiB"])
def test_all_size_flags_agree(text):
    assert engine_flag(text) == budget_flag(text) == quant_budget_flag(text) == parse_size(text)
    spec = f"mem_bw=800GB/s,bf16=100TFLOPS,mem={text}" if not text.isdigit() else None
    if spec:  # the analyzer's ad-hoc hardware reads memory in GB, with the same units
        assert parse_spec(spec)[0].memory_gb == pytest.approx(parse_size(text) / 1e9)


def test_binary_and_decimal_units():
    assert parse_size("4G") == parse_size("4GiB") == parse_size("4096MiB") == 4 << 30
    assert parse_size("4GB") == 4 * 10**9


def test_units():
    assert parse_size("3G") == 3 << 30 and parse_size("3GB") == 3 * 10**9 and parse_size("1k") == 1024
    assert format_size(3 << 30) == "3.00 GiB" and format_size(10) == "10 B"


def test_engine_flag_errors_name_the_flag():
    with pytest.raises(ConfigError, match=r"--memory-budget: expected a number"):
        engine_flag("lots", "memory_budget")
    with pytest.raises(ConfigError, match=r"--memory-budget: must be > 0"):
        engine_flag("0", "memory_budget")
