"""The faces of a VM other than `AsyncVM`, derived from it (see `operations`).

`operations` reads AsyncVM's members; ``scripts/generate_faces.py`` writes `derived`
from them (the blocking and named-VM methods), and a unit test fails when the
checked-in file differs from what the script writes now.
"""
