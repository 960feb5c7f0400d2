"""ClientApp: the experiment's local training; each reply signed with this node's own key."""

from pathlib import Path

from phalanx.integrations.flower_app import make_client_app

app = make_client_app(Path(__file__).resolve().parents[1])
