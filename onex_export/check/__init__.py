"""The checks of a build against PyTorch: the parity gate (gate.py) and its comparator (parity.py), re-checking a
build folder (verify.py) from what its manifest records (from_manifest.py), and the float32 reference the checks
run, also as a runtime backend (reference.py)."""
