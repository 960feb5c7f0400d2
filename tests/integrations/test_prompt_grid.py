"""PromptGrid: the ServerApp collects replies every 0.25 s instead of Flower's 3 s, and still
stops at the round's timeout with the replies it has."""

import time
from types import SimpleNamespace

from phalanx.integrations.flower_app import PromptGrid


class FakeGrid:
    """Replies to message i arrive on the (i + 1)-th pull; message 'lost' never gets one."""

    def __init__(self):
        self.pulls = 0

    def push_messages(self, messages):
        return list(messages)

    def pull_messages(self, ids):
        self.pulls += 1
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ids
                if i != "lost" and int(i) < self.pulls]


def test_every_reply_is_collected_without_waiting_three_seconds_a_poll():
    fake = FakeGrid()
    t0 = time.monotonic()
    replies = PromptGrid(fake, poll=0.01).send_and_receive(["0", "1", "2"], timeout=30)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["0", "1", "2"]
    assert fake.pulls == 3 and time.monotonic() - t0 < 1.0


def test_a_missing_reply_ends_at_the_timeout_with_the_others():
    fake = FakeGrid()
    t0 = time.monotonic()
    replies = PromptGrid(fake, poll=0.01).send_and_receive(["0", "lost"], timeout=0.3)
    assert [r.metadata.reply_to_message_id for r in replies] == ["0"]
    assert 0.3 <= time.monotonic() - t0 < 2.0
