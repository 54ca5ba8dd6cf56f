"""Publishing a finished job's adapter to vLLM servers, and keeping it published.

    POST /v1/jobs/{id}/deploy {target, checkpoint?}
      -> the adapter's rows (kind "adapter", step NULL = final, or the checkpoint's step)
      -> checked against the target: rank <= max_lora_rank, target modules supported,
         no modules_to_save (vLLM cannot serve full-weight copies)       else 422
      -> files copied from the store (sha256 verified) to
         <adapter_dir>/<tenant>/<job>/<final|step-N>/, renamed into place whole
      -> POST /v1/load_lora_adapter {lora_name: the job's ft: name, lora_path} on every url
      -> a `Deployment` row: {url: {loaded, error, at}}
    reconcile() (beat, `serve`; every serving_reconcile_seconds)
      -> GET /v1/models on every url of every target with deployments; a deployment a server
         no longer lists (it restarted) is loaded again (files re-materialised if missing)

A target is a group of servers serving the same base models, read from settings
(`serving_targets`) or from the `serving_targets` table (admin API). The servers read adapters
from `adapter_dir` (a filesystem they share with lorajobs: NFS, a k8s volume), seen by them as
`server_adapter_dir`. A deployment that syncs the object store to the servers' disks instead
(e.g. `aws s3 sync` beside each server) sets adapter_dir to a local staging path and
server_adapter_dir to the synced copy: lorajobs only writes, vLLM only reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from lora_core.errors import validation_problems
from lorajobs.core import jobs
from lorajobs.core.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    ServiceError,
    UpstreamUnavailable,
)
from lorajobs.core.settings import Settings
from lorajobs.core.storage import ArtifactStore
from lorajobs.core.tables import (
    Artifact,
    Deployment,
    Job,
    JobStatus,
    ServingTarget,
    new_id,
    utcnow,
)
from lorajobs.core.vllm_client import VllmClient

__all__ = ["TargetSpec", "list_targets", "get_target", "create_target", "delete_target",
           "deploy", "undeploy", "reconcile", "served_name", "route", "visible_models",
           "check_adapter", "DEFAULT_SUPPORTED_MODULES"]

log = logging.getLogger(__name__)

# vLLM's LoRA layers wrap these linear layers (and their fused forms) in Llama-, Mistral- and
# Qwen-style models; embeddings and lm_head are not served as LoRA by recent vLLM.
DEFAULT_SUPPORTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj",
                             "up_proj", "down_proj", "gate_up_proj")
DEFAULT_MAX_LORA_RANK = 16  # vLLM's default --max-lora-rank
MAX_MODEL_NAME = 300  # deployments.model_name
AUTO_DEPLOY_BATCH = 20  # succeeded jobs deployed per reconciler sweep (the rest: next sweep)
ClientFactory = Callable[[str, str | None], VllmClient]


class TargetSpec(BaseModel):
    """A serving target as an admin defines it (settings, or POST /v1/serving-targets)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,99}$")
    urls: list[str] = Field(min_length=1, max_length=64)
    base_models: list[str] = Field(min_length=1)
    api_key: str | None = Field(None, max_length=500)
    adapter_dir: str = Field(min_length=1, max_length=1000)
    server_adapter_dir: str | None = Field(None, max_length=1000)
    max_lora_rank: int = Field(DEFAULT_MAX_LORA_RANK, ge=1, le=512)
    supported_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_SUPPORTED_MODULES))
    _from_settings: bool = PrivateAttr(False)

    def public(self) -> dict[str, Any]:
        """What GET shows: everything but the key (whether there is one)."""
        body = self.model_dump(exclude={"api_key"})
        return {**body, "has_api_key": bool(self.api_key), "source":
                "settings" if self._from_settings else "api"}


def _spec(raw: dict[str, Any], *, from_settings: bool = False) -> TargetSpec:
    try:
        spec = TargetSpec.model_validate(raw)
    except ValidationError as exc:
        param, problems = validation_problems(exc.errors(), {})
        raise InvalidRequest(problems, param=param) from exc
    for url in spec.urls:
        if not url.startswith(("http://", "https://")):
            raise InvalidRequest(f"{url!r} is not an http(s) URL", param="urls")
    spec._from_settings = from_settings
    return spec


