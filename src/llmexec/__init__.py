"""llmexec: an LLM inference executor split into gRPC microservices."""
