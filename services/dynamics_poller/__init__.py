"""dynamics-poller: reads preference changes from Dataverse and publishes them."""