def _row_spec(row: ServingTarget) -> TargetSpec:
    return TargetSpec(name=row.name, urls=row.urls, base_models=row.base_models,
                      api_key=row.api_key, adapter_dir=row.adapter_dir,
                      server_adapter_dir=row.server_adapter_dir,
                      max_lora_rank=row.max_lora_rank, supported_modules=row.supported_modules)


def list_targets(session: Session, settings: Settings) -> list[TargetSpec]:
    configured = [_spec(t, from_settings=True) for t in settings.serving_targets]
    names = {t.name for t in configured}
    rows = session.scalars(select(ServingTarget).order_by(ServingTarget.name))
    return configured + [_row_spec(r) for r in rows if r.name not in names]


def get_target(session: Session, settings: Settings, name: str) -> TargetSpec:
    for target in list_targets(session, settings):
        if target.name == name:
            return target
    raise NotFound(f"no serving target {name!r}", param="target")


def create_target(session: Session, settings: Settings, raw: dict[str, Any]) -> TargetSpec:
    spec = _spec(raw)
    if any(t.name == spec.name for t in list_targets(session, settings)):
        raise Conflict(f"serving target {spec.name!r} exists", param="name")
    session.add(ServingTarget(id=new_id("tgt"), **spec.model_dump()))
    session.commit()
    return spec


def delete_target(session: Session, name: str) -> None:
    row = session.scalar(select(ServingTarget).where(ServingTarget.name == name))
    if row is None:
        raise NotFound(f"no serving target {name!r} (targets from settings are not deleted "
                       "here)", param="name")
    if session.scalar(select(Deployment.id).where(Deployment.target == name).limit(1)):
        raise Conflict(f"serving target {name!r} has deployments; undeploy them first",
                       param="name")
    session.delete(row)
    session.commit()


def served_name(job: Job, step: int | None) -> str:
    """OpenAI's names: `ft:<base>:<suffix>:<job>` and `...:ckpt-step-<N>` for a checkpoint
    (the same strings api/openai_objects.py shows as fine_tuned_model and checkpoint names)."""
    name = f"ft:{job.base_model}:{job.suffix or 'lorajobs'}:{job.id}"
    return name if step is None else f"{name}:ckpt-step-{step}"


def _adapter_rows(session: Session, job: Job, step: int | None) -> list[Artifact]:
    stmt = select(Artifact).where(Artifact.job_id == job.id, Artifact.kind == "adapter")
    stmt = stmt.where(Artifact.step.is_(None) if step is None else Artifact.step == step)
    rows = list(session.scalars(stmt.order_by(Artifact.name)))
    if not rows:
        where = f" at checkpoint step {step}" if step is not None else ""
        raise NotFound(f"job {job.id} has no adapter{where}", param="checkpoint")
    if not any(r.name == "adapter_config.json" for r in rows):
        raise InvalidRequest(f"job {job.id}'s adapter has no adapter_config.json",
                             param="checkpoint")
    return rows


def check_adapter(config: dict[str, Any], target: TargetSpec) -> None:
    """Refuse, naming every problem at once, what the target's vLLM would fail to load."""
    problems: list[str] = []
    rank = config.get("r")
    if not isinstance(rank, int) or rank > target.max_lora_rank:
        problems.append(f"rank r={rank} exceeds target {target.name!r}'s max_lora_rank "
                        f"{target.max_lora_rank} (vLLM's --max-lora-rank)")
    modules = config.get("target_modules") or []
    if isinstance(modules, str):  # a regex PEFT resolves at load time: cannot be checked here
        modules = []
    unsupported = sorted(set(modules) - set(target.supported_modules))
    if unsupported:
        problems.append(f"target modules {unsupported} are not served by vLLM's LoRA "
                        f"(supported: {target.supported_modules})")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config['modules_to_save']}: vLLM cannot serve "
                        "full-weight module copies; serve the merged model instead")
    if problems:
        raise InvalidRequest("; ".join(problems), param="checkpoint", code="adapter_not_servable",
                             details={"problems": problems})


