"""The HTTP/1.1 server every listener of the agent shares (/metrics, OTLP/HTTP): bounded
connections, deadlines, header limits and strict framing in one place (server.py, http1.py)."""
