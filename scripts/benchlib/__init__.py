"""scripts/bench: nsd against the tools it replaces, side by side in one run.

Run it as ``./scripts/bench [--quick] [--tenants N] [--out DIR]`` (root). The package
lives under scripts/ because it is a tool of the repository, not part of nsd: it
reuses tests/harness.py to run a real daemon in a test-made "host" network
namespace, and never touches the machine's own network.
"""
