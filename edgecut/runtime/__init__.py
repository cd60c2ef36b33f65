"""Runtime: the msgpack-framed TCP protocol, the edge server and the device client."""
