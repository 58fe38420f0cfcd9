"""A server submit of a prompt the toy world does not know is refused with the words it knows."""

import pytest

from dreamflow_protocol import RequestError


def test_server_refuses_an_unknown_toy_prompt_at_submit(make_server, make_client):
    srv = make_server()
    client = make_client(srv.endpoint)
    with pytest.raises(RequestError, match="toy world does not know the prompt 'a wooden chair'.*square pyramid"):
        client.submit("a wooden chair", preset="toy")
