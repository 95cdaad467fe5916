"""The runtime: starts the services, assigns shards, triggers and schedules runs, records run status."""
