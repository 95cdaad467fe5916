"""dotdigital: the API client, its models, and the opt-ins feed (the ec-poller's position in it)."""
