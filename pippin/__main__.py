"""`python -m pippin` is the same as the `pippin` command."""

from pippin.cli import main

raise SystemExit(main())
