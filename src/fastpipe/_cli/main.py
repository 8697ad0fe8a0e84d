"""The ``fastpipe`` command line: the top-level parser and ``main()``.

``python -m fastpipe`` and the ``fastpipe`` console script both run
``main()``.  Each subcommand is a module of this package, imported only when
that subcommand runs, so that ``fastpipe cp`` never loads the benchmark
harness and ``fastpipe --help`` loads none of them:

    cp: copy a file, a pipe or standard input (``_cli.cp``).
    forward: a TCP port forwarder, one proxy per connection (``_cli.forward``).
    bench: fastpipe.relay side by side with ``shutil.copyfileobj`` (``_cli.bench``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
from collections.abc import Sequence

from fastpipe._cli.args import Stopped, stop_signals_raise

#: Each subcommand: its module, which has ``add_parser(commands, summary)``,
#: and the one line that ``fastpipe --help`` shows for it.
COMMANDS = {
    "cp": ("fastpipe._cli.cp", "copy a file, a pipe or standard input with fastpipe.relay"),
    "forward": ("fastpipe._cli.forward", "a TCP port forwarder: one fastpipe.proxy per connection"),
    "bench": ("fastpipe._cli.bench", "compare fastpipe.relay with shutil.copyfileobj"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``fastpipe`` argument parser, one subparser per subcommand.

    Args:
        command: the subcommand to build in full, importing its module; the
            others get only their name and one-line help, which is all that
            ``fastpipe --help`` and a misspelt command need.
    """
    parser = argparse.ArgumentParser(
        prog="fastpipe",
        description="Relay bytes between file descriptors with the GIL released.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, summary) in COMMANDS.items():
        if name == command:
            importlib.import_module(module).add_parser(commands, summary)
        else:
            commands.add_parser(name, help=summary)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand that ``argv`` names, if any.

    The top-level parser has no option that takes a value, so the first
    argument that is not an option is the subcommand.
    """
    word = next((arg for arg in argv if not arg.startswith("-")), None)
    return word if word in COMMANDS else None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fastpipe`` command line.

    Args:
        argv: the arguments after the program name; None for ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success, 1 when a copy or a benchmark failed,
        2 for a usage error (argparse exits with 2 itself, ``bench --plot``
        without matplotlib), 130 on Ctrl-C, 143 and 129 when SIGTERM or
        SIGHUP stopped ``cp`` or ``bench`` (after the same clean-up as
        Ctrl-C), 141 when ``cp``'s standard output was closed by its reader.
        ``forward`` handles SIGINT and SIGTERM itself and exits with 0 after
        them.
    """
    if argv is None:
        argv = sys.argv[1:]
    args = build_parser(_command(argv)).parse_args(argv)
    try:
        if args.command == "forward":
            # It stops gracefully on SIGINT and SIGTERM, with handlers of its own.
            status: int = args.run(args)
        else:
            with stop_signals_raise():
                status = args.run(args)
    except KeyboardInterrupt:
        print("fastpipe: interrupted", file=sys.stderr)
        return 130
    except Stopped as exc:
        # After SIGHUP the terminal may be gone: the status still tells.
        with contextlib.suppress(OSError):
            print(f"fastpipe: stopped by {signal.Signals(exc.signum).name}", file=sys.stderr)
        return 128 + exc.signum
    return status
