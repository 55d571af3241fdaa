"""Method-agnostic machinery: configs, registry, injection, the adapter layer, weights, IO."""
