"""Test and bench harness: worlds of simulators, services and private infrastructure."""
