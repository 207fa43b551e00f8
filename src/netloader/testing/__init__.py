"""Tooling for netloader's tests, benchmarks and demo; nothing at run time imports it.

- `models`: deterministic synthetic models (the same tensors in every process) and
  safetensors checkpoints made from them.
- `processes`: child processes that print their address (servers) or JSON lines
  (workers), read line by line with timeouts, stopped cleanly.
- `certs`: a self-signed certificate made with `openssl`, for TLS trials.
- `cluster`: an emulated cluster of network namespaces with rate-limited links (root);
  `cluster_scenarios` runs scale-out waves on it with `cluster_worker` processes.
- `vllm`: start and drive a real vLLM OpenAI server with `--load-format netloader`.
"""
