"""Mitigation: what fixes a located leak, and at what cost.

`fronts` (non-dominated settings, hypervolume), `measures` (privacy loss L and utility U with identity-bootstrap
intervals), `utility` (the benign tasks and the rows L and U are read from), `image` (black-box input protections,
one strength knob each), `blackbox` (the model through generate-and-score, every query counted), `steer` (white-box
interventions at a located site, one strength knob each), `whitebox` (LEACE by rank, component mean-ablation, the
probe gate), `risks` (memory and context retention), `decodability` (a probe retrained after the intervention).
Layer: beside `organism`, above probing and patching.
"""
