"""Frozen-feature probes: kNN, linear and attentive classifiers on an encoder's features (vmae-probe, in-run)."""