def check_deploy_request(session: Session, settings: Settings, *, target_name: str,
                         base_model: str, lora: dict[str, Any]) -> None:
    """At submit, a spec's `deploy.target`: the target exists, serves the base model, and will
    accept an adapter of this LoRA config; else a 422 naming `deploy.target` (a job must not
    train for hours to fail its deploy on something known up front)."""
    try:
        target = get_target(session, settings, target_name)
    except NotFound as exc:
        raise InvalidRequest(f"no serving target {target_name!r}",
                             param="deploy.target") from exc
    if base_model not in target.base_models:
        raise InvalidRequest(f"target {target.name!r} serves {target.base_models}, not "
                             f"{base_model!r}", param="deploy.target")
    try:
        check_adapter({"r": lora.get("r"), "target_modules": lora.get("target_modules"),
                       "modules_to_save": lora.get("modules_to_save")}, target)
    except InvalidRequest as exc:
        raise InvalidRequest(exc.message, param="deploy.target", code=exc.code,
                             details=exc.details) from exc


def deploy_succeeded_jobs(session: Session, settings: Settings, store: ArtifactStore,
                          client: ClientFactory | None = None) -> int:
    """Deploy every succeeded job whose spec asked for it (`jobs.deploy_target`), once: the
    column is cleared after the attempt, and the outcome is a job event (`deployed`, or
    `deploy_failed` naming why). A target whose adapter directory cannot be written is retried
    next sweep. Returns how many deployed."""
    done = 0
    for job in session.scalars(select(Job).where(Job.status == JobStatus.SUCCEEDED,
                                                 Job.deploy_target.is_not(None))
                               .order_by(Job.finished_at).limit(AUTO_DEPLOY_BATCH)):
        target = job.deploy_target or ""
        try:
            row = deploy(session, job=job, target_name=target, step=None, settings=settings,
                         store=store, client=client or _default_client)
        except UpstreamUnavailable as exc:
            session.rollback()
            log.warning("job %s: automatic deploy to %r waits: %s", job.id, target, exc.message)
            continue
        except ServiceError as exc:
            session.rollback()
            jobs.add_event(session, job.id, "deploy_failed",
                           f"automatic deploy to {target!r} failed: {exc.message}",
                           level="error", data={"target": target, "code": exc.code})
        else:
            done += 1
            jobs.add_event(session, job.id, "deployed",
                           f"deployed to {target!r} as {row.model_name}",
                           data={"target": target, "model": row.model_name,
                                 "servers": row.servers})
        job.deploy_target = None
        session.commit()
    return done


def _materialise(store: ArtifactStore, rows: list[Artifact], dest: Path) -> None:
    """The adapter's files in `dest`, complete or not at all (written beside, renamed in)."""
    if all((dest / r.name).is_file() and (dest / r.name).stat().st_size == r.size for r in rows):
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        for row in rows:
            digest = hashlib.sha256()
            out = tmp / row.name
            if not out.resolve().is_relative_to(tmp.resolve()):  # never outside the adapter
                raise Conflict(f"artifact name {row.name!r} is not a relative path",
                               param="checkpoint")
            out.parent.mkdir(parents=True, exist_ok=True)
            with store.open(row.storage_key) as src, open(out, "wb") as fh:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    fh.write(chunk)
            if digest.hexdigest() != row.sha256:
                raise Conflict(f"stored {row.name} does not match its sha256", param="checkpoint")
        tmp.chmod(0o755)  # the vLLM server runs as another user on a shared filesystem
        for path in tmp.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _dirs(target: TargetSpec, job: Job, step: int | None) -> tuple[Path, str]:
    rel = Path(job.tenant_id) / job.id / ("final" if step is None else f"step-{step}")
    server_root = target.server_adapter_dir or target.adapter_dir
    return Path(target.adapter_dir) / rel, str(Path(server_root) / rel)


def _default_client(url: str, api_key: str | None) -> VllmClient:
    return VllmClient(url, api_key)


def _load_everywhere(target: TargetSpec, name: str, path: str,
                     client: ClientFactory) -> dict[str, Any]:
    """{url: {loaded, error, at}}; a server that is down is recorded (the reconciler retries),
    a server refusing the adapter raises AdapterRefused."""
    servers: dict[str, Any] = {}
    for url in target.urls:
        with client(url, target.api_key) as vllm:
            try:
                vllm.load(name, path)
                servers[url] = {"loaded": True, "error": None, "at": _now()}
            except UpstreamUnavailable as exc:
                servers[url] = {"loaded": False, "error": exc.message, "at": _now()}
    return servers


