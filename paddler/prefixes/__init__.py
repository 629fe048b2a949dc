"""Cache-aware routing: which upstream most likely holds a request's prompt prefix."""
