"""Probing: the batched linear solver, targets and cells, sweeps with nulls, online-code MDL and LEACE erasure."""
