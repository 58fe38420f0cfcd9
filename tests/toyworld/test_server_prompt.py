"""A server submit of a prompt the toy world does not know is refused with the words it knows."""

import pytest

from dreamflow_protocol import RequestError


def test_server_refuses_an_unknown_toy_prompt_at_submit(make_server, make_client):
    srv = make_server()
    client = make_client(srv.endpoint)
    with pytest.raises(RequestError, match="toy world does not know the prompt 'a wooden chair'.*square pyramid"):
        client.submit("a wooden chair", preset="toy")


def test_a_short_form_runs_as_the_worlds_prompt_and_the_job_says_so(make_server, make_client):
    from server_runners import StepRunner
    from server_support import collect

    runner = StepRunner(steps=2)
    client = make_client(make_server(runner=runner).endpoint)
    job = client.submit("an orange pyramid", preset="toy")
    events = collect(client, job)
    assert events[0].seq == 0 and events[0].type == "log"
    assert events[0].fields["message"] == "using 'an orange square pyramid' (the toy world's words for 'an orange pyramid')"
    assert events[-1].type == "job_done"
    assert runner.calls[0]["prompt"] == "an orange square pyramid"
    assert client.status(job)["prompt"] == "an orange square pyramid"
    # The world's own prompt is not announced: nothing was changed.
    same = client.submit("a red cube", preset="toy")
    assert [e.type for e in collect(client, same)][0] == "progress"
