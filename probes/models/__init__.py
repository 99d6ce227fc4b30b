"""Model access: family adapters, loading, processors, rendering through the chat template, token maps, hooks, tiny
random checkpoints. Imports `probes.data` only."""
