"""The ``prefsync`` command line: ``main`` parses it, one module per command."""
