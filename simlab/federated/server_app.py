"""The ServerApp of one arm: the federation its continual method asks for (``Method.server``).

``global``: one shared model (:class:`simlab.federated.federation.Federation`); ``pool``: the ODEx
model pool (:class:`simlab.federated.odex_server.OdexFederation`). A method with a new server side
adds its Federation subclass and one line to ``FEDERATIONS``.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from simlab.continual.registry import method_class
from simlab.federated.federation import Federation
from simlab.federated.odex_server import OdexFederation
from simlab.runlog import RunLog
from simlab.scenario.schema import Scenario

FEDERATIONS: dict[str, type[Federation]] = {
    "global": Federation,
    "pool": OdexFederation,
}


def federation_class(scenario: Scenario) -> type[Federation]:
    return FEDERATIONS[method_class(scenario.continual).server]


def make_server_app(scenario: Scenario, runlog: RunLog, *, resume: bool = False,
                    hospital_state_dir: str | None = None) -> ServerApp:
    """A ServerApp bound to one resolved arm of a scenario and a run log. ``resume``: continue from the
    arm's checkpoint; ``hospital_state_dir``: where hospitals save their method state (simulation)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        federation_class(scenario)(grid, scenario, runlog, resume=resume, hospital_state_dir=hospital_state_dir).run()

    return app
