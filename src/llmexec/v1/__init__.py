"""Generated protobuf and gRPC code for package llmexec.v1 (see protos/)."""
