"""onnxmpq's command line: the group, its commands (quantize; evaluate, inspect, compare, sensitivity
from `measure`; check, profiles, profile-latency, run from `deploy`) and the entry point.

Exit codes: 0 success, 1 user error (one line on stderr with a hint, no traceback), 2 a rule or budget
violated. Every command takes `--json` for one machine-readable object on stdout; logs and progress
bars go to stderr.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

import click

from onnxmpq import __version__, errors, progress
from onnxmpq.cli import deploy, measure, quantize
from onnxmpq.cli.options import flags
from onnxmpq.errors import OnnxmpqError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="onnxmpq")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or log lines on stderr.")
def cli(quiet: bool) -> None:
    """onnxmpq: post-training mixed-precision quantization of ONNX models."""
    progress.QUIET = quiet


for command in (quantize.quantize, measure.evaluate, measure.inspect, measure.compare, measure.sensitivity,
                deploy.check, deploy.list_profiles, deploy.profile_latency, deploy.run):
    cli.add_command(command)

class Interrupted(KeyboardInterrupt):
    """SIGTERM turned into an exception, so `finally` blocks remove temporary files as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; user errors print one line and exit 1 (2 for violated rules), never a traceback.
    SIGINT and SIGTERM stop the run with exit 130 / 143: outputs are renamed into place only when
    complete, so nothing partial or temporary is left."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupted)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    names = flags()
    try:
        with errors.naming(lambda path: names.get(path, path)):  # messages name settings by their flags
            code = cli.main(args=argv, prog_name="onnxmpq", standalone_mode=False)
        return code if isinstance(code, int) else 0  # ctx.exit(2) (check's verdict) arrives as a return value
    except OnnxmpqError as exc:
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return 1
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:
        cause = exc if isinstance(exc, Interrupted) else exc.__cause__  # click wraps Ctrl-C in Abort
        signum = cause.signum if isinstance(cause, Interrupted) else signal.SIGINT
        click.echo(f"interrupted ({signal.Signals(signum).name}): no output was written", err=True)
        return 128 + signum


def entry() -> None:
    sys.exit(main())

