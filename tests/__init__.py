"""The test suite; tests/support.py holds the shared helpers (`from tests.support import ...`)."""
