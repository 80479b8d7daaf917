"""Locust load tests of the qwen3vl ensemble (HTTP and gRPC streaming) and their bounded runner."""
