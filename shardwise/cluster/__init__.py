"""The emulated cluster: network namespaces as nodes joined by shaped links (docs/emulated_cluster.md).
A benchmark and test tool, not part of the training path."""
