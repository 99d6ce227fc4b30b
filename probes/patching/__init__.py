"""Activation patching: pairs and their metrics, exact and attribution patching, knockout, generation checks."""
