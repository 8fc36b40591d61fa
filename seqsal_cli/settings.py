"""What `seqsal up` reads besides each server's settings: the UI's port and its private Redis."""

from __future__ import annotations

from pydantic import Field

from seqsal.settings import SeqsalSettings


class StackSettings(SeqsalSettings):
    """The ports of `seqsal up`'s own processes (the servers' come from their own settings)."""

    ui_port: int = Field(default=8501, ge=1, le=65535, description="Port of the Streamlit UI.")
    stack_redis_port: int = Field(
        default=6390, ge=1, le=65535, description="Port of the private redis-server `seqsal up` starts."
    )