def _now() -> str:
    return utcnow().isoformat()


def deploy(session: Session, *, job: Job, target_name: str, step: int | None,
           settings: Settings, store: ArtifactStore,
           client: ClientFactory = _default_client) -> Deployment:
    """Publish (again: idempotent) the job's adapter on every server of the target."""
    if job.status != JobStatus.SUCCEEDED and step is None:
        raise Conflict(f"job {job.id} is {job.status}: deploy a finished job, or a checkpoint",
                       param="job_id")
    target = get_target(session, settings, target_name)
    if job.base_model not in target.base_models:
        raise InvalidRequest(f"target {target.name!r} serves {target.base_models}, not "
                             f"{job.base_model!r}", param="target")
    rows = _adapter_rows(session, job, step)
    config_row = next(r for r in rows if r.name == "adapter_config.json")
    with store.open(config_row.storage_key) as fh:
        check_adapter(json.load(fh), target)
    name = served_name(job, step)
    if len(name) > MAX_MODEL_NAME:
        raise InvalidRequest(f"the served name {name!r} is over {MAX_MODEL_NAME} characters "
                             "(a shorter suffix or base model name)", param="job_id")
    local_dir, server_path = _dirs(target, job, step)
    try:
        _materialise(store, rows, local_dir)
    except OSError as exc:  # the target's directory is missing, full or not ours to write
        raise UpstreamUnavailable(f"cannot write the adapter under target {target.name!r}'s "
                                  f"adapter_dir: {exc}", param="target") from exc
    servers = _load_everywhere(target, name, server_path, client)
    row = session.scalar(select(Deployment).where(Deployment.target == target.name,
                                                  Deployment.model_name == name))
    if row is None:
        row = Deployment(id=new_id("dep"), tenant_id=job.tenant_id, job_id=job.id,
                         target=target.name, step=step, model_name=name,
                         adapter_path=server_path)
        session.add(row)
    row.servers = servers
    row.updated_at = utcnow()
    session.commit()
    return row


def find_deployment(session: Session, *, job: Job, target_name: str,
                    step: int | None) -> Deployment:
    row = session.scalar(select(Deployment).where(
        Deployment.job_id == job.id, Deployment.target == target_name,
        Deployment.model_name == served_name(job, step)))
    if row is None:
        raise NotFound(f"job {job.id} is not deployed on {target_name!r}", param="target")
    return row


def undeploy(session: Session, *, job: Job, target_name: str, step: int | None,
             settings: Settings, client: ClientFactory = _default_client) -> None:
    """Forget the deployment, then unload it from every server (a server that is down forgets
    it when it restarts); the files go when no other deployment reads them. The row goes
    first: the reconciler reloads what a row lists and a server lacks, so a row still there
    after the unload would bring the adapter back (it also re-checks after each load)."""
    row = find_deployment(session, job=job, target_name=target_name, step=step)
    target = get_target(session, settings, target_name)
    model_name, adapter_path = row.model_name, row.adapter_path
    session.delete(row)
    session.commit()
    for url in target.urls:
        with client(url, target.api_key) as vllm:
            try:
                vllm.unload(model_name)
            except UpstreamUnavailable as exc:
                log.warning("undeploy %s: %s", model_name, exc.message)
    local_dir, _ = _dirs(target, job, step)
    others = session.scalar(select(Deployment.id).where(
        Deployment.adapter_path == adapter_path).limit(1))
    if others is None:
        shutil.rmtree(local_dir, ignore_errors=True)


def list_deployments(session: Session, *, job_id: str) -> list[Deployment]:
    return list(session.scalars(select(Deployment).where(Deployment.job_id == job_id)
                                .order_by(Deployment.created_at)))


def reconcile(session: Session, settings: Settings, store: ArtifactStore,
              client: ClientFactory = _default_client) -> int:
    """Load every recorded deployment on every server of its target that does not list it;
    returns how many loads were done. A server that does not answer is skipped (next sweep)."""
    by_target: dict[str, list[Deployment]] = {}
    for row in session.scalars(select(Deployment).order_by(Deployment.id)):
        by_target.setdefault(row.target, []).append(row)
    loads = 0
    for name, rows in by_target.items():
        try:
            target = get_target(session, settings, name)
        except NotFound:
            log.warning("deployments on unknown serving target %r", name)
            continue
        for url in target.urls:
            loads += _reconcile_server(session, target, url, rows, store, client)
    try:
        session.commit()
    except StaleDataError:  # a row marked here was undeployed meanwhile: the marks are only
        session.rollback()  # what was last seen, and the next sweep sees again
        log.info("serving reconcile: a deployment went away during the sweep")
    return loads


