"""Service settings, read from the environment (prefix ``IGAT_``).

Every setting has an embedded default, so ``igat serve`` works from an empty directory: SQLite under ``./var``,
artifacts under ``./var/artifacts``, one experiment at a time.

Authentication: mutating routes need ``Authorization: Bearer <IGAT_API_TOKEN>``. When no token is configured
the service *fails closed*: every mutation answers 503 with a message saying that ``IGAT_API_TOKEN`` must be
set. ``igat serve`` generates a token when none is set (see ``service.cli``).

Reads: ``IGAT_OPEN_READS=true`` (the default) is the local-development mode, where every read route answers
without a token; a deployment sets ``IGAT_OPEN_READS=false`` and then every route but ``/healthz`` and the API
documentation needs the token (and answers 503 when none is configured).
"""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from igat_core.spec import DEFAULT_SIZE_LIMITS, SizeLimits


def _default_runner_command() -> list[str]:
    return [sys.executable, "-m", "igat_core.cli", "run"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IGAT_", extra="ignore")

    database_url: str = Field(
        "sqlite:///./var/igat.db",
        description="SQLAlchemy URL: sqlite:///path or postgresql+psycopg://user:pw@host/db",
    )
    artifact_root: Path = Field(Path("./var/artifacts"), description="one run directory per experiment lives here")
    data_root: Path | None = Field(None, description="datasets (CIFAR); passed to runs as IGAT_DATA_ROOT")
    ray_address: str | None = Field(None, description="Ray dashboard URL (Jobs API) for the ray executor; unset: "
                                    "`igat serve` starts a local Ray head")
    api_token: SecretStr | None = Field(None, description="bearer token required by every mutating route")
    open_reads: bool = Field(True, description="true: local-development mode, read routes need no token; false "
                             "(deployments): every route but /healthz and the API documentation needs the token")
    max_body_bytes: int = Field(1 << 20, ge=1024, le=1 << 30, description="largest request body accepted; a larger "
                                "one is refused with 413 before it is read to the end")

    executor: str = Field("local", description="how a standalone dispatcher runs experiments: local | ray "
                          "(`igat serve` defaults to ray)")
    runner_command: list[str] = Field(
        default_factory=_default_runner_command,
        description="argv prefix of the experiment runner; SPEC.yaml --out RUN_DIR are appended (JSON list in env)",
    )
    dispatcher_poll_s: float = Field(1.0, gt=0.0, le=60.0, description="seconds between dispatcher ticks")
    max_concurrent_experiments: int = Field(1, ge=1, le=1024, description="running experiments per dispatcher")
    max_concurrent_cpus: float | None = Field(
        None, gt=0.0, le=1e6, description="CPUs the running experiments of one dispatcher may request together (each "
        "requests resources.num_workers x the larger of cpus_per_worker and threads); the next run in queue order "
        "waits until it fits, and one that exceeds the limit alone still runs when nothing else does; unset: no CPU "
        "limit; `igat serve` sets it to the CPUs of the Ray head it starts")
    lease_s: float = Field(30.0, gt=0.0, description="a dispatcher that misses renewing for this long is presumed dead")
    max_attempts: int = Field(3, ge=1, le=100, description="starts of one experiment before it is failed for good")
    cancel_grace_s: float = Field(10.0, ge=0.0, description="SIGTERM -> SIGKILL delay when cancelling a run")
    sse_poll_s: float = Field(0.5, gt=0.0, le=10.0, description="how often an event stream looks for new events")

    # Experiment tracking (service.tracking): off unless a tracking URI is set.
    mlflow_tracking_uri: str | None = Field(None, description="MLflow tracking server (http://host:5000) the "
                                            "dispatcher logs every experiment to; unset: MLflow is never imported")
    mlflow_experiment: str = Field("igat", min_length=1, max_length=256,
                                   description="the MLflow experiment the runs are logged under")

    # What a submission may ask for (service.admission).
    checkpoint_roots: list[Path] = Field(
        default_factory=list, description="directories, besides the artifact root and the data root, whose files "
        "base.checkpoint may name (absolute paths, symlinks resolved; JSON list in env)")
    max_parameters: int = Field(DEFAULT_SIZE_LIMITS.max_parameters, ge=1,
                                description="the most parameters an experiment's ensemble may have, all members")
    max_activation_bytes: int = Field(DEFAULT_SIZE_LIMITS.max_activation_bytes, ge=1,
                                      description="the most bytes of float32 activations one forward pass of the "
                                      "ensemble over the spec's largest batch may keep (igat_core.model_size)")

    @property
    def size_limits(self) -> SizeLimits:
        return SizeLimits(self.max_parameters, self.max_activation_bytes)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings from the environment, read once per process (tests call ``get_settings.cache_clear()``)."""
    return Settings()
