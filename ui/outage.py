"""A service that is down: one message that names it, and recovery without reloading the page.

Every run of the page asks both services for their models (:func:`ui.clients.list_models`);
a service that does not answer is *down*. Then:

* one banner at the top says which service is down and where (``saliency server at
  127.0.0.1:50051``), and what to do: start the stack only when neither service answers;
  when the other one does, the stack is running and the server is restarting or has stopped;
* the two sides do not repeat it (:func:`covers` tells the views which of their messages the
  banner already says);
* while a service is down, a fragment checks its health every :data:`POLL_S` seconds; when it
  answers again the page reruns by itself, and the calls that failed during the outage are
  tried again (their failures are forgotten), so the heatmap comes back with no reload and no
  click on Retry.
"""

from __future__ import annotations

from collections.abc import Mapping

import streamlit as st

from seqsal.errors import UnavailableError
from seqsal.health import grpc_serving
from seqsal.tls import ClientTLS
from ui import clients, side_loop
from ui.clients import Endpoints, ModelsReport

#: Seconds between two health checks of a service that is down.
POLL_S = 2.0
#: Session key: the services (name -> address) that were down at the previous run.
DOWN_KEY = "v_outage_down"
SIDES = ("main", "pin")
_ENV = {"saliency": "SEQSAL_SALIENCY_ADDRESS", "inference": "SEQSAL_INFERENCE_ADDRESS"}


def message(down: Mapping[str, str], endpoints: Endpoints) -> str:
    """The banner's words (Markdown) for the services in ``down`` (name -> address)."""
    if len(down) > 1:
        return (
            f"Neither the inference server at `{endpoints.inference}` nor the saliency server at "
            f"`{endpoints.saliency}` is answering. Start the stack with `make up` (or `seqsal up`), "
            f"or point `{_ENV['inference']}` and `{_ENV['saliency']}` at running servers. "
            "This page reconnects by itself as soon as they answer."
        )
    ((service, address),) = down.items()
    other = "inference" if service == "saliency" else "saliency"
    return (
        f"The {service} server at `{address}` is not answering; the {other} server at "
        f"`{endpoints.address(other)}` is up. The {service} server may be restarting: this page "
        f"reconnects by itself as soon as it answers (`seqsal up` restarts a server that stops; its "
        f"log is `logs/{service}.log`). Outside `seqsal up`, start it with `seqsal serve {service}`."
    )


def covers(text: str | None, down: Mapping[str, str]) -> bool:
    """Whether ``text`` (a side's problem) only repeats that a service in ``down`` is unreachable."""
    return text is not None and any(
        text == clients.describe_error(UnavailableError(""), service, address)  # type: ignore[arg-type]
        for service, address in down.items()
    )


def _poll(down: Mapping[str, str]) -> None:
    tls = ClientTLS.from_settings(clients.load_settings())
    addresses = tuple(down.values())

    @st.fragment(run_every=POLL_S)
    def poll() -> None:
        if all(grpc_serving(address, timeout=1.0, tls=tls) for address in addresses):
            st.rerun(scope="app")

    poll()


def banner(report: ModelsReport, endpoints: Endpoints) -> dict[str, str]:
    """Show the outage banner (if a service is down) and watch for the service to come back.

    Call it before the sides run: on the first run after an outage it forgets the sides' failed
    calls, so they are made again. Returns the services that are down (name -> address).
    """
    ss = st.session_state
    down = dict(report.down)
    if ss.get(DOWN_KEY) and not down:
        for side in SIDES:
            side_loop.forget_failures(side)
    ss[DOWN_KEY] = down
    if down:
        st.error(message(down, endpoints), icon=":material/cloud_off:")
        _poll(down)
    return down