def _reconcile_server(session: Session, target: TargetSpec, url: str, rows: list[Deployment],
                      store: ArtifactStore, client: ClientFactory) -> int:
    loads = 0
    with client(url, target.api_key) as vllm:
        try:
            served = vllm.models()
        except UpstreamUnavailable as exc:
            for row in rows:
                _mark(row, url, loaded=False, error=exc.message)
            return 0
        for row in rows:
            if row.model_name in served:
                if not (row.servers.get(url) or {}).get("loaded"):
                    _mark(row, url, loaded=True, error=None)
                continue
            job = session.get(Job, row.job_id)
            if job is None:
                continue
            error: str | None = None
            try:
                local_dir, _ = _dirs(target, job, row.step)
                _materialise(store, _adapter_rows(session, job, row.step), local_dir)
                vllm.load(row.model_name, row.adapter_path)
            except (UpstreamUnavailable, InvalidRequest, NotFound, Conflict) as exc:
                error = exc.message
            except OSError as exc:  # the adapter directory: next sweep
                error = f"adapter_dir: {exc}"
            if not _still_deployed(session, row.id):  # undeployed while this loaded it
                if error is None:
                    _unload_quietly(vllm, row.model_name)
                session.expunge(row)
                continue
            _mark(row, url, loaded=error is None, error=error)
            if error is None:
                log.info("reloaded %s on %s", row.model_name, url)
                loads += 1
    return loads


def _still_deployed(session: Session, deployment_id: str) -> bool:
    """Whether the row is there now, read on a connection of its own (this session's
    transaction may still see the snapshot it began with)."""
    with Session(bind=session.get_bind()) as fresh:
        return fresh.get(Deployment, deployment_id) is not None


def _unload_quietly(vllm: Any, name: str) -> None:
    try:
        vllm.unload(name)
    except (UpstreamUnavailable, InvalidRequest) as exc:  # a restart forgets it anyway
        log.warning("unloading %s again after its undeploy: %s", name, exc.message)


def _mark(row: Deployment, url: str, *, loaded: bool, error: str | None) -> None:
    row.servers = {**row.servers, url: {"loaded": loaded, "error": error, "at": _now()}}


# --- the OpenAI proxy's view ---------------------------------------------------------------

def route(session: Session, settings: Settings, *, tenant_id: str,
          model: str) -> tuple[list[str], str | None]:
    """(urls that serve `model` for this tenant, loaded ones first; the target's api key).
    `ft:` names: the tenant's own deployments only; other names: a target's base models."""
    if model.startswith("ft:"):
        rows = session.scalars(select(Deployment).where(
            Deployment.tenant_id == tenant_id, Deployment.model_name == model))
        for row in rows:
            try:
                target = get_target(session, settings, row.target)
            except NotFound:
                continue
            loaded = [u for u in target.urls if (row.servers.get(u) or {}).get("loaded")]
            return loaded + [u for u in target.urls if u not in loaded], target.api_key
    else:
        for target in list_targets(session, settings):
            if model in target.base_models:
                return list(target.urls), target.api_key
    raise NotFound(f"The model {model!r} does not exist or you do not have access to it.",
                   param="model", code="model_not_found")


def visible_models(session: Session, settings: Settings,
                   tenant_id: str) -> Iterable[tuple[str, datetime | None, str]]:
    """(id, created, owned_by) of what this tenant may call: served base models, then its
    deployed adapters."""
    seen: set[str] = set()
    for target in list_targets(session, settings):
        for base in target.base_models:
            if base not in seen:
                seen.add(base)
                yield base, None, "lorajobs"
    for row in session.scalars(select(Deployment).where(Deployment.tenant_id == tenant_id)
                               .order_by(Deployment.created_at)):
        if row.model_name not in seen:
            seen.add(row.model_name)
            yield row.model_name, row.created_at, tenant_id
