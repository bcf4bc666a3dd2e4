"""`python -m kohya_backend`: the command line."""

from kohya_backend.cli import main

raise SystemExit(main())
