"""A small Flower App for tests/test_flower.py: funcdp clients and server with SecAgg+."""
