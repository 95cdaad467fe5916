"""Dynamics 365 (Dataverse): the Web API client, OData batches, the tables prefsync uses, the catalog."""
