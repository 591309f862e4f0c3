"""Collection rules: private modules under tests/ are helpers and subprocess scripts, not tests.

``--doctest-modules`` would otherwise import them, and the subprocess scripts (the x64 oracle
check, the multi-device workers) must only ever run in a process of their own.
"""

collect_ignore_glob = ["_*.py", "*/_*.py", "_workers/*"]
