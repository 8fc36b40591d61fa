"""The workbench's settings: where the servers are (:class:`seqsal.settings.ClientSettings`), the
shared Redis of saved sessions, and the UI's own (login, session lifetime)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr

from seqsal.settings import ClientSettings, RedisSettings


class UISettings(ClientSettings, RedisSettings):
    """Configuration of the Streamlit UI (one per UI process)."""

    ui_password: SecretStr | None = Field(
        default=None,
        description="Shared password for the UI (used when no OIDC login is set in .streamlit/secrets.toml).",
    )
    ui_password_file: Path | None = Field(default=None, description="File holding the UI's shared password.")
    ui_session_ttl_days: float = Field(
        default=30,
        ge=0,
        description="Lifetime (days) of a saved named UI session, counted from when it was last saved or "
        "opened (opening one keeps it); 0 = kept until deleted. Applies in Redis and in the UI's own "
        "process alike.",
    )
    ig_steps: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="The saliency server's default integrated-gradients steps (SEQSAL_IG_STEPS), for the "
        "progress estimate of a call that leaves them to the server.",
    )
