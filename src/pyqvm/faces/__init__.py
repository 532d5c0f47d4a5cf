"""The faces of a VM other than `AsyncVM`, derived from it (see `operations`).

`operations` reads AsyncVM's members; ``scripts/generate_faces.py`` writes `derived_vm`
(the blocking `VM`) and `derived_named` (the named-VM handles) from them, and a unit test
fails when a checked-in file differs from what the script writes now.
"""
