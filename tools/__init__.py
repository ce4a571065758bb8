"""Tools around the core, each run as `python -m tools.NAME` from the repository root
(a package, so that no other installed `tools` can shadow them)."""
