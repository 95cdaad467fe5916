"""The operator console: ``prefsync console`` (and its alias ``prefsync api``).

- :mod:`services.cli.console.app`: the aiohttp app, its access log (emails redacted) and serving;
- :mod:`services.cli.console.auth`: login with a token, the session cookie, CSRF tokens;
- :mod:`services.cli.console.views`: the pages;
- :mod:`services.cli.console.events`: runs followed live, and the server-sent events;
- :mod:`services.cli.console.backend`: everything the console uses from the rest of prefsync.
"""
