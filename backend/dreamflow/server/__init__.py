"""The ZeroMQ job server and its on-disk job store."""
