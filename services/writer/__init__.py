"""writer: applies the reconciler's write commands to Dataverse and dotdigital."""
