"""`python -m flespi_receiver` runs the command line."""

from flespi_receiver.cli import main

raise SystemExit(main())
