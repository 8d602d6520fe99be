"""The API side: endpoint settings, one endpoint's HTTP and limits, the pool over several, their preflight, the exactly-once cache runner, the vLLM server's lifecycle."""
