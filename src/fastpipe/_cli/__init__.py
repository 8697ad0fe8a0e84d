"""The ``fastpipe`` command line, one module per subcommand."""
