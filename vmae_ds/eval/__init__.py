"""Evaluation: scoring test-time predictions and writing reports."""
