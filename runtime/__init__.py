"""The model runtime: the captioning engine, the async data plane, the HTTP server and the router."""
