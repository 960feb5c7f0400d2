"""ServerApp: PhalanxStrategy with the experiment's defense, verifying every reply's signature."""

from pathlib import Path

from phalanx.integrations.flower_app import make_server_app

app = make_server_app(Path(__file__).resolve().parents[1])
