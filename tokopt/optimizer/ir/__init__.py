"""The IR: graph, op schemas, weights, attribute schemas, verifier, cost model, serialization."""
