"""The HTTP gateway: the Segment-compatible tracking API in front of ingest (a gRPC client only)."""
