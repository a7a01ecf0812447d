"""Ray cluster configurations and the local multi-node cluster script (see README.md)."""
