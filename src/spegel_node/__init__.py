"""spegel-node: keep containerd on this node configured to pull through Spegel."""

__version__ = "0.1.0"
