"""``python -m device_sim``: the simulated fleet (same options as ``fleet sim``)."""

from device_sim.cli import app

if __name__ == "__main__":
    app(prog_name="python -m device_sim")
