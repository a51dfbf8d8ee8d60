"""Device side of fleet: the update agent, a simulated fleet of agents, and their CLI.

Only ``orchestrator.protocol`` is imported from the orchestrator package.
"""

from device_sim.agent import DeviceAgent
from device_sim.context import AGENT_VERSION, AgentContext, AgentStats, load_public_key
from device_sim.fleet import BackgroundFleet, FleetConfig, SimulatedFleet, spawn_fleet
from device_sim.installer import CommandInstaller, InstallError, SimulatedInstaller
from device_sim.mqtt_link import BrokerAddress
from device_sim.profiles import FLAKY, INSTANT, PROFILES, REALISTIC, FailureRates, Profile, get_profile
from device_sim.state_store import AgentState, JsonStateStore, MemoryStateStore

__all__ = [
    "AGENT_VERSION",
    "FLAKY",
    "INSTANT",
    "PROFILES",
    "REALISTIC",
    "AgentContext",
    "AgentState",
    "AgentStats",
    "BackgroundFleet",
    "BrokerAddress",
    "CommandInstaller",
    "DeviceAgent",
    "FailureRates",
    "FleetConfig",
    "InstallError",
    "JsonStateStore",
    "MemoryStateStore",
    "Profile",
    "SimulatedFleet",
    "SimulatedInstaller",
    "get_profile",
    "load_public_key",
    "spawn_fleet",
]
