"""The vendors' APIs: HTTP with pacing and retries, auth, and one client package per vendor."""
