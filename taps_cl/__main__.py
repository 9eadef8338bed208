"""`python -m taps_cl` is the `taps-cl` command."""

from taps_cl.cli import main

raise SystemExit(main())
