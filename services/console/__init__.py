"""The operator console: ``prefsync console`` (and its alias ``prefsync api``).

- :mod:`services.console.app`: the aiohttp app, its access log (emails redacted) and serving;
- :mod:`services.console.auth`: login with a token, the session cookie, CSRF tokens;
- :mod:`services.console.views`: the pages;
- :mod:`services.console.events`: runs followed live, and the server-sent events;
- :mod:`services.console.backend`: everything the console uses from the rest of prefsync.
"""
