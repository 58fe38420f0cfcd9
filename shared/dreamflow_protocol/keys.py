"""CURVE key files for authenticated remote use (``dreamflow keys`` writes them).

Layout of a key folder: ``server.key`` / ``server.key_secret`` (the server's pair),
``client.key`` / ``client.key_secret`` (one client's pair) and ``authorized/`` holding the public
keys of every client the server lets in. A client needs ``server.key`` and its own pair; the
server needs ``server.key_secret`` and ``authorized/``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import zmq.auth

from .client import CurveKeys


def create_keys(folder: str | os.PathLike) -> Path:
    """Make a server pair and a client pair in ``folder`` and authorise the client; the folder."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    for name in ("server", "client"):
        if (root / f"{name}.key_secret").exists():
            raise FileExistsError(f"{root / (name + '.key_secret')} exists; refusing to overwrite a key")
    zmq.auth.create_certificates(str(root), "server")
    zmq.auth.create_certificates(str(root), "client")
    authorized = root / "authorized"
    authorized.mkdir(exist_ok=True)
    shutil.copyfile(root / "client.key", authorized / "client.key")
    for secret in root.glob("*.key_secret"):
        os.chmod(secret, 0o600)
    return root


def load_client_keys(folder: str | os.PathLike, name: str = "client") -> CurveKeys:
    """The client's CURVE keys from a key folder (server.key and <name>.key_secret)."""
    root = Path(folder)
    server_public, _ = zmq.auth.load_certificate(str(root / "server.key"))
    client_public, client_secret = zmq.auth.load_certificate(str(root / f"{name}.key_secret"))
    if client_secret is None:
        raise ValueError(f"{root / (name + '.key_secret')} holds no secret key")
    return CurveKeys(server_public, client_public, client_secret)


def load_server_secret(folder: str | os.PathLike) -> tuple[bytes, bytes]:
    """The server's (public, secret) CURVE keys from a key folder."""
    path = Path(folder) / "server.key_secret"
    public, secret = zmq.auth.load_certificate(str(path))
    if secret is None:
        raise ValueError(f"{path} holds no secret key")
    return public, secret
