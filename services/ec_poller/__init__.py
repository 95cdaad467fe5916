"""ec-poller: reads preference changes from dotdigital and publishes them."""
