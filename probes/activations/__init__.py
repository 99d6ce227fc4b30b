"""Activations: capture hidden states over sessions into a store, and read them back. Imports data and models."""
