"""The Flower app that runs phalanx across organisations (see phalanx.integrations.flower_app)."""
