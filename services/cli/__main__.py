"""``python -m services.cli``: the ``prefsync`` command."""

from services.cli.main import main

raise SystemExit(main())
