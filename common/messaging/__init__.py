"""Messaging: the broker topology, the wire envelope, publishing, the AMQP transport and its resilience."""
