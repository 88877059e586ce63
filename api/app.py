"""The app factory: `create_app(settings) -> Litestar`, with everything wired in one place.

Routes, the `tenant` dependency (API keys), the one exception handler (api.errors), the body
size cap (413) and the OpenAPI schema (served at /schema, with a bearer security scheme) are
all set here; route modules stay free of try/except and configuration.
"""

from __future__ import annotations

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme

from api.auth import provide_tenant
from api.errors import error_response
from api.routes.health import health, metrics
from api.routes.images import list_images, pull_image
from api.routes.runs import cancel_run, create_run, get_run
from api.routes.volumes import create_volume, delete_volume, get_volume, list_volumes
from api.settings import Settings
from api.state import AppState

API_VERSION = "1"


def create_app(settings: Settings) -> Litestar:
    settings.check()
    state = AppState.build(settings)
    openapi = OpenAPIConfig(
        title="sbx",
        version=API_VERSION,
        description="Rootless sandbox runner: submit code, get its output.",
        components=Components(
            security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer", description="API key")}
        ),
        security=[{"bearer": []}],
        use_handler_docstrings=True,
    )
    return Litestar(
        route_handlers=[create_run, get_run, cancel_run, list_images, pull_image, health, metrics,
                        create_volume, list_volumes, get_volume, delete_volume],
        dependencies={"tenant": Provide(provide_tenant, sync_to_thread=False)},
        exception_handlers={Exception: error_response},
        request_max_body_size=settings.max_body_bytes,
        openapi_config=openapi,
        state=State({"app": state, "keyring": state.keyring}),
        on_shutdown=[state.close],
        debug=False,
    )
