"""Tests of onnxmpq.cli.options: quantize's option groups come from the configuration, --help shows
them as sections, and the README's option tables match the configuration."""

from __future__ import annotations

from pathlib import Path

import click
from click.testing import CliRunner

from onnxmpq.allocate import SOLVERS
from onnxmpq.cli import options
from onnxmpq.cli.main import cli
from onnxmpq.cli.quantize import QUANTIZE_SECTIONS, quantize
from onnxmpq.pipeline import config
from onnxmpq.sensitivity import METRICS

README = Path(__file__).resolve().parents[2] / "README.md"


def test_help_lists_one_section_per_sub_config():
    text = CliRunner().invoke(cli, ["quantize", "--help"]).output
    titles = [config.SECTIONS[s][1] for s in QUANTIZE_SECTIONS]
    positions = [text.index(f"{title}:") for title in titles]
    assert positions == sorted(positions)
    assert text.index("--max-drop FRACTION") > text.index("Allocation under budgets:") > text.index("--weight-range")
    assert "[default: 256]" in text and "[default: ilp]" in text


def test_every_setting_is_an_option_defaulting_to_unset():
    """The click options default to None (or empty), so the dataclass default is the only one."""
    params = {p.name: p for p in quantize.params if isinstance(p, options.GroupedOption)}
    for path, meta, _ in config.all_settings():
        param = params[path.replace(".", "__")]
        assert param.default in (None, ()) and meta.flag in param.opts, path


def test_choices_come_from_the_registries():
    params = {p.name: p for p in quantize.params}
    assert list(params["search__method"].type.choices) == sorted(SOLVERS)
    assert list(params["search__metric"].type.choices) == sorted(METRICS)


def test_the_readme_option_tables_match_the_configuration():
    text = README.read_text()
    assert options.README_BEGIN in text, "the README lost its option tables' markers"
    assert options.splice_readme(text, QUANTIZE_SECTIONS) == text, \
        "README option tables are stale: run `make readme`"


def test_given_keeps_only_what_the_command_line_set():
    assert options.given({"search__max_drop": 0.1, "search__budgets": (), "data__calib": None, "as_json": True}) \
        == {"search.max_drop": 0.1}


def test_a_grouped_command_lists_ungrouped_options_last():
    @click.command(cls=options.GroupedCommand)
    @options.config_options(["data"])
    @click.option("--json", is_flag=True, help="JSON.")
    def cmd(**kw):
        pass

    text = CliRunner().invoke(cmd, ["--help"]).output
    assert text.index("Calibration data:") < text.index("Other options:") < text.index("--json")
