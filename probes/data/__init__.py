"""Data: synthetic identities, drawn documents, sessions and their files, the published benchmark, OCR.

Nothing here imports torch or transformers (`tests/test_layers.py` checks it), so data tools stay fast to import.
"""
