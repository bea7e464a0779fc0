"""Tests of the `eval` package."""
