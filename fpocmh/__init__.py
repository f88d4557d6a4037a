"""The ``fpocmh`` command line: one subcommand per job."""
