"""Shared pytest configuration."""

pytest_plugins = ["tests.harness.fixtures"]
