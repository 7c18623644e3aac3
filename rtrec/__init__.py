"""rtrec's command line: one `rtrec` command with a subcommand per task."""
