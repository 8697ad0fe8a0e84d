"""The ``fastpipe`` command line, one module per subcommand.

main        the top-level parser and ``main()``; imports a subcommand's
            module only when that subcommand runs
args        argument types and signal handling the subcommands share
cp          ``fastpipe cp``
progress    ``fastpipe cp``'s progress display
forward     ``fastpipe forward``
bench       ``fastpipe bench`` (the harness itself is ``fastpipe._bench``)
"""
