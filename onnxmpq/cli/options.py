"""Click options built from the run configuration (`onnxmpq.pipeline.config`), shown in `--help` as one
named section per sub-config.

Every generated option defaults to None ("not given"), so the config's dataclass default is the only
default there is; `--help` shows it (`[default: 8]`). `given(kwargs)` keeps what the command line set,
by dotted config path, for `config.build` (and for `run`, on top of the YAML file's values).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from enum import Enum
from typing import Any

import click

from onnxmpq.pipeline import config

F = Callable[..., Any]


class GroupedOption(click.Option):
    """An option that knows the --help section it is listed under."""

    def __init__(self, *args: Any, section: str = "Other options", path: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.section, self.path = section, path


class GroupedCommand(click.Command):
    """A command whose --help lists its options under their sections, in the order first seen."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
            if record is None:
                continue
            title = param.section if isinstance(param, GroupedOption) else "Other options"
            sections.setdefault(title, []).append(record)
        sections["Other options"] = sections.pop("Other options", [])  # listed last
        for title, records in sections.items():
            with formatter.section(title):
                formatter.write_dl(records)


def shown_default(value: Any) -> str | None:
    """A default as --help and the README show it."""
    if value is None or value == () or value == {} or value is False:
        return None
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, tuple):
        return ",".join("float" if v is None else str(v) for v in value)
    if value is True:
        return "on"
    return str(value)


def _param(path: str) -> str:
    return path.replace(".", "__")


def option_for(path: str, meta: config.Setting, default: Any, section: str) -> F:
    """The click option of one config field."""
    names = [meta.short, meta.flag] if meta.short else [meta.flag]
    shown = shown_default(default)
    text = f"{meta.help}  [default: {shown}]" if shown is not None else meta.help
    kwargs: dict[str, Any] = {"help": text, "default": None, "section": section, "path": path}
    if meta.is_flag:
        decls = f"{meta.flag}/{meta.off}" if meta.off else meta.flag
        names = [decls]
        kwargs.update(is_flag=True, default=None)
    elif meta.choices is not None:
        kwargs["type"] = click.Choice(meta.choices())
    if meta.multiple:
        kwargs.update(multiple=True, default=())
    if meta.metavar:
        kwargs["metavar"] = meta.metavar
    return click.option(*names, _param(path), cls=GroupedOption, **kwargs)


def config_options(sections: Iterable[str], skip: Iterable[str] = ()) -> Callable[[F], F]:
    """A decorator adding every field of `sections` as an option, grouped by section."""
    skipped = set(skip)

    def decorate(fn: F) -> F:
        opts = [option_for(f"{section}.{name}", meta, default, config.SECTIONS[section][1])
                for section in sections for name, meta, default in config.settings_of(section)
                if f"{section}.{name}" not in skipped]
        for opt in reversed(opts):
            fn = opt(fn)
        return fn
    return decorate


def given(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The config values the command line set, by dotted path (unset options are None or empty)."""
    return {name.replace("__", "."): value for name, value in kwargs.items()
            if "__" in name and value is not None and value != ()}


def flags() -> dict[str, str]:
    """Dotted config path -> command-line flag, for error messages."""
    return {path: meta.flag for path, meta, _ in config.all_settings()}


README_BEGIN, README_END = "<!-- quantize-options:begin -->", "<!-- quantize-options:end -->"


def markdown(sections: Iterable[str]) -> str:
    """The option tables of the README: one per section, flag, default and help as `--help` shows them."""
    parts = []
    for section in sections:
        parts += [f"**{config.SECTIONS[section][1]}** (`{section}`)", "", "| option | setting | default | what |",
                  "|---|---|---|---|"]
        for name, meta, default in config.settings_of(section):
            flag = f"`{meta.short}`, `{meta.flag}`" if meta.short else f"`{meta.flag}`"
            flag += f" / `{meta.off}`" if meta.off else ""
            shown = shown_default(default)
            parts.append(f"| {flag} | `{name}` | {f'`{shown}`' if shown is not None else ''} | "
                         f"{meta.help.replace('|', '/')} |")
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def splice_readme(text: str, sections: Iterable[str]) -> str:
    """`text` with the block between README_BEGIN and README_END replaced by `markdown(sections)`."""
    head, _, rest = text.partition(README_BEGIN)
    _, _, tail = rest.partition(README_END)
    return f"{head}{README_BEGIN}\n{markdown(sections)}{README_END}{tail}"
