"""The error every part of the activation store raises: a bad store, setting or read, named with its path."""


class StoreError(ValueError):
    pass
