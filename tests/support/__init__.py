"""Helpers for the tests (importable as `support`: pytest's `pythonpath` setting puts
tests/ on the path). Models, server processes and certificates shared with the
benchmarks are in `netloader.testing`."""
