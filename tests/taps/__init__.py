"""Tests of the `taps` package."""
