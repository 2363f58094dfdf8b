"""Fixtures for tests that run real pods on local node agents (see kubetune_dev.nodeagent.testing)."""

from kubetune_dev.nodeagent.testing import local_nodes, node_agent

__all__ = ["local_nodes", "node_agent"]
