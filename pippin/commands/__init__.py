"""One module per `pippin` subcommand (see pippin.cli)."""
