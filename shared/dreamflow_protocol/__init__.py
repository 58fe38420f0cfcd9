"""DreamFlow's wire protocol: msgpack headers plus raw array frames over ZeroMQ ROUTER/DEALER.

Pure Python on top of pyzmq, msgpack and numpy, so the Blender add-on can bundle it as a wheel.
See :mod:`.schema` for every message type and its fields, :mod:`.codec` for the framing and
:class:`Client` for the thread-safe client.
"""

from .client import Client, ConnectionTimeout, CurveKeys, RequestError, ServerBusy
from .codec import DEFAULT_LIMITS, Limits, Message, decode, encode, is_event, new_id, validate_message
from .endpoints import is_local_endpoint
from .schema import (EVENT_TYPES, JOB_STATES, METHODS, PROTOCOL_VERSION, REQUEST_TYPES, SCHEMAS, STAGES, START_STAGES,
                     TERMINAL_TYPES, ProtocolError)

__version__ = "0.2.0"

__all__ = [
    "Client", "ConnectionTimeout", "CurveKeys", "RequestError", "ServerBusy", "DEFAULT_LIMITS", "Limits", "Message",
    "decode", "encode", "is_event", "new_id", "validate_message", "EVENT_TYPES", "JOB_STATES", "METHODS",
    "PROTOCOL_VERSION", "REQUEST_TYPES", "SCHEMAS", "STAGES", "START_STAGES", "TERMINAL_TYPES", "ProtocolError",
    "is_local_endpoint", "__version__",
]
