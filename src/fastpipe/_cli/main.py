"""The command line: ``python -m fastpipe`` and the ``fastpipe`` console script.

Subcommands:
    cp: copy a file, a pipe or standard input (``_cli.cp``).
    forward: a TCP port forwarder, one proxy per connection (``_cli.forward``).
    bench: fastpipe.relay side by side with ``shutil.copyfileobj`` (``_cli.bench``).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Sequence

from fastpipe._cli.args import Stopped, stop_signals_raise


def build_parser() -> argparse.ArgumentParser:
    """The ``fastpipe`` argument parser, one subparser per subcommand."""
    from fastpipe._cli import bench as _cli_bench
    from fastpipe._cli import cp as _cli_cp
    from fastpipe._cli import forward as _cli_forward

    parser = argparse.ArgumentParser(
        prog="fastpipe",
        description="Relay bytes between file descriptors with the GIL released.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _cli_cp.add_parser(commands)
    _cli_forward.add_parser(commands)
    _cli_bench.add_parser(commands)
    return parser


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
    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
